"""The authors' IGD sampler (Algorithm 1 as DD_IGD computes it on the official DiT / IDDPM code), from SPEC.

A deliberately plain restatement, independent of fastdd.sampling / fastdd.guidance / fastdd.ops, used as
the ground truth of tests/test_igd_faithfulness.py and as the "authors' algorithm" baseline of the
sampler benchmark. What it reproduces (SPEC "Shared backbone", "IGD"):

- IDDPM tables in float64 (numpy), gathered per step as float32: linear betas over 1000 steps, respaced to
  N steps by `space_timesteps`, respaced betas recomputed from ᾱ at the kept steps.
- Ancestral p_sample with learned-range variance, no clipping, noise on every step but the last.
- The official `forward_with_cfg`: x = [cond; uncond] rows, only the first half is fed (twice), CFG on
  eps[:, :3] only (written to both rows), the remaining channels row-wise.
- One image per call, classes one after another, autograd recording the model forward on every step.
- On guided steps (respaced index t in [low, high]), after the unguided sample s:
  deviation  s ← s − γ·∇_{x_t} cos(x_t[0], m*) (both rows), m* = argmax over a Python-list FIFO memory;
  influence  for each checkpoint k a separate backward of (1 − cos(∇_θk CE, G_k)) / K to x_t, CE averaged
  over both decoded rows; s[0] ← s[0] − k·ρ_t·g_I[0], ρ_t = 0.0015·√(1−ᾱ_t)·RMS(eps[0]) / RMS(g_I[0]).
- The memory receives the final latent of row 0 after each image.
"""
from __future__ import annotations

import gc
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LATENT_COS_EPS = 1e-6
RHO_CONSTANT = 0.0015


# --------------------------------------------------------------------------- diffusion tables (IDDPM)
def linear_betas(num_train_steps: int = 1000) -> np.ndarray:
    """IDDPM "linear" schedule: betas from 1e-4 to 0.02 (scaled by 1000 / num_train_steps), float64."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_train_steps, dtype=np.float64)


def space_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """The kept original timesteps of a single-section respacing: round(i · (T − 1) / (N − 1)), i < N."""
    stride = (num_train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return kept


class RespacedDiffusion:
    """Gaussian diffusion tables of the IDDPM `SpacedDiffusion`, float64, indexed by respaced step t."""

    def __init__(self, num_steps: int, num_train_steps: int = 1000):
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(num_train_steps))
        self.timestep_map = space_timesteps(num_train_steps, num_steps)
        betas, last = [], 1.0
        for step in self.timestep_map:
            betas.append(1.0 - base_alphas_cumprod[step] / last)
            last = base_alphas_cumprod[step]
        betas = np.array(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_steps = num_steps
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)

    @staticmethod
    def gather(table: np.ndarray, t: int, like: Tensor) -> Tensor:
        """table[t] as a float32 scalar tensor on like's device (the official `_extract_into_tensor`)."""
        return torch.from_numpy(table).to(like.device)[t].float()

    def p_mean_variance(self, model_output: Tensor, x: Tensor, t: int) -> dict[str, Tensor]:
        """Learned-range variance, eps prediction, no clipping. model_output: [B, 2C, H, W], x: [B, C, H, W]."""
        eps, var_values = model_output.split(x.shape[1], dim=1)
        min_log = self.gather(self.posterior_log_variance_clipped, t, x)
        max_log = self.gather(self.log_betas, t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.gather(self.sqrt_recip_alphas_cumprod, t, x) * x - self.gather(
            self.sqrt_recipm1_alphas_cumprod, t, x
        ) * eps
        mean = self.gather(self.posterior_mean_coef1, t, x) * pred_xstart + self.gather(self.posterior_mean_coef2, t, x) * x
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


# --------------------------------------------------------------------------- model call (official CFG)
def forward_with_cfg(model: nn.Module, x: Tensor, timesteps: Tensor, y: Tensor, cfg_scale: float, cfg_channels: int = 3) -> Tensor:
    """The official DiT `forward_with_cfg`: x [2B] = [cond; uncond], only x[:B] is fed (to both halves);
    CFG on the first cfg_channels output channels (both halves get the guided value), the rest row-wise."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half], dim=0), timesteps, y)
    guided, rest = out[:, :cfg_channels], out[:, cfg_channels:]
    cond, uncond = guided.split(len(guided) // 2, dim=0)
    half_guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


# --------------------------------------------------------------------------- the two guidances
def flat_to_params(module: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """A flat parameter vector ([P], `module.parameters()` order) as named views for functional_call."""
    params, offset = {}, 0
    for name, param in module.named_parameters():
        params[name] = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    return params


def deviation_gradient(x_t: Tensor, memory: list[Tensor]) -> Tensor:
    """∇_{x_t} cos(x_t[0], m*), m* = argmax_m cos(x_t[0], m) over the memory list ([1, C, H, W] each).

    x_t: [2, C, H, W] leaf with requires_grad -> [1, C, H, W] (broadcast onto both rows by the caller).
    """
    query = x_t[0].flatten()
    similarities = torch.stack([F.cosine_similarity(query, m.flatten(), dim=0, eps=LATENT_COS_EPS) for m in memory])
    best = int(similarities.argmax())
    (grad,) = torch.autograd.grad(similarities[best], x_t)
    return grad[0:1]


def influence_gradient(
    x_t: Tensor,
    pred_xstart: Tensor,
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    class_real_grads: Tensor,
    label: int,
) -> Tensor:
    """∇_{x_t} Σ_k (1 − cos(∇_θk mean-CE(surrogate(D(x̂0)), label), G_k)) / K, one backward per checkpoint.

    x_t: [2, C, H, W] leaf; pred_xstart: [2, C, H, W] recorded from x_t; flat_params, class_real_grads: [K, P]
    (copied to x_t's device on every call, as the authors do). -> [2, C, H, W].
    """
    images = decode(pred_xstart)
    labels = torch.full((images.shape[0],), label, device=images.device, dtype=torch.long)
    num_checkpoints = flat_params.shape[0]
    total = torch.zeros_like(x_t)
    for index in range(num_checkpoints):
        theta = flat_params[index].to(x_t.device).detach().clone().requires_grad_(True)
        real_grad = class_real_grads[index].to(x_t.device)
        logits = functional_call(surrogate, flat_to_params(surrogate, theta), (images,))
        ce = F.cross_entropy(logits, labels)
        (grad_theta,) = torch.autograd.grad(ce, theta, create_graph=True)
        loss = (1 - F.cosine_similarity(grad_theta, real_grad, dim=0)) / num_checkpoints
        (grad_x,) = torch.autograd.grad(loss, x_t, retain_graph=True)
        total = total + grad_x
    return total


def rms(t: Tensor) -> Tensor:
    return t.square().mean().sqrt()


# --------------------------------------------------------------------------- Algorithm 1
def authors_igd_sample(
    model: nn.Module,
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    real_grads: Tensor,
    classes: list[int],
    ipc: int,
    num_steps: int,
    noise_fn: Callable[[int, int], tuple[Tensor, Tensor]],
    *,
    k: float = 5.0,
    gamma: float = 120.0,
    low: int = 30,
    high: int = 45,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    cfg_channels: int = 3,
    memory_size: int = 64,
    housekeeping: bool = False,
) -> dict[tuple[int, int], Tensor]:
    """Generate ipc images per class, classes one after another, one image per model call.

    model: DiT in eval mode, forward(x, t, y) -> [B, 2C, H, W]; decode: latents [B, C, H, W] -> surrogate
    input images; surrogate: classifier whose parameters are replaced by flat_params[k] ([K, P]);
    real_grads: [num_classes, K, P] (G_k per class); noise_fn(class, i) -> (initial latent [C, H, W],
    step noise [num_steps (or num_steps − 1), 2, C, H, W]) where step noise[j] is added at loop step j
    (j = 0 is the noisiest step; the last step adds none), row 0 to the conditional row, row 1 to the shadow row.
    housekeeping: also run gc.collect() / torch.cuda.empty_cache() after every step, as the authors' loop does.
    -> {(class, i): final latent [C, H, W]} (row 0; the latent the authors decode and keep in memory).
    """
    diffusion = RespacedDiffusion(num_steps)
    results: dict[tuple[int, int], Tensor] = {}
    for label in classes:
        memory: list[Tensor] = []
        for image_index in range(ipc):
            initial, step_noise = noise_fn(label, image_index)
            x = torch.stack([initial, initial])
            y = torch.tensor([label, null_class], device=x.device)
            for loop_step, t in enumerate(reversed(range(num_steps))):
                x = p_sample_igd(
                    model, diffusion, x, t, y, step_noise[loop_step] if t > 0 else None,
                    guided=low <= t <= high, memory=memory, decode=decode, surrogate=surrogate,
                    flat_params=flat_params, class_real_grads=real_grads[label], label=label,
                    k=k, gamma=gamma, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                )
                if housekeeping:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            final = x[0:1].detach()
            results[(label, image_index)] = final[0]
            memory.append(final)
            while len(memory) > memory_size:
                memory.pop(0)
    return results


def p_sample_igd(
    model: nn.Module,
    diffusion: RespacedDiffusion,
    x: Tensor,
    t: int,
    y: Tensor,
    noise: Tensor | None,
    *,
    guided: bool,
    memory: list[Tensor],
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    class_real_grads: Tensor,
    label: int,
    k: float,
    gamma: float,
    cfg_scale: float,
    cfg_channels: int,
) -> Tensor:
    """One ancestral step x_t -> x_{t−1} of the [cond; uncond] pair x: [2, C, H, W], IGD-guided when `guided`."""
    x_t = x.detach().requires_grad_(True)
    timesteps = torch.full((x.shape[0],), diffusion.timestep_map[t], device=x.device, dtype=torch.long)
    with torch.enable_grad():
        model_output = forward_with_cfg(model, x_t, timesteps, y, cfg_scale, cfg_channels)
        out = diffusion.p_mean_variance(model_output, x_t, t)
        sample = out["mean"]
        if noise is not None:
            sample = sample + torch.exp(0.5 * out["log_variance"]) * noise
        sample = sample.detach()
        if not guided:
            return sample
        if memory:
            sample = sample - gamma * deviation_gradient(x_t, memory)
        grad = influence_gradient(x_t, out["pred_xstart"], decode, surrogate, flat_params, class_real_grads, label)
    alpha_bar = float(diffusion.alphas_cumprod[t])
    eps_row0, grad_row0 = out["eps"][0].detach(), grad[0]
    rho = RHO_CONSTANT * (1.0 - alpha_bar) ** 0.5 * rms(eps_row0) / rms(grad_row0)
    update = torch.zeros_like(sample)
    update[0] = k * rho * grad_row0
    return sample - update
