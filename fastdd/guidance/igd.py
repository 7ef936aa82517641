"""IGD, influence-guided diffusion (Chen et al., ICLR 2025), SPEC "IGD": the whole method's math.

Deviation guidance G_D (step 1): G_D(x_t) = cos(x_t, m*), m* = argmax_{m ∈ M_c} cos(x_t, m) over the class memory
M_c of final latents of earlier images of the same class (capacity 64, FIFO, or SAM's most-similar pop); the update
−γ·∇G_D is added to the sample with no adaptive scale (γ = 120 for DiT weights, 100 for Minimax weights).

Influence guidance G_I: G_I(x̂0) = (1/K) Σ_k (1 − cos(∇_θ CE(f_θk(D(x̂0)), c), G_k,c)) on the decoded predicted
clean image, differentiated w.r.t. x_t through the decoder and the diffusion model, and applied with the adaptive
scale ρ_t = 0.0015 · √(1 − ᾱ_t) · RMS(ε) / RMS(∇G_I) · k (0.0015 is the authors' constant; the paper's formula has
none). One backward for all K checkpoints (the authors run K); per-sample gradient cosines come from
`fastdd.ops.grad_cosine` without materialising per-sample gradients.

Surrogate (SPEC "Surrogate training"): train a ConvNet trajectory on real data (SGD lr 0.01, momentum 0.9, wd 5e-4,
batch 64, parameters saved after every epoch: E + 1 snapshots including epoch 0; augmentation: random resized crop
(scale 0.5–1) and, unless disabled (digits), horizontal flips), pick checkpoints with Algorithm 2, compute the
per-class real gradients G_k,c, and save everything in one safetensors file (`SurrogateBundle`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

from .. import ops
from ..data.atomic import save_safetensors_atomic
from ..data.augment import color_jitter_lighting, random_resized_crop
from ..data.real import RealData, as_real_data
from ..models.convnet import ConvNet
from ..ops.reference import unflatten_params
from ..parallel import data_parallel, group_rank, rank_batches
from ..progress import progress_bar
from ..sampling.sampler import Guidance, ImageId, StepContext


# ----------------------------------------------------------------------------------------- deviation guidance
def deviation_gradient(x_t: Tensor, memory: Tensor, count: Tensor | int | None = None) -> Tensor:
    """∇_{x_t} max_j cos(x_t, memory_j) per row (zero where the memory is empty).

    Drop-in for other loops: s = s - gamma * deviation_gradient(x_t, memory).

    Args:
        x_t: [B, C, H, W] latents (detached: no graph back to the caller's x_t).
        memory: [M, C·H·W] memory rows; rows >= count are not valid.
        count: number of valid rows: None (all M), an int, or a 0-dim integer tensor on memory's device.

    Returns:
        [B, C, H, W] gradient of each row's max cosine, in x_t's dtype.
    """
    query = x_t.detach().flatten(1).requires_grad_(True)
    with torch.enable_grad():
        values, _ = ops.max_cosine(query, memory, count)
        (grad,) = torch.autograd.grad(values.sum(), query)
    return grad.view_as(x_t)


class DeviationGuidance(Guidance):
    """G_D with one `fastdd.ops.CosineMemory` per class; memories persist across batches of the same class.

    In a batch each row queries its own class's memory (one image per class per batch keeps the
    one-at-a-time order). After each batch the final latents are added to their class memory. In the official
    2-row loop only the conditional row receives the update, as in the authors' `p_sample` (RAE-IGD
    `IGD/diffusion/gaussian_diffusion.py` lines 489–502: `used_sample0, _ = sample.chunk(2)`, the deviation is
    subtracted from it and written back into row 0 at line 556); the shadow row never gets it.
    """

    capturable = True  # memories are updated in place; the rows' memories are fixed by the batch's classes

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        gamma: float = 120.0,
        capacity: int = 64,
        policy: str = "fifo",
        low: int = 30,
        high: int = 45,
        device: torch.device | str = "cpu",
    ):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.gamma, self.low, self.high = gamma, low, high
        self.memories = [
            ops.CosineMemory(capacity, dim, policy=policy, device=device, dtype=torch.float32)
            for _ in range(num_classes)
        ]

    def step(self, ctx: StepContext) -> Tensor:
        """The update −γ·∇G_D of each conditional row against its class's memory.

        Args:
            ctx: the step's context: x_t [R, C, H, W] (R = rows, or 2·rows in compat mode); image_ids give each
                row's class on the host.

        Returns:
            [R, C, H, W] delta: the update on the first ctx.rows rows, zeros on the shadow rows.
        """
        rows = ctx.rows
        x_t = ctx.x_t[:rows].detach()
        grads = []
        for b, (label, _, _) in enumerate(ctx.image_ids):  # host-side labels: no sync
            memory = self.memories[label]
            grads.append(deviation_gradient(x_t[b : b + 1], memory.buffer, memory.count))
        update = -self.gamma * torch.cat(grads)
        return torch.cat([update, torch.zeros_like(ctx.x_t[rows:])])

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        """Add each final latent (flattened, as float32) to its class's memory.

        Args:
            final_latents: [B, C, H, W] final latents of the real rows.
            labels: [B] class of each row.
        """
        for latent, label in zip(final_latents.detach(), labels.tolist()):
            self.memories[label].add(latent.flatten().float())


# ----------------------------------------------------------------------------------------- influence guidance
RHO_CONSTANT = 0.0015


def rms(t: Tensor) -> Tensor:
    """Root mean square per row.

    Args:
        t: [B, ...] tensor.

    Returns:
        [B, 1, ..., 1] (t's number of dims, e.g. [B, 1, 1, 1]), broadcastable to t.
    """
    return t.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (t.dim() - 1)))


def adaptive_scale(eps: Tensor, grad: Tensor, alpha_bar: float, k: float, constant: float = RHO_CONSTANT) -> Tensor:
    """ρ_t · k per row = constant · √(1 − ᾱ_t) · RMS(ε) / RMS(g) · k.

    Args:
        eps: [B, C, H, W] predicted noise ε.
        grad: [B, C, H, W] guidance gradient g (its RMS is clamped at 1e-20).
        alpha_bar: ᾱ_t of the step.
        k: the multiplier k.
        constant: the authors' constant (0.0015).

    Returns:
        [B, 1, 1, 1] scale per row.
    """
    return constant * (1.0 - alpha_bar) ** 0.5 * rms(eps) / rms(grad).clamp_min(1e-20) * k


def influence_loss(
    images: Tensor,
    labels: Tensor,
    surrogate: nn.Module,
    flat_params: Tensor,
    real_grads: Tensor,
    groups: Tensor | None = None,
) -> Tensor:
    """Σ over images (or groups) of (1/K) Σ_k (1 − cos(g_k, G_k)).

    One scalar, so one backward serves every row.

    Args:
        images: [R, C, H, W] images.
        labels: [R] class labels.
        surrogate: the surrogate network (its own parameter values are not used).
        flat_params: [K, P] flattened parameters of the K checkpoints.
        real_grads: [K, P] (one class) or [G, K, P] (per row/group) real gradients G_k.
        groups: None or [R] group ids 0..G-1: the rows of a group give one gradient (see
            `fastdd.ops.grad_cosine`).

    Returns:
        0-dim loss.
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

    Example:
        g = influence_gradient(x_t, x0, decode, surrogate, flat_params, real_grads, y)
        s = s - adaptive_scale(eps, g, alpha_bar_t, k) * g

    Args:
        x_t: [B, C, H, W] latents with requires_grad.
        pred_xstart: [B, C, H, W] x̂0 computed from x_t with autograd recording the model forward.
        decode: latents -> images in the surrogate's input range.
        surrogate: the surrogate network (its own parameter values are not used).
        flat_params: [K, P] flattened checkpoint parameters.
        real_grads: [K, P] or [B, K, P] real gradients.
        y: [B] class labels.
        groups: None or [B] group ids (see `influence_loss`).

    Returns:
        [B, C, H, W] gradient w.r.t. x_t.
    """
    loss = influence_loss(decode(pred_xstart), y, surrogate, flat_params, real_grads, groups)
    (grad,) = torch.autograd.grad(loss, x_t)
    return grad


class InfluenceGuidance(Guidance):
    """IGD's G_I as a sampler guidance, active on respaced indices [low, high] (default [30, 45] of 50).

    real_grads: [num_classes, K, P] (G_k per class), or a mapping class -> [K, P] read when a batch needs the class
    (e.g. `fastdd.data.latents.ClassCache`: with 1,000 classes only the current batch's classes are held).
    compat=True reproduces the authors' shadow row: the unconditional row of each CFG pair is decoded too and its CE
    averaged with the conditional row's (one gradient per pair); the update is applied to the conditional rows only.
    """

    requires_grad = True
    capturable = True

    def __init__(
        self,
        decode: Callable[[Tensor], Tensor],
        surrogate: nn.Module,
        flat_params: Tensor,
        real_grads: Tensor | Mapping[int, Tensor],
        *,
        k: float = 5.0,
        low: int = 30,
        high: int = 45,
        compat: bool = False,
    ):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if isinstance(real_grads, Tensor) and (real_grads.dim() != 3 or real_grads.shape[1:] != flat_params.shape):
            raise ValueError(
                f"real_grads must be [num_classes, K, P] with [K, P] = {tuple(flat_params.shape)}, got {tuple(real_grads.shape)}"
            )
        self.decode, self.surrogate, self.k, self.low, self.high, self.compat = decode, surrogate, k, low, high, compat
        self.flat_params, self.real_grads = flat_params, real_grads
        self._batch_grads: Tensor | None = None  # [B, K, P]: each row's class's real gradients

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        """Gather the real gradients of the batch's rows (only the batch's classes are read)."""
        classes = [c for c, _, _ in image_ids]
        if isinstance(self.real_grads, Tensor):
            grads = self.real_grads[torch.tensor(classes, device=self.real_grads.device)]
        else:
            grads = torch.stack([self.real_grads[c] for c in classes])
        if grads.shape[1:] != self.flat_params.shape:
            raise ValueError(
                f"real_grads: rows of shape {list(grads.shape[1:])}, the checkpoints are {list(self.flat_params.shape)}"
            )
        grads = grads.to(device=self.flat_params.device, dtype=self.flat_params.dtype)
        if self._batch_grads is not None and self._batch_grads.shape == grads.shape:
            self._batch_grads.copy_(grads)  # in place, so a step recorded as a CUDA graph reads this batch's rows
        else:
            self._batch_grads = grads

    def step(self, ctx: StepContext) -> Tensor:
        """The update −ρ_t·k·∇G_I on the conditional rows.

        Args:
            ctx: the step's context: x_t [R, C, H, W] (R = rows, or 2·rows in compat mode) with the model forward
                recorded; ctx.y[:rows] selects each row's real gradients.

        Returns:
            [R, C, H, W] delta: the update on the first ctx.rows rows, zeros on the shadow rows.
        """
        rows = ctx.rows
        labels = ctx.y[:rows]  # device labels, and the batch's real gradients gathered by begin_batch: no host sync
        if self._batch_grads is None or self._batch_grads.shape[0] != rows:
            raise ValueError("InfluenceGuidance.step: begin_batch was not called for this batch")
        if self.compat:
            # decode both rows of each [cond; uncond] pair, CE averaged within the pair
            images = self.decode(ctx.pred_xstart)
            groups = torch.arange(ctx.x_t.shape[0], device=labels.device) % rows
            loss = influence_loss(images, labels[groups], self.surrogate, self.flat_params, self._batch_grads, groups)
        else:
            images = self.decode(ctx.pred_xstart[:rows])
            loss = influence_loss(images, labels, self.surrogate, self.flat_params, self._batch_grads)
        grad = ctx.grad(loss)[:rows]
        update = -adaptive_scale(ctx.eps[:rows].detach(), grad, ctx.alpha_bar, self.k) * grad
        return F.pad(update, (0, 0, 0, 0, 0, 0, 0, ctx.x_t.shape[0] - rows))


# --------------------------------------------------------------------------- real gradients and Algorithm 2
REAL_IMAGES_PER_CLASS, REAL_CHUNK = 200, 50  # the real gradients: the class's first 200 images in 4 chunks of 50


def class_mean_gradient(
    surrogate: nn.Module,
    flat_params: Tensor,
    images: Tensor,
    label: int,
    max_images: int = REAL_IMAGES_PER_CLASS,
    chunk: int = REAL_CHUNK,
) -> Tensor:
    """G for one class and parameter set: the mean CE gradient over the class's first images.

    Computed in chunks of `chunk` images and averaged over chunks (the authors' 4 × 50).

    Args:
        surrogate: the surrogate network (its own parameter values are not used).
        flat_params: [P] one flattened parameter set.
        images: [N, C, H, W] images of the class.
        label: the class index.
        max_images: how many of the first images are used.
        chunk: images per chunk.

    Returns:
        [P] float32 gradient.

    Raises:
        ValueError: if images is empty.
    """
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


def class_real_gradients(
    surrogate: nn.Module,
    flat_params: Tensor,
    data: RealData,
    class_index: int,
    max_images: int = REAL_IMAGES_PER_CLASS,
    chunk: int = REAL_CHUNK,
) -> Tensor:
    """G_k,c of one class for every parameter set k: [K, P] float32 (`class_mean_gradient` on the class's first
    max_images images, read now and dropped after)."""
    images = data.class_images(class_index, max_images)
    device = flat_params.device
    return torch.stack([class_mean_gradient(surrogate, p, images.to(device), class_index, max_images, chunk)
                        for p in flat_params])  # fmt: skip


def real_gradients(
    surrogate: nn.Module,
    flat_params: Tensor,
    images: Tensor | RealData,
    labels: Tensor | None,
    num_classes: int,
    **kwargs,
) -> Tensor:
    """G_k,c for every class c and parameter set k, one class's images read at a time.

    Args:
        surrogate: the surrogate network (its own parameter values are not used).
        flat_params: [K, P] parameter sets.
        images: [N, C, H, W] real images (sorted by file within a class) with labels [N], or a `RealData`.
        labels: [N] class labels (with a tensor of images).
        num_classes: number of classes.
        **kwargs: max_images, chunk (see `class_mean_gradient`).

    Returns:
        [num_classes, K, P] float32 gradients.

    Raises:
        ValueError: if a class has no images.
    """
    data = as_real_data(images, labels)
    return torch.stack([class_real_gradients(surrogate, flat_params, data, c, **kwargs) for c in range(num_classes)])


SELECTION_RULES = ("paper", "authors")
# DD_IGD's test_ckpts_grad_sim.py (at e0887b3), the authors' Algorithm 2: ImageFolder(ipc=500) keeps each class's first
# 500 files (lines 160-162); one DataLoader(batch_size=500, shuffle=True, drop_last=True) (lines 167-174) is read ONCE,
# before any checkpoint, each class keeping the first 80 of its images in that stream (lines 191-213, --grad-ipc 80 at
# line 302); each class's gradient is one chunk of those 80 (gap = 100 > 80, lines 219-220, 264-278); the cosine has
# +1e-6 (line 251) and is averaged over classes (lines 237-238).
AUTHORS_REAL_IPC, AUTHORS_LOADER_BATCH, AUTHORS_IMAGES_PER_CLASS, AUTHORS_COS_EPS = 500, 500, 80, 1e-6


def authors_selection_indices(labels: Tensor, num_classes: int, seed: int) -> list[Tensor]:
    """The images the authors' Algorithm 2 script computes its gradients on: per class, the dataset indices of the first
    80 images of the class in one shuffled pass over the first 500 images of every class (class-major, as their
    ImageFolder), read in batches of 500 with the last partial batch dropped (fewer than 500 images: one batch of
    all, where their loader would yield nothing). The shuffle is torch.utils.data's, from a generator seeded with
    `seed` (the authors seed the global generator with --seed 1).

    Args:
        labels: [N] class of every dataset image, in dataset order.
        num_classes: number of classes.
        seed: the loader's seed.

    Returns:
        num_classes index tensors (up to 80 each, in stream order).

    Raises:
        ValueError: if a class gets no image (its gradient would be undefined).
    """
    from torch.utils.data import DataLoader, TensorDataset

    pool = torch.cat([torch.nonzero(labels == c).flatten()[:AUTHORS_REAL_IPC] for c in range(num_classes)])
    loader = DataLoader(
        TensorDataset(pool, labels[pool]),
        batch_size=min(AUTHORS_LOADER_BATCH, len(pool)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    chosen: list[list[int]] = [[] for _ in range(num_classes)]
    for indices, classes in loader:
        for index, c in zip(indices.tolist(), classes.tolist()):
            if len(chosen[c]) < AUTHORS_IMAGES_PER_CLASS:
                chosen[c].append(index)
        if min(len(x) for x in chosen) >= AUTHORS_IMAGES_PER_CLASS:
            break
    for c, x in enumerate(chosen):
        if not x:
            raise ValueError(f"class {c}: no image in the authors' Algorithm 2 draw (it has too few images)")
    return [torch.tensor(x, dtype=torch.long) for x in chosen]


@dataclass
class SelectionStatistics:
    """What Algorithm 2 compares, accumulated class by class (one class's gradients in memory at a time).

    mean_grads: [E, P] class-averaged gradient at each of the E snapshots; class_cosines: [E, E] float64 mean over
    classes of Σ g_e·g_r / (‖g_e‖‖g_r‖ + 1e-6) (the authors' per-class cosine)."""

    mean_grads: Tensor
    class_cosines: Tensor

    def similarity(self, rule: str) -> Tensor:
        """[E, E] similarity of snapshot pairs: "paper": the cosine of the class-averaged gradients (the paper's
        Algorithm 2); "authors": the mean of the per-class cosines (test_ckpts_grad_sim.py)."""
        if rule == "authors":
            return self.class_cosines
        unit = F.normalize(self.mean_grads.double(), dim=1)
        return unit @ unit.T


def selection_statistics(
    model: nn.Module,
    snapshots: Tensor,
    class_images: Callable[[int], Tensor],
    num_classes: int,
    chunk: int,
    progress: bool = False,
) -> SelectionStatistics:
    """Algorithm 2's inputs from every snapshot's per-class mean gradients, one class at a time.

    Args:
        model: the surrogate network (its own parameter values are not used).
        snapshots: [E, P] parameter snapshots.
        class_images: c -> [n, C, H, W] the images class c's gradient is the mean CE gradient of.
        num_classes: number of classes.
        chunk: images per chunk (see `class_mean_gradient`).
        progress: show a progress bar over the classes.

    Returns:
        The SelectionStatistics.
    """
    total = torch.zeros(snapshots.shape, dtype=torch.float32)
    cosines = torch.zeros(len(snapshots), len(snapshots), dtype=torch.float64)
    for c in progress_bar(range(num_classes), desc="algorithm 2 gradients", unit="class", disable=not progress):
        images = class_images(c)
        grads = torch.stack([class_mean_gradient(model, snap, images, c, len(images), chunk) for snap in snapshots])
        total += grads.cpu()
        grads = grads.double()
        norms = grads.norm(dim=1)
        cosines += (grads @ grads.T).cpu() / (norms[:, None] * norms[None, :] + AUTHORS_COS_EPS).cpu()
    return SelectionStatistics(total / num_classes, cosines / num_classes)


def walk_checkpoints(similarity: Tensor, threshold: float = 0.7) -> list[int]:
    """Algorithm 2's walk: keep snapshot 0; keep e when its similarity to the last kept snapshot is < threshold.

    Args:
        similarity: [E, E] similarity of snapshot pairs (`SelectionStatistics.similarity`).
        threshold: in (0, 1].

    Returns:
        The kept snapshots, ascending, starting with 0.

    Raises:
        ValueError: if threshold is not in (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    kept = [0]
    for epoch in range(1, similarity.shape[0]):
        if float(similarity[epoch, kept[-1]]) < threshold:
            kept.append(epoch)
    return kept


def select_checkpoints(epoch_class_grads: Tensor, threshold: float = 0.7, rule: str = "paper") -> list[int]:
    """Algorithm 2 on gradients held in memory: the checkpoint epochs.

    Keep epoch 0; walk the epochs and keep e when its similarity to the reference epoch is < threshold, making it
    the new reference. rule "paper": the similarity is the cosine of the class-averaged gradients (the paper's
    Algorithm 2). rule "authors": the mean over classes of each class's cosine Σ g·r / (‖g‖‖r‖ + 1e-6) (the
    authors' test_ckpts_grad_sim.py). The two can keep different epochs.

    Args:
        epoch_class_grads: [E+1, num_classes, P] per-class mean gradients at each epoch.
        threshold: in (0, 1].
        rule: "paper" or "authors".

    Returns:
        The kept epochs, ascending, starting with 0.

    Raises:
        ValueError: if threshold is not in (0, 1] or rule is unknown.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
    grads = epoch_class_grads.double().transpose(0, 1)  # [classes, E, P]
    norms = grads.norm(dim=-1)
    cosines = (grads @ grads.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :] + AUTHORS_COS_EPS)
    statistics = SelectionStatistics(epoch_class_grads.mean(1), cosines.mean(0))
    return walk_checkpoints(statistics.similarity(rule), threshold)


# ----------------------------------------------------------------------------------------- surrogate checkpoints
MAX_CHECKPOINTS = 4  # K of every published Algorithm 2 pick
DIGITS_SURROGATE_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_surrogate.safetensors"


@dataclass
class SurrogateConfig:
    channel: int
    num_classes: int
    width: int = 128
    depth: int = 6
    im_size: int = 256

    def build(self) -> ConvNet:
        """A new ConvNet of this config.

        Returns:
            ConvNet(channel, num_classes, width=width, depth=depth, im_size=im_size).
        """
        return ConvNet(self.channel, self.num_classes, width=self.width, depth=self.depth, im_size=self.im_size)


# the digits default (16×16 grayscale): a small ConvNet-3; the bundle shipped at DIGITS_SURROGATE_PATH is made by
#   fastdd surrogate --out fastdd/assets/digits_surrogate.safetensors
DIGITS_SURROGATE = SurrogateConfig(channel=1, num_classes=10, width=32, depth=3, im_size=16)


def surrogate_config_for(image_shape: tuple[int, int, int], num_classes: int) -> SurrogateConfig:
    """The surrogate ConvNet for images of image_shape.

    ConvNet-6 width 128 when S is a multiple of 64 (SPEC), else the deepest ConvNet (≤ 3 pools, width 32 below
    64 px) that S allows.

    Args:
        image_shape: (C, S, S).
        num_classes: number of classes.

    Returns:
        The SurrogateConfig.

    Raises:
        ValueError: if S is too small or odd for a ConvNet surrogate.
    """
    channels, size, _ = image_shape
    if size % 64 == 0:
        return SurrogateConfig(channels, num_classes, width=128, depth=6, im_size=size)
    depth = 0
    while depth < 3 and size % (2 ** (depth + 1)) == 0 and size // 2 ** (depth + 1) >= 2:
        depth += 1
    if depth == 0:
        raise ValueError(f"image size {size} is too small or odd for a ConvNet surrogate")
    return SurrogateConfig(channels, num_classes, width=128 if size >= 64 else 32, depth=depth, im_size=size)


def train_trajectory(
    config: SurrogateConfig,
    images: Tensor | RealData,
    labels: Tensor | None = None,
    *,
    epochs: int = 50,
    lr: float = 0.01,
    batch_size: int = 64,
    flip: bool = True,
    photometric: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Tensor:
    """Train config.build() with SGD, keeping its parameters after every epoch.

    SGD with momentum 0.9 and weight decay 5e-4; every batch is augmented by random_resized_crop (scale 0.5-1, with
    horizontal flips when flip) and, when photometric, `color_jitter_lighting` (SPEC's ColorJitter 0.4 and lighting
    noise 0.1; RGB images). In a process group of several ranks (torchrun, `fastdd.parallel.process_group`) the
    network trains under DistributedDataParallel, each rank reading its share of every batch.

    Args:
        config: the surrogate architecture.
        images: [N, C, H, W] in [-1, 1] with labels [N], or a `RealData` (read batch by batch).
        labels: [N] class labels (with a tensor of images).
        epochs: number of epochs E.
        lr: learning rate.
        batch_size: batch size (over all ranks).
        flip: random horizontal flips.
        photometric: colour jitter and lighting noise.
        seed: seeds torch.manual_seed (initialisation) and the generator of batch order and augmentation (one
            process: one generator; several ranks: the order from it, each rank's augmentation from its own).
        device: where the model trains.
        progress: show a progress bar.

    Returns:
        [epochs + 1, P] snapshots on the CPU (row 0: the initial parameters).
    """
    data = as_real_data(images, labels)
    rank, world = group_rank()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    augment = generator if world == 1 else torch.Generator().manual_seed(seed * 7919 + rank + 1)
    model = config.build().to(device)
    trained = data_parallel(model, torch.device(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    snapshots = [parameters_to_vector(model.parameters()).detach().cpu().clone()]
    for _ in progress_bar(range(epochs), desc="surrogate epochs", disable=not progress or rank != 0):
        trained.train()
        order = torch.randperm(data.num_images, generator=generator)
        for batch, batch_labels in data.read(rank_batches(order, batch_size, rank, world)):
            batch = random_resized_crop(batch, augment, flip=flip)
            if photometric:
                batch = color_jitter_lighting(batch, augment)
            loss = F.cross_entropy(trained(batch.to(device)), batch_labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        snapshots.append(parameters_to_vector(model.parameters()).detach().cpu().clone())
    return torch.stack(snapshots)


class FileRows(Mapping):
    """{class: [K, P]} read row by row from a safetensors tensor [num_classes, K, P], without loading the rest."""

    def __init__(self, path: str | Path, name: str, rows: int):
        self.path, self.name, self.rows = str(path), name, rows

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        return iter(range(self.rows))

    def __getitem__(self, row: int) -> Tensor:
        from safetensors import safe_open

        if not 0 <= row < self.rows:
            raise KeyError(row)
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.name)[row : row + 1][0]


LAZY_BYTES = 2**30  # a bundle's real gradients above this are read per class rather than loaded whole


@dataclass
class SurrogateBundle:
    """What influence guidance needs: config, flat_params [K, P], epochs [K], and real_grads: [num_classes, K, P], a
    mapping class -> [K, P] read when needed (a large file's rows, a per-class cache), or None (not computed yet)."""

    config: SurrogateConfig
    flat_params: Tensor
    real_grads: Tensor | Mapping[int, Tensor] | None
    epochs: list[int]

    def save(self, path: str | Path) -> None:
        """Write the bundle to a safetensors file, atomically: flat_params and, when held, the real gradients of every
        class ([num_classes, K, P]; a mapping is stacked); config and epochs as JSON metadata.

        Args:
            path: the file to write.
        """
        metadata = {"config": json.dumps(asdict(self.config)), "epochs": json.dumps(self.epochs)}
        tensors = {"flat_params": self.flat_params}
        if self.real_grads is not None:
            real = self.real_grads
            tensors["real_grads"] = (
                real if isinstance(real, Tensor) else torch.stack([real[c] for c in range(len(real))])
            )
        save_safetensors_atomic(tensors, path, metadata)

    def network(self, device: torch.device | str = "cpu") -> nn.Module:
        """The surrogate ConvNet, in eval mode and frozen.

        `grad_cosine` swaps in each row of flat_params as its weights.

        Args:
            device: where to put it.

        Returns:
            The ConvNet of config.
        """
        return self.config.build().to(device).eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path) -> SurrogateBundle:
        """Read a bundle written by `save`: real_grads loaded whole (up to LAZY_BYTES; above, read per class from the
        file), or None when the file has none.

        Args:
            path: the safetensors file.

        Returns:
            The SurrogateBundle (CPU tensors).

        Raises:
            ValueError: if the file does not exist, is not a readable safetensors file or a fastdd surrogate file,
                is malformed, or its flat_params [K, P] / real_grads [num_classes, K, P] do not fit the config.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"surrogate file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                names = set(f.keys())
                flat = f.get_tensor("flat_params") if "flat_params" in names else None
                real_shape = list(f.get_slice("real_grads").get_shape()) if "real_grads" in names else None
        except Exception as err:  # safetensors raises its own error type for files of another format
            raise ValueError(f"surrogate file {path} is not a readable safetensors file ({err})") from None
        if "config" not in metadata:
            raise ValueError(f"{path} is not a fastdd surrogate file (no config metadata)")
        try:
            config = SurrogateConfig(**json.loads(metadata["config"]))
            epochs = json.loads(metadata["epochs"])
            expected = sum(p.numel() for p in config.build().parameters())
            if flat is None:
                raise KeyError("flat_params")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"surrogate file {path} is malformed ({err})") from None
        if flat.dim() != 2 or flat.shape[1] != expected:
            raise ValueError(f"surrogate file {path}: flat_params {list(flat.shape)}, the config needs [K, {expected}]")
        real = None
        if real_shape is not None:
            if real_shape != [config.num_classes, *flat.shape]:
                raise ValueError(
                    f"surrogate file {path}: real_grads {real_shape}, expected [{config.num_classes}, {flat.shape[0]}, {expected}]"
                )
            large = 4 * math.prod(real_shape) > LAZY_BYTES
            real = FileRows(path, "real_grads", real_shape[0]) if large else load_file(str(path))["real_grads"]
        return cls(config, flat, real, epochs)


def load_digits_surrogate() -> SurrogateBundle:
    """The surrogate bundle shipped for the digits default.

    Returns:
        The SurrogateBundle of `fastdd/assets/digits_surrogate.safetensors`.
    """
    return SurrogateBundle.load(DIGITS_SURROGATE_PATH)


def select_epochs(
    config: SurrogateConfig,
    snapshots: Tensor,
    data: RealData,
    *,
    threshold: float = 0.7,
    max_checkpoints: int | None = MAX_CHECKPOINTS,
    selection: str = "paper",
    seed: int = 0,
    max_images: int = REAL_IMAGES_PER_CLASS,
    chunk: int = REAL_CHUNK,
    progress: bool = False,
) -> list[int]:
    """Algorithm 2 on the real data, one class's images read at a time: the kept snapshot indices.

    Args:
        config: the surrogate architecture.
        snapshots: [E + 1, P] parameter snapshots.
        data: the real images.
        threshold: Algorithm 2's threshold.
        max_checkpoints: keep at most this many of the checkpoints Algorithm 2 selects, the first ones (every
            published pick has K = 4; noisy small data can make Algorithm 2 keep almost every epoch); said on stderr
            when it applies. None: no cap.
        selection: Algorithm 2's rule and inputs. "paper": the cosine of the class-averaged gradients, each class's
            gradient on its first max_images images in chunks of `chunk` (as the real gradients); "authors": the
            authors' script, its mean of per-class cosines on the images of `authors_selection_indices` (one
            shuffled draw reused for every snapshot, one chunk per class).
        seed: the authors' loader seed.
        max_images: see `class_mean_gradient` (the paper's Algorithm 2).
        chunk: see `class_mean_gradient`.
        progress: show a progress bar (Algorithm 2's gradients).

    Raises:
        ValueError: if a class has no images, threshold is not in (0, 1] or selection is unknown.
    """
    if selection not in SELECTION_RULES:
        raise ValueError(f"selection must be one of {SELECTION_RULES}, got {selection!r}")
    model = config.build().eval()
    if selection == "authors":
        chosen = authors_selection_indices(data.labels, config.num_classes, seed)
        class_images, selection_chunk = (lambda c: data.images(chosen[c])), AUTHORS_IMAGES_PER_CLASS
    else:
        class_images, selection_chunk = (lambda c: data.class_images(c, max_images)), chunk
    statistics = selection_statistics(model, snapshots, class_images, config.num_classes, selection_chunk, progress)
    epochs = walk_checkpoints(statistics.similarity(selection), threshold)
    if max_checkpoints is not None and len(epochs) > max_checkpoints:
        print(f"fastdd: Algorithm 2 kept {len(epochs)} checkpoints (epochs {epochs}); using the first "
              f"{max_checkpoints} ({epochs[:max_checkpoints]})", file=sys.stderr)  # fmt: skip
        epochs = epochs[:max_checkpoints]
    return epochs


def build_surrogate_bundle(
    config: SurrogateConfig,
    snapshots: Tensor,
    images: Tensor | RealData,
    labels: Tensor | None = None,
    *,
    epochs: list[int] | None = None,
    max_images: int = REAL_IMAGES_PER_CLASS,
    chunk: int = REAL_CHUNK,
    real_grads: bool = True,
    **selection_options,
) -> SurrogateBundle:
    """Pick checkpoints (`select_epochs`, unless `epochs` gives them) and compute every class's real gradients
    (real_grads=False: none; a run computes them per class when it needs them).

    Args:
        config: the surrogate architecture.
        snapshots: [E + 1, P] parameter snapshots.
        images: [N, C, H, W] real images with labels [N], or a `RealData`.
        labels: [N] class labels (with a tensor of images).
        epochs: snapshot indices to keep (None: Algorithm 2).
        max_images: see `class_mean_gradient` (the real gradients and the paper's Algorithm 2).
        chunk: see `class_mean_gradient`.
        real_grads: compute the [num_classes, K, P] real gradients.
        **selection_options: threshold, max_checkpoints, selection, seed, progress (see `select_epochs`).

    Returns:
        SurrogateBundle: flat_params [K, P], real_grads [num_classes, K, P], the K kept epochs.

    Raises:
        ValueError: as `select_epochs`.
    """
    data = as_real_data(images, labels)
    if epochs is None:
        epochs = select_epochs(config, snapshots, data, max_images=max_images, chunk=chunk, **selection_options)
    elif selection_options.get("selection", "paper") not in SELECTION_RULES:
        raise ValueError(f"selection must be one of {SELECTION_RULES}, got {selection_options['selection']!r}")
    flat = snapshots[epochs]
    real = None
    if real_grads:
        model = config.build().eval()
        real = real_gradients(model, flat, data, None, config.num_classes, max_images=max_images, chunk=chunk)
    return SurrogateBundle(config, flat, real, list(epochs))


def compute_surrogate_bundle(
    config: SurrogateConfig,
    images: Tensor | RealData,
    labels: Tensor | None = None,
    *,
    epochs: int = 50,
    epoch_list: list[int] | None = None,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    **selection_options,
) -> SurrogateBundle:
    """Train the trajectory and build the bundle from it.

    Args:
        config: the surrogate architecture.
        images: [N, C, S, S] real images in [-1, 1] with labels [N], or a `RealData`.
        labels: [N] class labels (with a tensor of images).
        epochs: training epochs.
        epoch_list: snapshot indices to keep (None: Algorithm 2).
        flip: random horizontal flips in training.
        seed: training seed (see `train_trajectory`) and the authors' loader seed.
        device: where the model trains.
        progress: show progress bars.
        **selection_options: threshold, max_checkpoints, selection (see `select_epochs`).

    Returns:
        SurrogateBundle: flat_params [K, P], real_grads [num_classes, K, P], the K kept epochs.

    Raises:
        ValueError: if a class has no images or threshold is not in (0, 1].
    """
    data = as_real_data(images, labels)
    snapshots = train_trajectory(config, data, epochs=epochs, flip=flip, seed=seed, device=device, progress=progress)
    return build_surrogate_bundle(
        config, snapshots, data, epochs=epoch_list, seed=seed, progress=progress, **selection_options
    )
