"""MGD3 mode-guided dataset distillation (ICML 2025), SPEC "MGD3".

Modes: k-means with IPC clusters of the real VAE latents of a class (the encoder mean, ×0.18215 by the codec,
flattened); mode j guides image j of the class. On respaced indices i > stop_index (25 of 50: 24 steps) the
update g = −λ · (x̂0_cond − mode_j) · exp(0.5 · log_variance) is added to the posterior mean before the noise,
λ = 0.1. The sampler's noise term does not depend on the mean, so adding g to the mean is adding it to the
sample: `ModeGuidance.step` returns g as the delta.

The k-means here is a plain torch implementation (k-means++ seeding from a `torch.Generator`, Lloyd
iterations until the assignment no longer changes), so no scikit-learn is needed; the authors run
scikit-learn's KMeans(n_clusters=IPC, random_state=0), whose seeding draws differ: the modes are the same
kind of centroids, not bit-identical ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops._checks import check_positive_int
from ..progress import progress_bar
from ..sampling.sampler import Guidance, ImageId, StepContext

MGD3_LAMBDA = 0.1
MGD3_STOP_INDEX = 25


# --------------------------------------------------------------------------------------------- k-means
class KMeansResult(NamedTuple):
    """centroids: [k, D]; assignments: [N] (long, cluster of each point); inertia: Σ squared distances to the
    assigned centroids (float); iterations: Lloyd iterations run; converged: the assignment stopped changing."""

    centroids: Tensor
    assignments: Tensor
    inertia: float
    iterations: int
    converged: bool


def squared_distances(points: Tensor, centroids: Tensor) -> Tensor:
    """‖x_n − c_j‖² for every point and centroid (clamped at 0 against rounding).

    Args:
        points: [N, D].
        centroids: [k, D].

    Returns:
        [N, k] squared distances.
    """
    cross = points @ centroids.T
    return (points.pow(2).sum(1, keepdim=True) - 2 * cross + centroids.pow(2).sum(1)).clamp_min(0)


def kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007).

    The first centroid is a uniformly drawn point, each next one a point drawn with probability ∝ its squared
    distance to the nearest centroid chosen so far. Random draws: one `torch.randint` then k − 1
    `torch.multinomial` calls, all from `generator` (a CPU generator; probabilities are moved to the CPU).

    Args:
        points: [N, D].
        k: number of centroids.
        generator: the CPU generator of the draws.

    Returns:
        [k, D] initial centroids (rows of points).

    Raises:
        ValueError: if the points have fewer than k distinct rows.
    """
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = squared_distances(points, points[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = closest.double().cpu()
        if not float(weights.sum()) > 0:
            raise ValueError(f"points: k-means needs at least k={k} distinct points, found only {len(chosen)}")
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, squared_distances(points, points[index : index + 1]).squeeze(1))
    return points[chosen].clone()


def _check_points(points: Tensor, k: int) -> None:
    if points.dim() != 2:
        raise ValueError(f"points: expected [N, D], got shape {list(points.shape)}")
    check_positive_int("k", k)
    if points.shape[0] == 0:
        raise ValueError("points: empty (a class with no images has no modes)")
    if k > points.shape[0]:
        raise ValueError(f"k={k} clusters need at least k points, got {points.shape[0]} (IPC larger than the class)")
    if not torch.isfinite(points).all():
        raise ValueError("points: contains NaN or Inf")


def kmeans(
    points: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    max_iter: int = 300,
) -> KMeansResult:
    """Lloyd's k-means of points into k clusters.

    Each iteration assigns every point to its nearest centroid (squared Euclidean distance) and moves every
    centroid to the mean of its points; it stops when the assignment no longer changes (the centroids are then
    a fixed point) or after max_iter iterations. Empty clusters: a centroid that gets no point is moved onto
    the point farthest from its own centroid (distinct points for several empty clusters, largest distance
    first), as scikit-learn does, and the assignment is recomputed. Arithmetic in float32 (float64 for
    float64 points). Deterministic for a given generator state.

    Args:
        points: [N, D], finite.
        k: number of clusters, a positive int <= N.
        generator: generator of the k-means++ seeding.
        init: [k, D] initial centroids (default: `kmeans_plus_plus(points, k, generator)`).
        max_iter: maximum number of iterations (> 0).

    Returns:
        KMeansResult: centroids [k, D] in points' dtype, assignments [N] (long), inertia, iterations, converged.

    Raises:
        ValueError: if points is not a non-empty, finite [N, D], k is not a positive int <= N, max_iter <= 0,
            init is not [k, D], or (without init) the points have fewer than k distinct rows.
    """
    _check_points(points, k)
    if max_iter <= 0:
        raise ValueError(f"max_iter must be > 0, got {max_iter}")
    work = points if points.dtype == torch.float64 else points.float()
    if init is None:
        centroids = kmeans_plus_plus(work, k, generator)
    else:
        if init.shape != (k, points.shape[1]):
            raise ValueError(f"init: expected [{k}, {points.shape[1]}], got {list(init.shape)}")
        centroids = init.to(device=work.device, dtype=work.dtype).clone()
    assignments = squared_distances(work, centroids).argmin(1)
    converged, iterations = False, 0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (the count is reported after the loop)
        centroids = _update_centroids(work, assignments, centroids)
        new_assignments = squared_distances(work, centroids).argmin(1)
        if torch.equal(new_assignments, assignments):
            converged = True
            break
        assignments = new_assignments
    inertia = float(squared_distances(work, centroids).gather(1, assignments[:, None]).sum())
    return KMeansResult(centroids.to(points.dtype), assignments, inertia, iterations, converged)


def _update_centroids(points: Tensor, assignments: Tensor, centroids: Tensor) -> Tensor:
    """Means of the assigned points [k, D]; empty clusters take the points farthest from their centroids."""
    k = centroids.shape[0]
    counts = torch.bincount(assignments, minlength=k)
    sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
    new = sums / counts.clamp_min(1).to(points.dtype)[:, None]
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        own_distance = (points - centroids[assignments]).pow(2).sum(1)
        farthest = own_distance.argsort(descending=True, stable=True)[: len(empty)]
        new[empty] = points[farthest]
    return new


# --------------------------------------------------------------------------------------------- modes
def class_modes(latents: Tensor, ipc: int, *, seed: int = 0, max_iter: int = 300) -> Tensor:
    """MGD3 modes of one class: k-means centroids of its flattened latents.

    The k-means++ seeding uses a CPU generator seeded with `seed` (the same seed for every class, as the
    authors' random_state=0), so a class's modes do not depend on which other classes are processed.

    Args:
        latents: [N, C, H, W] latents of the class.
        ipc: number of modes.
        seed: seed of the k-means++ seeding.
        max_iter: maximum k-means iterations.

    Returns:
        [ipc, C, H, W] modes.

    Raises:
        ValueError: if latents is not [N, C, H, W], or k-means cannot make ipc clusters of them (see `kmeans`).
    """
    if latents.dim() != 4:
        raise ValueError(f"latents: expected [N, C, H, W], got shape {list(latents.shape)}")
    generator = torch.Generator().manual_seed(seed)
    result = kmeans(latents.flatten(1), ipc, generator=generator, max_iter=max_iter)
    return result.centroids.view(ipc, *latents.shape[1:])


def fit_modes(
    latents: Tensor,
    labels: Tensor,
    ipc: int,
    classes: Sequence[int],
    *,
    seed: int = 0,
    max_iter: int = 300,
    progress: bool = True,
) -> dict[int, Tensor]:
    """`class_modes` for each class in `classes`.

    Args:
        latents: [N, C, H, W] latents of all classes.
        labels: [N] class labels.
        ipc: modes per class.
        classes: the classes to fit.
        seed: seed of each class's k-means++ seeding.
        max_iter: maximum k-means iterations.
        progress: show a progress bar.

    Returns:
        {class_index: [ipc, C, H, W] modes}.

    Raises:
        ValueError: if labels is not [N], a class has no latents, or k-means fails (see `class_modes`).
    """
    if labels.shape != (latents.shape[0],):
        raise ValueError(f"labels: expected shape [{latents.shape[0]}], got {list(labels.shape)}")
    labels = labels.to(latents.device)
    modes = {}
    for c in progress_bar(list(classes), disable=not progress, desc="k-means", leave=False):
        members = latents[labels == c]
        if members.shape[0] == 0:
            raise ValueError(f"class {c} has no latents (empty class)")
        modes[int(c)] = class_modes(members, ipc, seed=seed, max_iter=max_iter)
    return modes


# --------------------------------------------------------------------------------------------- guidance
def mode_update(pred_xstart: Tensor, mode: Tensor, log_variance: Tensor, lam: float = MGD3_LAMBDA) -> Tensor:
    """The MGD3 term g = −λ · (x̂0 − mode) · exp(0.5 · log_variance), added to the posterior mean.

    Drop-in for another loop: mean = mean + mode_update(x0, mode, log_variance) before adding the noise.

    Args:
        pred_xstart: x̂0, broadcastable to [B, C, H, W].
        mode: the target modes, broadcastable to [B, C, H, W].
        log_variance: posterior log variance, broadcastable to [B, C, H, W].
        lam: λ.

    Returns:
        [B, C, H, W] g (the broadcast shape).
    """
    return -lam * (pred_xstart - mode) * torch.exp(0.5 * log_variance)


class ModeGuidance(Guidance):
    """MGD3 as a sampler guidance: image (c, j, seed) is pulled toward mode j of class c on indices > stop_index.

    modes: [num_classes, ipc, C, H, W] or {class_index: [ipc, C, H, W]} (latent space, as `fit_modes` returns; a
    mapping may compute a class's modes when it is first looked up, e.g. `fastdd.data.latents.ClassCache`);
    lam: λ (>= 0); stop_index: last unguided respaced index (guided: stop_index < i; -1 guides every step).
    compat=False (clean): the update of each image uses its own row's x̂0 and variance.
    compat=True (2B rows [cond; uncond], the authors' layout): the conditional row gets
    −λ(x̂0_cond − mode)·σ_cond and the shadow row −λ(x̂0_cond − mode)·σ_uncond, its own σ (the authors add the
    conditional term, broadcast, to the whole [cond; uncond] mean). The shadow row never feeds back into the
    conditional row (compat CFG feeds the model x[:B] only), so this only keeps the shadow row faithful.
    With `GuidedSampler.ddim_sample` the same term is added to the DDIM update (log_variance is still the
    ancestral posterior's); MGD3 itself is ancestral.
    """

    capturable = True

    def __init__(
        self,
        modes: Tensor | Mapping[int, Tensor],
        *,
        lam: float = MGD3_LAMBDA,
        stop_index: int = MGD3_STOP_INDEX,
        compat: bool = False,
    ):
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if isinstance(stop_index, bool) or not isinstance(stop_index, int) or stop_index < -1:
            raise ValueError(f"stop_index must be an int >= -1, got {stop_index!r}")
        if isinstance(modes, Tensor):
            if modes.dim() != 5:
                raise ValueError(f"modes: expected [num_classes, ipc, C, H, W], got shape {list(modes.shape)}")
            modes = {c: modes[c] for c in range(modes.shape[0])}
        if not len(modes):
            raise ValueError("modes: no class has modes")
        self.modes = modes
        self.lam, self.stop_index, self.compat = lam, stop_index, compat
        self.low, self.high = stop_index + 1, math.inf
        self._targets: Tensor | None = None  # [B, C, H, W] modes of the batch's images
        self._in_batch = False

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        """Look up the target mode of every image of the batch.

        Args:
            labels: [B] class labels (not used: the classes come from image_ids).
            image_ids: the B (class_index, image_index, seed) triples; image j of class c targets mode j.

        Raises:
            ValueError: if image_ids is empty, or names a class without modes or an image without a mode.
        """
        targets = []
        for class_index, image_index, _ in image_ids:
            if class_index not in self.modes:
                raise ValueError(f"image_ids: class {class_index} has no modes")
            class_modes_ = self.modes[class_index]
            if class_modes_.dim() != 4 or class_modes_.shape[0] == 0 or not torch.isfinite(class_modes_).all():
                raise ValueError(f"modes[{class_index}]: expected a finite non-empty [ipc, C, H, W]")
            if not 0 <= image_index < class_modes_.shape[0]:
                raise ValueError(
                    f"image_ids: image {image_index} of class {class_index} has no mode (class {class_index} has "
                    f"{class_modes_.shape[0]} modes: mode j guides image j)"
                )
            targets.append(class_modes_[image_index])
        if not targets:
            raise ValueError("image_ids: ModeGuidance needs the (class_index, image_index, seed) of every image")
        targets = torch.stack(targets)
        if self._targets is not None and self._targets.shape == targets.shape:
            self._targets.copy_(targets)  # in place, so a step recorded as a CUDA graph reads this batch's modes
        else:
            self._targets = targets
        self._in_batch = True

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        """End the batch (`step` refuses to run until the next begin_batch).

        Args:
            final_latents: [B, C, H, W] final latents (not used).
            labels: [B] class labels (not used).
        """
        self._in_batch = False

    def step(self, ctx: StepContext) -> Tensor:
        """The mode update −λ(x̂0_cond − mode)·σ of the batch's images.

        Args:
            ctx: the step's context: pred_xstart and log_variance [R, C, H, W] (R = rows, or 2·rows in compat mode).

        Returns:
            [R, C, H, W] delta: the update on the first ctx.rows rows and zeros on the others; with compat=True every
            row of pair b gets −λ(x̂0_cond,b − mode_b) times its own σ.

        Raises:
            ValueError: if called outside a batch (begin_batch was not called).
        """
        if not self._in_batch:
            raise ValueError("ModeGuidance.step called outside a batch (begin_batch was not called)")
        rows = ctx.rows
        x0 = ctx.pred_xstart[:rows].detach()
        if self._targets.device != x0.device or self._targets.dtype != x0.dtype:
            self._targets = self._targets.to(device=x0.device, dtype=x0.dtype)  # once: later batches copy in place
        targets = self._targets
        log_variance = ctx.log_variance.detach()
        if self.compat:  # every row of pair b uses the conditional x̂0_b, each with its own σ
            difference = (x0 - targets).repeat(ctx.x_t.shape[0] // rows, 1, 1, 1)
            return -self.lam * difference * torch.exp(0.5 * log_variance)
        update = mode_update(x0, targets, log_variance[:rows], self.lam)
        return F.pad(update, (0, 0, 0, 0, 0, 0, 0, ctx.x_t.shape[0] - rows))
