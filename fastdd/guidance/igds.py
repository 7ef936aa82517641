"""IGDS information guidance (Ye et al., "Information-Guided Diffusion Sampling for Dataset Distillation",
arXiv 2507.04619), SPEC "IGDS". No official code is public; this is written from the paper summary.

A variational estimator (VE) made of an encoder f (x -> unit embedding x̂ [d]) and a classifier g (x̂ -> logits)
gives Î(X;Y) = H(Ŷ) + E log P(ŷ = y | x) and Ĥ(X|Y) = E KL(σ(x̂) ‖ Q_y). Sampling maximises
    L = E log P(ŷ = y | x) + H(Ŷ) + β · E KL(σ(x̂) ‖ Q_y)
with x_{t-1} = x'_{t-1} + η · ∇_{x_t} L (gradient ascent: L is a reward, η >= 0 increases it).

Assumptions (none of these is fixed by the paper summary; each is a choice made here):
 1. Encoder f: fastdd's ConvNet (depth × [conv3×3 → instance norm → ReLU → avgpool2], width 64) whose final
    Linear is the projection head to d = 128; x̂ = f(x) / ‖f(x)‖ (L2-normalised, as in MoCo). Depth defaults to
    the largest ≤ 6 leaving a ≥ 2×2 map (6 at 256 px = SPEC's ConvNet-6; 3 at 16 px).
 2. Contrastive training is MoCo-style with a momentum key encoder (m = 0.99, MoCo v3's value for short runs)
    and a FIFO queue of keys (default min(4096, N // 2) so that the queue stays well below the dataset size);
    the negatives of a query are the other in-batch keys plus the queue; queue_size = 0 gives in-batch
    negatives only. Why the momentum encoder + queue: the paper builds its VE on MoCo, and the queue makes the
    number of negatives independent of the batch size (small batches on a GPU next to a DiT). The instance-
    norm ConvNet has no batch statistics, so MoCo's shuffled BatchNorm is not needed.
 3. InfoNCE: CE over logits q·[k; queue]ᵀ / τ with the positive at the query's own key, τ = 0.07.
 4. σ(x̂) = softmax(x̂ / τ) over the d embedding coordinates (the same τ), i.e. a softmax over d fixed
    prototypes, the standard basis vectors; no learned prototypes. Since ‖x̂‖ = 1, every entry of σ is
    ≥ exp(-2/τ) / d > 0, so log Q_y is finite without clamping.
 5. The training KL term uses Q_y = the mean of σ(x̂) over the batch's query views of class y, detached (a
    target, as Q_Y is a fixed distribution in the paper's KL); a class seen once in a batch contributes 0.
    J_VE = InfoNCE + λ · mean_i KL(σ(x̂_i) ‖ Q_{y_i}), λ = 1 by default, minimised with Adam (lr 1e-3).
 6. The stored class means Q_y used at sampling time are the exact means of σ(f(x)) over all (unaugmented)
    training images of class y, computed once after training with the final encoder.
 7. Augmentation (two views per image): random resized crop (area 0.4–1, aspect 3/4–4/3), optional horizontal
    flip, brightness and contrast jitter 0.4 on the [-1, 1] scale. MoCo v2's grayscale and blur are left out.
 8. Classifier g: a linear probe Linear(d, C) on the frozen normalised embedding x̂ of unaugmented images,
    Adam lr 1e-2, CE.
 9. H(Ŷ) is the entropy of the batch-marginal prediction p̄ = mean_i softmax(g(x̂_i)) over the conditional
    rows of the batch, not the per-sample entropy: Î(X;Y) = H(Ŷ) − H(Ŷ|X) and the per-sample entropy is the
    H(Ŷ|X) part (its maximisation would reward confusing the classifier); E log P(ŷ = y|x) is the variational
    stand-in for −H(Ŷ|X). Consequences: rows of one batch interact through H(Ŷ) (batching several classes
    rewards covering them), and at batch size 1 H(Ŷ) is that image's own prediction entropy, so
    log p_y + H caps the target-class probability near 1/2 instead of pushing it to 1 (≈0.48 for 10 classes).
10. "E" is the mean over the B conditional rows; the gradient is taken of B · L so that a row's step does not
    shrink with the batch size (identical to the paper's L at batch size 1, the authors' one-image setting).
11. The VE sees the decoded predicted clean image D(x̂0(x_t)) (`source="xstart"`, default): fastdd samples a
    latent DiT and the VE is trained on clean images (IGD's convention). `source="sample"` is the paper's
    literal form: the VE sees D(x'_{t-1}), the unguided ancestral sample, differentiated through the posterior
    mean and the learned standard deviation (its noise fixed); use it with ancestral sampling only.
12. Q_y does not depend on t (the paper writes Q_{t-1}; its meaning is not stated): clean-image class means.
13. Guidance is active on every step by default (Algorithm 2 guides each step); the paper's 250-step DDPM is
    GaussianDiffusion(250). No η is published: it has no default.
14. β by IPC (`beta_for_ipc`): 0.5 · log(IPC) / log(50), clipped to [0, 0.5]: 0 at IPC 1, ≈0.29 at IPC 10,
    0.5 at IPC ≥ 50. The paper calibrates β per dataset (its Fig. 5); only the end points are stated.
15. Decoded images are resized (bilinear) to the estimator's input size when they differ, in [-1, 1] with no
    further normalisation.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.atomic import save_safetensors_atomic
from ..data.augment import crop_sides
from ..data.dataset import TensorBatches
from ..data.latents import EncodedBatches
from ..models.convnet import ConvNet
from ..progress import progress_bar
from ..sampling.sampler import Guidance, StepContext

DEFAULT_TAU = 0.07


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def default_depth(im_size: int, max_depth: int = 6) -> int:
    """The largest depth <= max_depth leaving a final map of at least 2×2.

    At that depth im_size is divisible by 2**depth.

    Args:
        im_size: image side.
        max_depth: the largest depth considered.

    Returns:
        The depth (>= 1).

    Raises:
        ValueError: if no depth fits (im_size is not an even number >= 4).
    """
    depth = 0
    while depth < max_depth and im_size % 2 ** (depth + 1) == 0 and im_size // 2 ** (depth + 1) >= 2:
        depth += 1
    if depth == 0:
        raise ValueError(f"im_size must be an even number >= 4, got {im_size}")
    return depth


def beta_for_ipc(ipc: int) -> float:
    """β of L for a target IPC: 0.5 · log(ipc) / log(50) clipped to [0, 0.5].

    0 at IPC 1, 0.5 at IPC >= 50.

    Args:
        ipc: images per class, an integer >= 1.

    Returns:
        β.

    Raises:
        ValueError: if ipc is not an integer >= 1.
    """
    if isinstance(ipc, bool) or int(ipc) != ipc or ipc < 1:
        raise ValueError(f"ipc must be an integer >= 1, got {ipc!r}")
    return min(0.5, 0.5 * math.log(ipc) / math.log(50))


class InformationEstimator(nn.Module):
    """The variational estimator: encoder f, linear classifier g on x̂, class means Q of σ(x̂).

    images: [B, channel, H, W] in [-1, 1] (resized to im_size if H, W differ). embed -> x̂ [B, dim] (unit rows);
    sigma(x̂) = softmax(x̂ / tau) [B, dim]; forward -> (logits [B, num_classes], σ [B, dim]).
    class_means: [num_classes, dim] buffer (rows sum to 1).
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: int,
        *,
        dim: int = 128,
        width: int = 64,
        depth: int | None = None,
        tau: float = DEFAULT_TAU,
    ):
        super().__init__()
        _check_positive("tau", tau)
        for name, value in (("channel", channel), ("num_classes", num_classes), ("dim", dim), ("width", width)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        depth = default_depth(im_size) if depth is None else depth
        self.channel, self.num_classes, self.im_size = channel, num_classes, im_size
        self.dim, self.width, self.depth, self.tau = dim, width, depth, float(tau)
        self.encoder = ConvNet(channel, dim, width=width, depth=depth, im_size=im_size)
        self.classifier = nn.Linear(dim, num_classes)
        self.register_buffer("class_means", torch.full((num_classes, dim), 1.0 / dim))

    @property
    def config(self) -> dict:
        """The constructor arguments (stored by `save`, used by `load`)."""
        return {
            "channel": self.channel,
            "num_classes": self.num_classes,
            "im_size": self.im_size,
            "dim": self.dim,
            "width": self.width,
            "depth": self.depth,
            "tau": self.tau,
        }

    def embed(self, images: Tensor) -> Tensor:
        """x̂ = f(x) / ‖f(x)‖.

        Args:
            images: [B, channel, H, W] in [-1, 1] (cast to the estimator's dtype, resized bilinearly to im_size if
                H, W differ).

        Returns:
            [B, dim] unit rows.

        Raises:
            ValueError: if images is not [B, channel, H, W].
        """
        if images.dim() != 4 or images.shape[1] != self.channel:
            raise ValueError(f"images: expected [B, {self.channel}, H, W], got {list(images.shape)}")
        images = images.to(self.class_means.dtype)
        if images.shape[-2:] != (self.im_size, self.im_size):
            images = F.interpolate(images, size=(self.im_size, self.im_size), mode="bilinear", align_corners=False)
        return F.normalize(self.encoder(images), dim=1)

    def sigma(self, embedding: Tensor) -> Tensor:
        """σ(x̂) = softmax(x̂ / tau) over the dim coordinates.

        Args:
            embedding: [B, dim].

        Returns:
            [B, dim] rows summing to 1.
        """
        return torch.softmax(embedding / self.tau, dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Classifier logits and σ of the embedding.

        Args:
            images: [B, channel, H, W] in [-1, 1] (see `embed`).

        Returns:
            (logits [B, num_classes], σ [B, dim]).

        Raises:
            ValueError: if images is not [B, channel, H, W].
        """
        embedding = self.embed(images)
        return self.classifier(embedding), self.sigma(embedding)

    @torch.no_grad()
    def set_class_means(self, images: Tensor | Iterable[tuple[Tensor, Tensor]], labels: Tensor | None = None) -> None:
        """Set Q_y = mean of σ(f(x)) over the images of class y, without grad.

        Args:
            images: [N, C, H, W] (with labels [N]), or batches (images [b, C, H, W], labels [b]) covering the real
                images once.
            labels: the classes of a tensor of images (every class present).

        Raises:
            ValueError: if a class has no images.
        """
        batches = (
            TensorBatches(images, labels).batches(torch.arange(len(labels)), 512) if labels is not None else images
        )
        sums = torch.zeros_like(self.class_means)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=self.class_means.device)
        for batch, labels in batches:
            labels = labels.to(self.class_means.device)
            sums.index_add_(0, labels, self.sigma(self.embed(batch.to(self.class_means.device))))
            counts += torch.bincount(labels, minlength=self.num_classes)
        if bool((counts == 0).any()):
            raise ValueError(f"labels: every class 0..{self.num_classes - 1} needs images, counts {counts.tolist()}")
        self.class_means.copy_(sums / counts[:, None].to(sums.dtype))

    def save(self, path: str | Path) -> None:
        """Weights and config as safetensors, written atomically.

        Args:
            path: the file to write.
        """
        save_safetensors_atomic(self.state_dict(), path, {"fastdd_information_estimator": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> InformationEstimator:
        """An estimator written by `save`, in eval mode with frozen parameters.

        Args:
            path: the safetensors file.
            device: where to put it.

        Returns:
            The InformationEstimator.

        Raises:
            ValueError: if the file does not exist or is not a fastdd information estimator.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: estimator file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "fastdd_information_estimator" not in metadata:
            raise ValueError(f"path: {path} is not a fastdd information estimator (no config metadata)")
        estimator = cls(**json.loads(metadata["fastdd_information_estimator"]))
        estimator.load_state_dict(load_file(str(path)))
        return estimator.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- the guidance loss
def information_terms(images: Tensor, labels: Tensor, estimator: InformationEstimator) -> tuple[Tensor, Tensor, Tensor]:
    """The three terms of L.

    Args:
        images: [B, C, H, W].
        labels: [B].
        estimator: the variational estimator.

    Returns:
        (log P(ŷ = y | x) [B], H(Ŷ) of the batch-marginal prediction (0-dim), KL(σ(x̂) ‖ Q_y) [B]).

    Raises:
        ValueError: if labels is not [B].
    """
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels: expected shape [{images.shape[0]}], got {list(labels.shape)}")
    embedding = estimator.embed(images)
    log_probs = torch.log_softmax(estimator.classifier(embedding), dim=1)  # [B, classes]
    log_likelihood = log_probs.gather(1, labels[:, None]).squeeze(1)
    log_marginal = torch.logsumexp(log_probs, dim=0) - math.log(images.shape[0])  # log p̄
    marginal_entropy = -(log_marginal.exp() * log_marginal).sum()
    log_sigma = torch.log_softmax(embedding / estimator.tau, dim=1)
    kl = (log_sigma.exp() * (log_sigma - estimator.class_means[labels].log())).sum(1)
    return log_likelihood, marginal_entropy, kl


def information_loss(images: Tensor, labels: Tensor, estimator: InformationEstimator, beta: float) -> Tensor:
    """The IGDS objective L, to be maximised.

    L = mean_i log P(ŷ = y_i | x_i) + H(Ŷ) + β · mean_i KL(σ(x̂_i) ‖ Q_{y_i}).

    Args:
        images: [B, C, H, W].
        labels: [B].
        estimator: the variational estimator.
        beta: β >= 0.

    Returns:
        0-dim L.

    Raises:
        ValueError: if beta < 0 or labels is not [B].
    """
    _check_non_negative("beta", beta)
    log_likelihood, marginal_entropy, kl = information_terms(images, labels, estimator)
    return log_likelihood.mean() + marginal_entropy + beta * kl.mean()


def information_gradient(
    x_t: Tensor,
    pred_xstart: Tensor,
    decode: Callable[[Tensor], Tensor],
    estimator: InformationEstimator,
    y: Tensor,
    beta: float,
    *,
    retain_graph: bool = False,
) -> Tensor:
    """∇_{x_t} (B · L(decode(pred_xstart))): the drop-in IGDS gradient for other sampling loops.

    Example:
        g = information_gradient(x_t, x0, decode, estimator, y, beta_for_ipc(ipc))
        x_prev = x_prev + eta * g

    Args:
        x_t: [B, C, H, W] with requires_grad.
        pred_xstart: [B, C, H, W] x̂0 computed from x_t with autograd recording the model forward (or x'_{t-1}
            for the paper's literal form).
        decode: latents -> images in [-1, 1].
        estimator: the variational estimator.
        y: [B] class labels.
        beta: β >= 0.
        retain_graph: keep the graph for a later backward.

    Returns:
        [B, C, H, W] gradient w.r.t. x_t.

    Raises:
        ValueError: if beta < 0 or y is not [B].
    """
    loss = pred_xstart.shape[0] * information_loss(decode(pred_xstart), y, estimator, beta)
    (grad,) = torch.autograd.grad(loss, x_t, retain_graph=retain_graph)
    return grad


class InformationGuidance(Guidance):
    """IGDS as a sampler guidance: delta = η · ∇_{x_t} (B · L) on the conditional rows (shadow rows: 0).

    decode: latents -> images in [-1, 1] (e.g. `LatentCodec.decode`); eta: step size η >= 0 (no published value);
    beta: weight of the KL term, see `beta_for_ipc`; low / high: active respaced indices (default all);
    source: "xstart" (VE on D(x̂0), default) or "sample" (VE on D(x'_{t-1}), the paper's literal form; ancestral
    sampling only).
    """

    requires_grad = True
    capturable = True

    def __init__(
        self,
        decode: Callable[[Tensor], Tensor],
        estimator: InformationEstimator,
        eta: float,
        beta: float = 0.0,
        *,
        low: int = 0,
        high: float = math.inf,
        source: str = "xstart",
    ):
        _check_non_negative("eta", eta)
        _check_non_negative("beta", beta)
        if source not in ("xstart", "sample"):
            raise ValueError(f"source must be 'xstart' or 'sample', got {source!r}")
        self.decode, self.estimator, self.eta, self.beta = decode, estimator, float(eta), float(beta)
        self.low, self.high, self.source = low, high, source

    def step(self, ctx: StepContext) -> Tensor:
        """The update η · ∇_{x_t} (B · L) on the conditional rows.

        Args:
            ctx: the step's context: x_t [R, C, H, W] (R = rows, or 2·rows in compat mode) with the model forward
                recorded; the VE sees D(pred_xstart) or, with source="sample", D(x'_{t-1}).

        Returns:
            [R, C, H, W] delta: the update on the first ctx.rows rows, zeros on the shadow rows.
        """
        rows = ctx.rows
        if self.source == "xstart":
            latents = ctx.pred_xstart[:rows]
        else:  # x'_{t-1} = mean + std · noise with the step's noise recovered from the (detached) sample
            mean, std = ctx.mean[:rows], torch.exp(0.5 * ctx.log_variance[:rows])
            noise = (ctx.sample[:rows] - mean.detach()) / std.detach()
            latents = mean + std * noise
        loss = rows * information_loss(self.decode(latents), ctx.y[:rows], self.estimator, self.beta)
        update = self.eta * ctx.grad(loss)[:rows]
        return F.pad(update, (0, 0, 0, 0, 0, 0, 0, ctx.x_t.shape[0] - rows))


# --------------------------------------------------------------------------- training the estimator
def augment(
    images: Tensor,
    generator: torch.Generator,
    *,
    crop_scale: Sequence[float] = (0.4, 1.0),
    flip: bool = True,
    jitter: float = 0.4,
) -> Tensor:
    """One random view per image (assumption 7), batched with affine_grid.

    Args:
        images: [B, C, H, W] in [-1, 1].
        generator: CPU generator of every draw.
        crop_scale: (low, high) range of the crop area fraction.
        flip: random horizontal flips.
        jitter: brightness and contrast jitter on the [-1, 1] scale.

    Returns:
        [B, C, H, W] views, clamped to [-1, 1].
    """
    batch = images.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.empty(batch).uniform_(low, high, generator=generator)

    area = uniform(*crop_scale)
    log_aspect = uniform(math.log(3 / 4), math.log(4 / 3))
    height, width = (side.clamp(max=1.0) for side in crop_sides(area, log_aspect.exp()))  # fractions of the sides
    centre_x = (1 - width) * uniform(-1.0, 1.0)
    centre_y = (1 - height) * uniform(-1.0, 1.0)
    mirror = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = uniform(1 - jitter, 1 + jitter).to(views).view(-1, 1, 1, 1)
    brightness = uniform(-jitter, jitter).to(views).view(-1, 1, 1, 1)
    centre = views.mean(dim=(1, 2, 3), keepdim=True)
    return ((views - centre) * contrast + centre + brightness).clamp(-1, 1)


def info_nce(queries: Tensor, keys: Tensor, queue: Tensor, tau: float) -> Tensor:
    """MoCo InfoNCE: CE of logits q·[k; queue]ᵀ / tau with query i's positive at key i.

    Args:
        queries: [B, d] unit rows.
        keys: [B, d] unit rows.
        queue: [Q, d] (Q may be 0).
        tau: temperature.

    Returns:
        0-dim loss.
    """
    logits = queries @ torch.cat([keys, queue]).T / tau
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=queries.device))


def class_mean_kl(sigma: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """mean_i KL(σ_i ‖ Q_{y_i}) with Q_y the detached mean of σ over the batch rows of class y.

    Args:
        sigma: [B, d] rows of σ.
        labels: [B].
        num_classes: number of classes.

    Returns:
        0-dim KL.
    """
    one_hot = F.one_hot(labels, num_classes).to(sigma.dtype)  # [B, classes]
    means = (one_hot.T @ sigma.detach()) / one_hot.sum(0).clamp_min(1)[:, None]
    return (sigma * (sigma.log() - means[labels].log())).sum(1).mean()


def _check_training_data(images: Tensor, labels: Tensor, num_classes: int | None) -> int:
    """num_classes, after checking the images (a tensor, or one batch of a batch source) and every label."""
    if images.dim() != 4 or (labels.shape != (images.shape[0],) and images.shape[0] != 1):
        raise ValueError(
            f"images, labels: expected [N, C, H, W] and [N], got {list(images.shape)} and {list(labels.shape)}"
        )
    if labels.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images, got {labels.shape[0]}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected square images, got {list(images.shape[-2:])}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinite values")
    if labels.dtype not in (torch.int32, torch.int64) or int(labels.min()) < 0:
        raise ValueError("labels must be non-negative integer class indices")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels.long(), minlength=num_classes)
    if counts.shape[0] != num_classes:
        raise ValueError(f"labels: values up to {int(labels.max())} do not fit num_classes={num_classes}")
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"labels: empty class(es) {empty}: every class needs at least one image")
    return num_classes


def train_information_estimator(
    images: Tensor | EncodedBatches,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    *,
    dim: int = 128,
    width: int = 64,
    depth: int | None = None,
    tau: float = DEFAULT_TAU,
    lam: float = 1.0,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    momentum: float = 0.99,
    queue_size: int | None = None,
    classifier_epochs: int = 100,
    classifier_lr: float = 1e-2,
    crop_scale: Sequence[float] = (0.4, 1.0),
    flip: bool = True,
    jitter: float = 0.4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> InformationEstimator:
    """Train the VE on (images, labels).

    Stage 1 (`epochs`): encoder with J_VE = InfoNCE(τ) + lam · KL to in-batch class means, momentum key encoder
    and a key queue. Stage 2: the class means Q over the unaugmented images. Stage 3 (`classifier_epochs`): the
    linear classifier on frozen x̂. Seeded: parameters from torch.manual_seed(seed), batch order and
    augmentations from a generator seeded too.

    Args:
        images: [N, C, S, S] in [-1, 1] (N >= 2, finite), or a batch source (`fastdd.data.latents.EncodedBatches`:
            the real images read batch by batch, so that no more than one batch is held; its `labels` are the
            classes; the frozen features of the classifier stage go to a temporary file, not to memory).
        labels: [N] integer classes (with a tensor of images).
        num_classes: number of classes (default: labels.max() + 1); every class needs an image.
        dim: embedding dimension d.
        width: ConvNet width.
        depth: ConvNet depth (default: `default_depth`).
        tau: temperature τ > 0.
        lam: λ >= 0, weight of the KL term.
        epochs: encoder epochs (>= 0).
        batch_size: batch size (>= 2).
        lr: encoder Adam learning rate.
        momentum: key encoder momentum in [0, 1).
        queue_size: key queue length in 0..N (None: min(4096, N // 2); 0: in-batch negatives only).
        classifier_epochs: classifier epochs (>= 0).
        classifier_lr: classifier Adam learning rate.
        crop_scale: see `augment`.
        flip: see `augment`.
        jitter: see `augment`.
        seed: the seed.
        device: where to train.
        progress: show progress bars.

    Returns:
        InformationEstimator (eval, frozen) with `history` = {"info_nce": [...], "kl": [...],
        "classifier_ce": [...]} (epoch means).

    Raises:
        ValueError: if images / labels are malformed (see the arguments) or an argument is out of range.
    """
    source = TensorBatches(images, labels) if isinstance(images, Tensor) else images
    labels = source.labels.long()
    first, _ = next(source.batches(torch.arange(1), 1))
    num_classes = _check_training_data(images if isinstance(images, Tensor) else first, labels, num_classes)
    _check_positive("tau", tau)
    _check_non_negative("lam", lam)
    for name, value in (("epochs", epochs), ("classifier_epochs", classifier_epochs)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    _check_positive("lr", lr)
    _check_positive("classifier_lr", classifier_lr)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    count = len(labels)
    queue_size = min(4096, count // 2) if queue_size is None else queue_size
    if not 0 <= queue_size <= count:
        raise ValueError(f"queue_size must be in 0..{count} (the number of images), got {queue_size}")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    estimator = InformationEstimator(
        first.shape[1], num_classes, first.shape[-1], dim=dim, width=width, depth=depth, tau=tau
    ).to(device)
    key_encoder = copy.deepcopy(estimator.encoder).requires_grad_(False)
    queue = F.normalize(torch.randn(queue_size, dim, generator=generator), dim=1).to(device)
    queue_position = 0
    optimizer = torch.optim.Adam(estimator.encoder.parameters(), lr=lr)
    history: dict[str, list[float]] = {"info_nce": [], "kl": [], "classifier_ce": []}

    estimator.train()
    for _ in progress_bar(range(epochs), desc="IGDS estimator", disable=not progress):
        sums = torch.zeros(2)
        order = torch.randperm(count, generator=generator)
        for batch, batch_labels in source.batches(order, batch_size):
            if not bool(torch.isfinite(batch).all()):
                raise ValueError("images contain NaN or infinite values")
            batch, batch_labels = batch.cpu(), batch_labels.to(device)
            view_q = augment(batch, generator, crop_scale=crop_scale, flip=flip, jitter=jitter).to(device)
            view_k = augment(batch, generator, crop_scale=crop_scale, flip=flip, jitter=jitter).to(device)
            queries = estimator.embed(view_q)
            with torch.no_grad():
                keys = F.normalize(key_encoder(view_k), dim=1)
            contrastive = info_nce(queries, keys, queue, tau)
            kl = class_mean_kl(estimator.sigma(queries), batch_labels, num_classes)
            optimizer.zero_grad(set_to_none=True)
            (contrastive + lam * kl).backward()
            optimizer.step()
            with torch.no_grad():
                for key_param, param in zip(key_encoder.parameters(), estimator.encoder.parameters()):
                    key_param.lerp_(param, 1.0 - momentum)
                if queue_size:
                    kept = keys[-queue_size:]
                    queue[(queue_position + torch.arange(len(kept), device=device)) % queue_size] = kept
                    queue_position = (queue_position + len(kept)) % queue_size
            sums += torch.stack([contrastive.detach(), kl.detach()]).cpu() * len(batch_labels)
        history["info_nce"].append(float(sums[0]) / count)
        history["kl"].append(float(sums[1]) / count)

    estimator.eval().requires_grad_(False)
    in_order = torch.arange(count)
    estimator.set_class_means(source.batches(in_order, 512))
    with tempfile.TemporaryDirectory() as scratch:  # the frozen features of every image, on disk, not in memory
        features = np.lib.format.open_memmap(f"{scratch}/features.npy", "w+", np.float32, (count, dim))
        with torch.no_grad():
            start = 0
            for batch, _ in source.batches(in_order, 512):
                features[start : start + len(batch)] = estimator.embed(batch.to(device)).cpu().numpy()
                start += len(batch)
        estimator.classifier.requires_grad_(True)
        probe_optimizer = torch.optim.Adam(estimator.classifier.parameters(), lr=classifier_lr)
        for _ in progress_bar(range(classifier_epochs), desc="IGDS classifier", disable=not progress):
            total = 0.0
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, batch_size):
                index = order[start : start + batch_size]
                batch_features = torch.from_numpy(features[index.numpy()])
                loss = F.cross_entropy(estimator.classifier(batch_features.to(device)), labels[index].to(device))
                probe_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                probe_optimizer.step()
                total += float(loss.detach()) * len(index)
            history["classifier_ce"].append(total / count)
        del features
    estimator.requires_grad_(False)
    estimator.history = history
    return estimator
