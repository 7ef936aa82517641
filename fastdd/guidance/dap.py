"""DAP: Mercer-kernel representativeness guidance (Su et al., "Diffusion Models as Dataset Distillation Priors").

No official code is public; this follows the paper (SPEC "DAP"). At every guided step, for image b of class c:

    φ(x) = output of DiT block `block_index` (forward truncated after that block), flattened [T·hidden]
    E_b  = (1/N) Σ_n D_K(φ(x_t,b), φ(real_c,n)),   D_K(u, v) = √(K(u,u) + K(v,v) − 2K(u,v))
    x_{t−1} = x̃_{t−1} − γ · ∇_{x_t} E_b

x̃_{t−1} is the sampler's unguided sample. φ(x_t) comes from a second forward of the truncated DiT on the
conditional rows x_t[:B] at the step's timestep with the class labels, run with autograd on (the sampler's
own CFG forward is not recorded for DAP: `requires_grad = False`). The gradient flows through that truncated
forward only. The linear kernel (the paper's choice) makes D_K the Euclidean distance (not squared).

Real features φ(real) are computed once per class (at timestep 0: t_mode="zero") or, with t_mode="noised",
of the real latents noised to the current step, q(x_t | x_0) with one fixed Gaussian noise per real latent,
recomputed at every guided step (cost: N_c truncated forwards per class and step, e.g. 1300 × 16 steps for an
ImageNet class; only the current step's features are kept). Features are stored in `dtype` (bfloat16 by
default) on the device; distances are accumulated in float32 by `fastdd.ops.mercer_distance`.

Optional Johnson–Lindenstrauss projection (`JLProjection`) of both sides to m dimensions, see its docstring
for the distance-error bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._checks import check_positive_int
from ..progress import progress_bar
from ..sampling.diffusion import GaussianDiffusion
from ..sampling.sampler import Guidance, ImageId, StepContext

KERNELS = ("linear", "rbf", "poly")
T_MODES = ("zero", "noised")


def jl_min_dim(num_pairs: int, epsilon: float, delta: float = 0.01) -> int:
    """The smallest JL dimension m for num_pairs fixed pairs (see `JLProjection`).

    m is the smallest with 2·num_pairs·exp(−(m/2)(ε²/2 − ε³/3)) <= δ: m = ⌈2 ln(2·num_pairs/δ) / (ε²/2 − ε³/3)⌉.

    Args:
        num_pairs: P, a positive int.
        epsilon: ε in (0, 1).
        delta: δ in (0, 1), the failure probability.

    Returns:
        m.

    Raises:
        ValueError: if num_pairs is not a positive int, or epsilon or delta is not in (0, 1).
    """
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return math.ceil(2 * math.log(2 * num_pairs / delta) / (epsilon**2 / 2 - epsilon**3 / 3))


class JLProjection:
    """Gaussian random projection u ↦ u·R, R: [dim, out_dim] with i.i.d. N(0, 1/out_dim) entries, drawn on the
    CPU from torch.Generator(seed) (the same R on every device), kept in float32 (dim·out_dim·4 bytes: 1.2 GB
    for a DiT-XL/2 block output and m = 1024).

    Bound used (Chernoff bounds of χ²_m, as in Dasgupta & Gupta 2003): for any fixed u and 0 < ε < 1,
        P(‖uR‖² > (1+ε)‖u‖²) <= exp(−(m/2)(ε²/2 − ε³/3)),   P(‖uR‖² < (1−ε)‖u‖²) <= exp(−mε²/4),
    so for P fixed pairs (u, v) (chosen independently of R), with probability >= 1 − 2P·exp(−(m/2)(ε²/2 − ε³/3))
    every projected distance satisfies √(1−ε)·‖u−v‖ <= ‖uR − vR‖ <= √(1+ε)·‖u−v‖. For DAP's energy of one
    image against N real features (P = N pairs) the linear-kernel energy then lies within [√(1−ε), √(1+ε)]
    times the unprojected one; `jl_min_dim(N, ε, δ)` gives the m for failure probability δ (e.g. N = 1300,
    ε = 0.2, δ = 0.01: m = 1439). The RBF D_K is increasing in the distance, so it is bracketed by its values
    at the two bounds (its σ defaults to √dim of the unprojected features). Not meaningful for "poly".
    Caveat: in a guided run x_t depends on R through the earlier guided steps, so the "fixed pairs" condition
    holds exactly only at the first guided step; later steps are covered heuristically.
    """

    def __init__(self, dim: int, out_dim: int, seed: int = 0, device: torch.device | str | None = None):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        self.dim, self.out_dim, self.seed = dim, out_dim, seed
        generator = torch.Generator().manual_seed(seed)
        self.matrix = (torch.randn(dim, out_dim, generator=generator) / math.sqrt(out_dim)).to(device)  # [D, m]

    def __call__(self, u: Tensor) -> Tensor:
        """u: [B, dim] -> [B, out_dim] in float32 (differentiable)."""
        if u.dim() != 2 or u.shape[1] != self.dim:
            raise ValueError(f"u: expected [B, {self.dim}], got {list(u.shape)}")
        if self.matrix.device != u.device:
            self.matrix = self.matrix.to(u.device)  # moved once
        return u.float() @ self.matrix


def _check_block(model: nn.Module, block_index: int) -> None:
    depth = getattr(model, "depth", None)
    if depth is None or not hasattr(model, "forward_features"):
        raise ValueError("model: expected a fastdd DiT (with depth and forward_features)")
    if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index < depth:
        raise ValueError(f"block_index must be an int in [0, {depth - 1}], got {block_index!r}")


def block_features(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, block_index: int) -> Tensor:
    """φ: the tokens after block `block_index`, flattened.

    Args:
        model: a fastdd DiT (with forward_features).
        x: [B, C, H, W] latents (cast to the model's dtype).
        t: [B] timesteps.
        y: [B] class labels.
        block_index: the block whose output is taken.

    Returns:
        [B, T·hidden] features in the model's dtype.
    """
    weight_dtype = next(model.parameters()).dtype
    return model.forward_features(x.to(weight_dtype), t, y, block_index).flatten(1)


def real_noise(latents: Tensor, seed: int, class_index: int) -> Tensor:
    """The fixed noise of the real latents of one class for t_mode="noised".

    randn of latents' shape from torch.Generator().manual_seed(seed + class_index) on the CPU.

    Args:
        latents: [N, C, H, W] real latents of the class (only the shape is used).
        seed: the base seed.
        class_index: the class.

    Returns:
        [N, C, H, W] float32 noise on the CPU.
    """
    generator = torch.Generator().manual_seed(seed + class_index)
    return torch.randn(latents.shape, generator=generator)


def real_features(
    model: nn.Module,
    latents: Tensor,
    labels: Tensor,
    block_index: int,
    t_mode: str = "zero",
    *,
    diffusion: GaussianDiffusion | None = None,
    index: int | None = None,
    noise: Tensor | None = None,
    projection: JLProjection | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """φ of real latents with their class labels, without grad.

    t_mode="zero": at timestep 0 on the clean latents. t_mode="noised": at the timestep of respaced `index` of
    `diffusion`, on q_sample(latents, index, noise). Computed in chunks of batch_size.

    Args:
        model: the fastdd DiT.
        latents: [N, C, H, W] real latents (N >= 1).
        labels: [N] class labels.
        block_index: the DiT block whose output is φ, in 0..depth - 1.
        t_mode: "zero" or "noised".
        diffusion: the respaced diffusion (needed for t_mode="noised").
        index: respaced step index (needed for t_mode="noised").
        noise: [N, C, H, W] noise (needed for t_mode="noised").
        projection: JLProjection applied to the features.
        batch_size: latents per forward (>= 1).
        dtype: storage dtype of the result.
        device: where φ is computed (default: the model's device).
        progress: show a progress bar.

    Returns:
        [N, D] features in `dtype` on `device`, D = T·hidden (or projection.out_dim).

    Raises:
        ValueError: if model is not a fastdd DiT, block_index, t_mode or batch_size is invalid, latents or labels
            have the wrong shape, or t_mode="noised" lacks diffusion, index or noise of the latents' shape.
    """
    _check_block(model, block_index)
    if t_mode not in T_MODES:
        raise ValueError(f"t_mode must be one of {T_MODES}, got {t_mode!r}")
    if latents.dim() != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents: expected a non-empty [N, C, H, W], got {list(latents.shape)}")
    if labels.shape != (latents.shape[0],):
        raise ValueError(f"labels: expected shape [{latents.shape[0]}], got {list(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if t_mode == "noised" and (diffusion is None or index is None or noise is None or noise.shape != latents.shape):
        raise ValueError("t_mode='noised' needs diffusion, index and noise of the latents' shape")
    device = next(model.parameters()).device if device is None else torch.device(device)
    timestep = 0 if t_mode == "zero" else diffusion.timestep_list[diffusion._check_index(index)]
    out = []
    with torch.no_grad():
        starts = range(0, latents.shape[0], batch_size)
        for start in progress_bar(starts, disable=not progress, desc="real features", leave=False):
            x = latents[start : start + batch_size].to(device=device, dtype=torch.float32)
            if t_mode == "noised":
                chunk_noise = noise[start : start + batch_size].to(device=device, dtype=torch.float32)
                x = diffusion.q_sample(x, index, chunk_noise)
            y = labels[start : start + batch_size].to(device=device, dtype=torch.long)
            t = torch.full((x.shape[0],), timestep, device=device, dtype=torch.long)
            features = block_features(model, x, t, y, block_index)
            if projection is not None:
                features = projection(features)
            out.append(features.to(dtype))
    return torch.cat(out)


class RealFeatures:
    """Per-class real features for `MercerGuidance`, computed lazily and cached on the device.

    latents: [N, C, H, W] real latents (VAE latents × 0.18215) with labels: [N] classes, or a mapping class ->
    [N_c, C, H, W] (e.g. `fastdd.data.latents.ClassCache`, read per class when needed). t_mode="zero": φ at
    timestep 0, computed once per class and kept. t_mode="noised": φ of the latents noised to the step's
    timestep with `real_noise(latents_c, seed, c)`, recomputed for every (class, step index); only the current
    step index is kept (`diffusion` must be the sampler's). dtype: storage dtype of the features (bfloat16
    default; distances are accumulated in float32). projection: a JLProjection applied before storage (and by
    the guidance to φ(x_t)). max_cached_classes: classes kept (least recently used dropped; one DiT-XL/2 class
    of 1300 images is 767 MB in bfloat16), at least the number of classes in a sampler batch.
    """

    def __init__(
        self,
        model: nn.Module,
        latents: Tensor | Mapping[int, Tensor],
        labels: Tensor | None,
        block_index: int,
        t_mode: str = "zero",
        *,
        diffusion: GaussianDiffusion | None = None,
        seed: int = 0,
        projection: JLProjection | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        max_cached_classes: int = 8,
    ):
        _check_block(model, block_index)
        if t_mode not in T_MODES:
            raise ValueError(f"t_mode must be one of {T_MODES}, got {t_mode!r}")
        check_positive_int("max_cached_classes", max_cached_classes)
        if t_mode == "noised" and diffusion is None:
            raise ValueError("diffusion is required for t_mode='noised' (the sampler's diffusion)")
        if isinstance(latents, Tensor):
            if latents.dim() != 4:
                raise ValueError(f"latents: expected [N, C, H, W], got {list(latents.shape)}")
            labels = torch.as_tensor(labels, dtype=torch.long).cpu()
            if labels.shape != (latents.shape[0],):
                raise ValueError(f"labels: expected shape [{latents.shape[0]}], got {list(labels.shape)}")
        self.model, self.latents, self.labels, self.block_index = model, latents, labels, block_index
        self.t_mode, self.diffusion, self.seed, self.projection = t_mode, diffusion, seed, projection
        self.dtype, self.batch_size, self.max_cached_classes = dtype, batch_size, max_cached_classes
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self._cache: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()
        self._cache_index: int | None = None

    def class_latents(self, class_index: int) -> Tensor:
        """The real latents of one class.

        Args:
            class_index: the class.

        Returns:
            [N_c, C, H, W] latents.

        Raises:
            ValueError: if the class has no real latents.
        """
        if isinstance(self.latents, Tensor):
            latents = self.latents[(self.labels == class_index).nonzero().flatten().to(self.latents.device)]
        elif class_index in self.latents:
            latents = self.latents[class_index]
        else:
            latents = None
        if latents is None or latents.shape[0] == 0:
            raise ValueError(f"labels: class {class_index} has no real latents (DAP needs at least one)")
        return latents.to(self.device)

    def get(self, class_index: int, index: int) -> tuple[Tensor, Tensor]:
        """The features of one class at a respaced step, computed on first use and cached.

        Args:
            class_index: the class.
            index: respaced step index (ignored for t_mode="zero").

        Returns:
            (features [N_c, D] in self.dtype, squared norms [N_c] float32).

        Raises:
            ValueError: if the class has no real latents.
        """
        if self.t_mode == "noised" and index != self._cache_index:
            self._cache.clear()
            self._cache_index = index
        if class_index in self._cache:
            self._cache.move_to_end(class_index)
        else:
            while len(self._cache) >= self.max_cached_classes:
                self._cache.popitem(last=False)
            latents = self.class_latents(class_index)
            labels = torch.full((latents.shape[0],), class_index, dtype=torch.long)
            noise = real_noise(latents, self.seed, class_index) if self.t_mode == "noised" else None
            features = real_features(
                self.model,
                latents,
                labels,
                self.block_index,
                self.t_mode,
                diffusion=self.diffusion,
                index=index,
                noise=noise,
                projection=self.projection,
                batch_size=self.batch_size,
                dtype=self.dtype,
                device=self.device,
            )
            self._cache[class_index] = (features, features.float().pow(2).sum(1))
        return self._cache[class_index]


class MercerGuidance(Guidance):
    """DAP as a sampler guidance: s ← s − γ·∇_{x_t} (1/N) Σ_n D_K(φ(x_t), φ(real_n)) on the conditional rows.

    model: the fastdd DiT the sampler runs (its truncated forward gives φ; in compat mode only the first
    `rows` rows [cond] are guided, shadow rows get zeros). real: a `RealFeatures`, or precomputed features
    per class (a mapping or sequence class -> [N_c, D], D = T·hidden or projection.out_dim; their squared
    norms are cached). kernel: "linear" (the paper's), "rbf" (σ default √D of the unprojected
    features) or "poly" ((u·v/D + coef0)^degree). gamma: γ >= 0 (the paper: ≈1, tried 0.5 and 1).
    low/high: guided respaced indices (default every step, as the paper's Algorithm 1).
    projection: JLProjection applied to φ(x_t) (default: real.projection for a RealFeatures).
    """

    requires_grad = False  # DAP runs its own truncated forward with grad; the sampler's forward is not recorded

    def __init__(
        self,
        model: nn.Module,
        real: RealFeatures | Mapping[int, Tensor] | Sequence[Tensor],
        block_index: int,
        kernel: str = "linear",
        gamma: float = 1.0,
        *,
        sigma: float | None = None,
        degree: int = 2,
        coef0: float = 1.0,
        projection: JLProjection | None = None,
        low: int = 0,
        high: float = math.inf,
    ):
        _check_block(model, block_index)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if isinstance(real, RealFeatures):
            if real.block_index != block_index:
                raise ValueError(f"real: features of block {real.block_index}, guidance block_index {block_index}")
            if projection is not None and projection is not real.projection:
                raise ValueError("projection: must be the RealFeatures' own projection")
            projection = real.projection
        elif not isinstance(real, (Mapping, Sequence)):
            raise ValueError(f"real: expected RealFeatures or per-class features, got {type(real).__name__}")
        if projection is not None and kernel == "poly":
            raise ValueError("projection: the JL bound covers distances; use kernel='linear' or 'rbf' with it")
        feature_dim = model.grid_size**2 * model.hidden_size
        if sigma is None and kernel == "rbf":
            sigma = math.sqrt(feature_dim)  # of the unprojected features, so projection keeps the kernel
        self.model, self.real, self.block_index, self.kernel, self.gamma = model, real, block_index, kernel, gamma
        self.sigma, self.degree, self.coef0, self.projection = sigma, degree, coef0, projection
        self.feature_dim = projection.out_dim if projection is not None else feature_dim
        self.low, self.high = low, high
        self._sqnorms: dict[int, Tensor] = {}

    @property
    def capturable(self) -> bool:
        """Precomputed features stay put; a RealFeatures cache may recompute or drop them between batches."""
        return not isinstance(self.real, RealFeatures)

    def class_features(self, class_index: int, index: int) -> tuple[Tensor, Tensor]:
        """(φ(real), ‖φ(real)‖²) of one class at respaced step `index`.

        Args:
            class_index: the class.
            index: respaced step index (used by a RealFeatures).

        Returns:
            (features [N_c, D], squared norms [N_c] float32).

        Raises:
            ValueError: if the class has no real latents / features, or its precomputed features are not a non-empty
                [N_c, D].
        """
        if isinstance(self.real, RealFeatures):
            return self.real.get(class_index, index)
        if isinstance(self.real, Mapping):
            missing = class_index not in self.real
        else:
            missing = not 0 <= class_index < len(self.real)
        if missing:
            raise ValueError(f"real: no features for class {class_index}")
        features = self.real[class_index]
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] != self.feature_dim:
            expected = f"a non-empty [N, {self.feature_dim}]"
            raise ValueError(f"real: class {class_index} features must be {expected}, got {list(features.shape)}")
        if class_index not in self._sqnorms:
            self._sqnorms[class_index] = features.float().pow(2).sum(1)
        return features, self._sqnorms[class_index]

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        """Fail early when a class of the batch has no real latents / features.

        Args:
            labels: [B] class labels of the batch.
            image_ids: the batch's (class_index, image_index, seed) triples (not used).

        Raises:
            ValueError: if a class of the batch has no real latents / features.
        """
        for class_index in sorted(set(labels.tolist())):
            if isinstance(self.real, RealFeatures):
                self.real.class_latents(class_index)
            else:
                self.class_features(class_index, 0)

    def energy(self, x_t: Tensor, t: Tensor, y: Tensor, classes: Sequence[int], index: int) -> Tensor:
        """Σ_b E_b: the summed DAP energy of the rows.

        Differentiable w.r.t. x_t through the truncated DiT forward.

        Args:
            x_t: [B, C, H, W] latents.
            t: [B] timesteps.
            y: [B] class labels.
            classes: y as host ints.
            index: respaced step index (for the real features).

        Returns:
            0-dim energy.
        """
        features = block_features(self.model, x_t, t, y, self.block_index)
        if self.projection is not None:
            features = self.projection(features)
        total = features.new_zeros((), dtype=torch.float32)
        for class_index in sorted(set(classes)):
            rows = [b for b, c in enumerate(classes) if c == class_index]
            real, sqnorm = self.class_features(class_index, index)
            query = features[rows] if len(rows) < len(classes) else features
            distances = ops.mercer_distance(
                query, real, self.kernel, sigma=self.sigma, degree=self.degree, coef0=self.coef0, y_sqnorm=sqnorm
            )
            total = total + distances.sum()
        return total

    def step(self, ctx: StepContext) -> Tensor:
        """The update −γ·∇_{x_t} Σ_b E_b on the conditional rows.

        Runs its own truncated forward of x_t[:rows] at ctx.timestep with autograd on.

        Args:
            ctx: the step's context: x_t [R, C, H, W] (R = rows, or 2·rows in compat mode); the classes come from
                image_ids (else from y).

        Returns:
            [R, C, H, W] delta in ctx.sample's dtype: the update on the first ctx.rows rows, zeros on the shadow rows.
        """
        rows = ctx.rows
        if ctx.image_ids:
            classes = [image_id[0] for image_id in ctx.image_ids]  # host-side labels: no sync
        else:
            classes = ctx.y[:rows].tolist()
        with torch.enable_grad():
            x_t = ctx.x_t[:rows].detach().requires_grad_(True)
            t = torch.full((rows,), ctx.timestep, device=x_t.device, dtype=torch.long)
            energy = self.energy(x_t, t, ctx.y[:rows], classes, ctx.index)
            (grad,) = torch.autograd.grad(energy, x_t)
        update = -self.gamma * grad.to(ctx.sample.dtype)
        return F.pad(update, (0, 0, 0, 0, 0, 0, 0, ctx.x_t.shape[0] - rows))
