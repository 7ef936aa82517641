"""IGD influence guidance (Chen et al., ICLR 2025), SPEC "IGD".

G_I(x̂0) = (1/K) Σ_k (1 − cos(∇_θ CE(f_θk(D(x̂0)), c), G_k,c)) on the decoded predicted clean image,
differentiated w.r.t. x_t through the decoder and the diffusion model, and applied with the adaptive
scale ρ_t = 0.0015 · √(1 − ᾱ_t) · RMS(ε) / RMS(∇G_I) · k (0.0015 is the authors' constant; the paper's
formula has none). One backward for all K checkpoints (the authors run K); per-sample gradient cosines
come from `fastdd.ops.grad_cosine` without materialising per-sample gradients.

Also here: the per-class real gradients G_k,c and the checkpoint selection of Algorithm 2.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import ops
from ..ops.reference import unflatten_params
from ..sampling.sampler import Guidance, StepContext

RHO_CONSTANT = 0.0015


def rms(t: Tensor) -> Tensor:
    """Root mean square per row. t: [B, ...] -> [B, 1, 1, 1] (broadcastable to t)."""
    return t.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (t.dim() - 1)))


def adaptive_scale(eps: Tensor, grad: Tensor, alpha_bar: float, k: float, constant: float = RHO_CONSTANT) -> Tensor:
    """ρ_t · k per row = constant · √(1 − ᾱ_t) · RMS(ε) / RMS(g) · k. eps, grad: [B, C, H, W] -> [B, 1, 1, 1]."""
    return constant * (1.0 - alpha_bar) ** 0.5 * rms(eps) / rms(grad).clamp_min(1e-20) * k


def influence_loss(
    images: Tensor,
    labels: Tensor,
    surrogate: nn.Module,
    flat_params: Tensor,
    real_grads: Tensor,
    groups: Tensor | None = None,
) -> Tensor:
    """Σ over images (or groups) of (1/K) Σ_k (1 − cos(g_k, G_k)): one scalar, so one backward serves every row.

    images: [R, C, H, W]; labels: [R]; flat_params: [K, P]; real_grads: [K, P] (one class) or [G, K, P] (per row/group).
    """
    cos = ops.grad_cosine(surrogate, flat_params, images, labels, real_grads, groups=groups)  # [G, K]
    return (1.0 - cos).mean(dim=1).sum()


def influence_gradient(
    x_t: Tensor,
    pred_xstart: Tensor,
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    real_grads: Tensor,
    y: Tensor,
    groups: Tensor | None = None,
) -> Tensor:
    """∇_{x_t} G_I(x̂0): the drop-in IGD gradient for another repo's sampling loop.

    x_t: [B, C, H, W] with requires_grad, pred_xstart: x̂0 computed from x_t with autograd recording the
    model forward; decode: latents -> images in the surrogate's input range; real_grads: [K, P] or [B, K, P].
    Usage:  g = influence_gradient(x_t, x0, decode, surrogate, flat_params, real_grads, y)
            s = s - adaptive_scale(eps, g, alpha_bar_t, k) * g
    """
    loss = influence_loss(decode(pred_xstart), y, surrogate, flat_params, real_grads, groups)
    (grad,) = torch.autograd.grad(loss, x_t)
    return grad


class InfluenceGuidance(Guidance):
    """IGD's G_I as a sampler guidance, active on respaced indices [low, high] (default [30, 45] of 50).

    real_grads: [num_classes, K, P] (G_k per class). compat=True reproduces the authors' shadow row: the
    unconditional row of each CFG pair is decoded too and its CE averaged with the conditional row's
    (one gradient per pair); the update is applied to the conditional rows only.
    """

    requires_grad = True
    capturable = True

    def __init__(
        self,
        decode: Callable[[Tensor], Tensor],
        surrogate: nn.Module,
        flat_params: Tensor,
        real_grads: Tensor,
        *,
        k: float = 5.0,
        low: int = 30,
        high: int = 45,
        compat: bool = False,
    ):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if real_grads.dim() != 3 or real_grads.shape[1:] != flat_params.shape:
            raise ValueError(
                f"real_grads must be [num_classes, K, P] with [K, P] = {tuple(flat_params.shape)}, got {tuple(real_grads.shape)}"
            )
        self.decode, self.surrogate, self.k, self.low, self.high, self.compat = decode, surrogate, k, low, high, compat
        self.flat_params, self.real_grads = flat_params, real_grads

    def step(self, ctx: StepContext) -> Tensor:
        rows = ctx.rows
        labels = ctx.y[:rows]  # device labels; real_grads rows are gathered on the device, no host sync
        if self.compat:
            # decode both rows of each [cond; uncond] pair, CE averaged within the pair
            images = self.decode(ctx.pred_xstart)
            groups = torch.arange(ctx.x_t.shape[0], device=labels.device) % rows
            loss = influence_loss(images, labels[groups], self.surrogate, self.flat_params, self.real_grads[labels], groups)
        else:
            images = self.decode(ctx.pred_xstart[:rows])
            loss = influence_loss(images, labels, self.surrogate, self.flat_params, self.real_grads[labels])
        grad = ctx.grad(loss)[:rows]
        update = -adaptive_scale(ctx.eps[:rows].detach(), grad, ctx.alpha_bar, self.k) * grad
        return F.pad(update, (0, 0, 0, 0, 0, 0, 0, ctx.x_t.shape[0] - rows))


# --------------------------------------------------------------------------- real gradients and Algorithm 2
def class_mean_gradient(
    surrogate: nn.Module, flat_params: Tensor, images: Tensor, label: int, max_images: int = 200, chunk: int = 50
) -> Tensor:
    """G for one class and parameter set: mean CE gradient over the first max_images images, computed in
    chunks of `chunk` and averaged over chunks (the authors' 4 × 50). images: [N, C, H, W] -> [P] fp32."""
    images = images[:max_images]
    if len(images) == 0:
        raise ValueError(f"class {label} has no images to compute its real gradient")
    theta = flat_params.detach().float().requires_grad_(True)
    params = unflatten_params(surrogate, theta)
    chunk_grads = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk].float()
        logits = functional_call(surrogate, params, (batch,))
        loss = F.cross_entropy(logits, torch.full((len(batch),), label, device=batch.device))
        chunk_grads.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(chunk_grads).mean(0)


def real_gradients(
    surrogate: nn.Module, flat_params: Tensor, images: Tensor, labels: Tensor, num_classes: int, **kwargs
) -> Tensor:
    """G_k,c for every class and parameter set: [num_classes, K, P] (images sorted by file within a class)."""
    out = []
    for c in range(num_classes):
        class_images = images[labels == c]
        out.append(torch.stack([class_mean_gradient(surrogate, p, class_images, c, **kwargs) for p in flat_params]))
    return torch.stack(out)


def select_checkpoints(epoch_class_grads: Tensor, threshold: float = 0.7) -> list[int]:
    """Algorithm 2: keep epoch 0; walk the epochs and keep e when cos(mean gradient at e, reference) < threshold,
    making it the new reference. epoch_class_grads: [E+1, num_classes, P] per-class mean gradients."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    mean_grads = epoch_class_grads.mean(dim=1)  # [E+1, P]
    kept, reference = [0], mean_grads[0]
    for epoch in range(1, len(mean_grads)):
        if F.cosine_similarity(mean_grads[epoch], reference, dim=0) < threshold:
            kept.append(epoch)
            reference = mean_grads[epoch]
    return kept
