"""The guided sampling loop: one step interface every distillation method plugs into.

At respaced index i the sampler runs the model (with CFG) on x_t, forms the ADM posterior and the unguided
next latent `sample` (ancestral DDPM, or DDIM), then every active `Guidance` returns a delta computed on the
same `StepContext`; the next latent is sample + Σ deltas (list order). Autograd records the model forward
only on steps where an active guidance has `requires_grad`; every other step runs under torch.no_grad().

Row layouts: clean mode holds B rows (one per image). Compat mode reproduces the official DiT sampler: 2B
rows [cond; uncond], the initial latent duplicated (`z = cat([z, z])`), an independent noise row per step for
each half, the official `forward_with_cfg` (see cfg.py), and the result is the first B rows. All noise comes
from `seeds.trajectory_noise` per image, drawn before the loop, so the loop makes no RNG calls and no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.precision import check_precision, mixed_precision
from ..ops import value_checks
from ..progress import progress_bar
from .acceleration import StepGraphs, say_once
from .cfg import ModelFn, guided_model
from .diffusion import GaussianDiffusion
from .seeds import batch_trajectory_noise

ImageId = tuple[int, int, int]  # (class_index, image_index, seed)


@dataclass
class StepContext:
    """What a guidance sees at respaced index `index`. Tensors are [R, ...] with R = rows (clean) or 2·rows
    (compat: [cond; uncond], rows >= `rows` are shadow rows).

    x_t requires grad, and model_output / eps / pred_xstart / mean / log_variance are functions of it in the
    autograd graph, iff some active guidance has requires_grad. `sample` (the unguided next latent) is detached.
    """

    x_t: Tensor
    index: int
    timestep: int
    alpha_bar: float
    y: Tensor
    model_output: Tensor
    eps: Tensor
    pred_xstart: Tensor
    mean: Tensor
    log_variance: Tensor
    sample: Tensor
    rows: int
    image_ids: list = field(default_factory=list)
    retain_graph: bool = False  # set by the sampler: True while another gradient guidance still needs the graph

    def grad(self, output: Tensor) -> Tensor:
        """∇_{x_t} of a scalar `output` through the recorded model forward (keeps the graph for later guidances)."""
        (gradient,) = torch.autograd.grad(output, self.x_t, retain_graph=self.retain_graph)
        return gradient


class Guidance:
    """Base class of a guidance active on respaced indices low <= i <= high (default: every step).

    step(ctx) returns a delta [R, C, H, W] that is added to ctx.sample (zeros on rows it leaves alone). A
    guidance with requires_grad = True gets ctx.x_t with the model forward recorded; it should take gradients
    with ctx.grad(loss) (or torch.autograd.grad(..., retain_graph=ctx.retain_graph)) so that several gradient
    guidances can share one forward. begin_batch / end_batch are called around each batch (e.g. to update
    memories with the final latents).

    capturable = True promises that step() may be recorded once as a CUDA graph and replayed for later batches
    with the same `capture_key`: it does not sync with the host, and state that changes between batches
    (memories, per-image targets) lives in device tensors updated in place.
    """

    requires_grad: bool = False
    capturable: bool = False
    low: int = 0
    high: float = math.inf

    def active(self, index: int) -> bool:
        return self.low <= index <= self.high

    def step(self, ctx: StepContext) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement step(ctx)")

    def capture_key(self, image_ids: Sequence[ImageId]) -> Hashable:
        """What of the batch, besides the step index and shapes, the recorded work depends on: the classes."""
        return tuple(image_id[0] for image_id in image_ids)

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        """Called before the first step of a batch. labels: [B]."""

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        """Called after the last step. final_latents: [B, C, H, W] (the real rows); labels: [B]."""


def linearised_model_output(model_output: Tensor, x_t: Tensor, diffusion: GaussianDiffusion, index: int) -> Tensor:
    """model_output [R, C or 2C, H, W] (computed without autograd) with its eps channels given the Jacobian
    √(1 − ᾱ)·I w.r.t. x_t [R, C, H, W] (the ideal denoiser of unit-variance data); values unchanged."""
    channels = x_t.shape[1]
    slope = (1.0 - diffusion.alpha_bar(index)) ** 0.5
    eps = model_output[:, :channels] + slope * (x_t - x_t.detach())
    return torch.cat([eps, model_output[:, channels:]], dim=1)


def sample_step(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x: Tensor,
    index: int,
    y: Tensor,
    noise: Tensor | None,
    guidances: Sequence[Guidance] = (),
    *,
    rows: int | None = None,
    image_ids: Sequence[ImageId] = (),
    method: str = "ddpm",
    eta: float = 0.0,
    model_jacobian: bool = True,
) -> Tensor:
    """One guided step at respaced index `index`.

    method "ddpm": ancestral; "ddim": x_{i-1} = the DDIM update with eta (ctx.mean and ctx.log_variance are
    still the ancestral posterior's). model_jacobian=False (fast mode) runs the model without autograd and
    stands in for its Jacobian with that of the ideal denoiser of unit-variance data, ∂ε/∂x_t = √(1 − ᾱ)·I (so
    ∂x̂0/∂x_t = √ᾱ·I): values are unchanged, guidance gradients skip the model's backward. (Taking
    ∂ε/∂x_t = 0 instead gives ∂x̂0/∂x_t = I/√ᾱ, up to 150× too large at high noise.)

    Args:
        model_fn: model_fn(x, t, y) returns the model output after CFG in this row layout (see
            cfg.guided_model).
        diffusion: the respaced diffusion.
        x: [R, C, H, W] latents at index.
        index: respaced index.
        y: [R] labels of the rows.
        noise: [R, C, H, W] noise of this step (unused at index 0 and by DDIM with eta = 0).
        guidances: the guidances; those active at index add their deltas, in order.
        rows: the number of real rows B (default R).
        image_ids: the (class_index, image_index, seed) of each real row, for the guidances.
        method: "ddpm" or "ddim".
        eta: DDIM η.
        model_jacobian: False: the fast mode above.

    Returns:
        [R, C, H, W] next latent (detached).

    Raises:
        ValueError: if method is not "ddpm" or "ddim", or a guidance returns a delta of another shape.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    active = [g for g in guidances if g.active(index)]
    gradient_guidances = [g for g in active if g.requires_grad]
    record = bool(gradient_guidances)
    with torch.set_grad_enabled(record):
        x_t = x.detach().requires_grad_(record)
        t = diffusion.timesteps_on(x.device)[index].expand(x.shape[0])
        if record and not model_jacobian:
            with torch.no_grad():
                model_output = model_fn(x_t, t, y)
            model_output = linearised_model_output(model_output, x_t, diffusion, index)
        else:
            model_output = model_fn(x_t, t, y)
        out = diffusion.p_mean_variance(model_output, x_t, index)
        if method == "ddpm":
            sample = diffusion.ddpm_step(out, noise, index)
        else:
            sample = diffusion.ddim_step(out["eps"], x_t, index, eta, noise)
        sample = sample.detach()
        if not active:
            return sample
        ctx = StepContext(
            x_t=x_t,
            index=index,
            timestep=diffusion.timestep_list[index],
            alpha_bar=diffusion.alpha_bar(index),
            y=y,
            model_output=model_output,
            eps=out["eps"],
            pred_xstart=out["pred_xstart"],
            mean=out["mean"],
            log_variance=out["log_variance"],
            sample=sample,
            rows=x.shape[0] if rows is None else rows,
            image_ids=list(image_ids),
        )
        result = sample
        for guidance in active:
            ctx.retain_graph = guidance.requires_grad and guidance is not gradient_guidances[-1]
            delta = guidance.step(ctx)
            if delta.shape != sample.shape:
                raise ValueError(
                    f"{type(guidance).__name__}.step returned a delta of shape {list(delta.shape)}, expected {list(sample.shape)}"
                )
            result = result + delta
    return result.detach()


def _as_labels(labels: Tensor | Sequence[int], num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of class indices, got shape {list(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())  # once per batch, outside the loop
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got values in {low}..{high}")
    return labels


def _check_image_ids(image_ids: Sequence[ImageId], batch: int) -> list[ImageId]:
    image_ids = [tuple(int(v) for v in image_id) for image_id in image_ids]
    if len(image_ids) != batch or any(len(image_id) != 3 for image_id in image_ids):
        raise ValueError(f"image_ids must hold {batch} (class_index, image_index, seed) triples, got {image_ids!r}")
    return image_ids


class GuidedSampler:
    """ADM ancestral sampling (and DDIM / DPM-Solver++) with CFG and composable guidances.

    model: model(x, t, y) -> [R, 2C, H, W] (learned sigma) or [R, C, H, W]; cfg_scale: CFG scale (1 = off in
    clean mode); num_classes: the model's class-label count (default: model.num_classes); null_class: the
    unconditional label (default num_classes, DiT's convention);
    cfg_channels: guided leading output channels (default: all eps channels in clean mode, 3 in compat mode,
    the official quirk); compat: the official DiT row layout (2B rows [cond; uncond], see the module docstring).

    Speed options (the math is unchanged unless stated): precision="bf16" runs the model under bf16 autocast
    (its output, and so every guidance reduction, stays fp32; wrap decoders with `mixed_precision` likewise);
    compile=True wraps the model in torch.compile; cuda_graphs=True records each step once per (step, batch
    shape, classes) as a CUDA graph and replays it for later batches when every guidance is `capturable`
    (else, on CPU, or if capture fails: eager, said once). model_jacobian=False is the opt-in fast mode: no
    backward through the model on guided steps (an approximation; see `sample_step`).
    """

    def __init__(
        self,
        model: nn.Module | ModelFn,
        diffusion: GaussianDiffusion,
        guidances: Sequence[Guidance] = (),
        cfg_scale: float = 4.0,
        null_class: int | None = None,
        cfg_channels: int | None = None,
        compat: bool = False,
        num_classes: int | None = None,
        *,
        precision: str = "fp32",
        compile: bool = False,
        cuda_graphs: bool = False,
        model_jacobian: bool = True,
    ):
        num_classes = getattr(model, "num_classes", None) if num_classes is None else num_classes
        if num_classes is None:
            raise ValueError("num_classes: the model has no num_classes attribute; pass the number of class labels")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.model, self.diffusion, self.guidances = model, diffusion, list(guidances)
        self.cfg_scale, self.compat, self.num_classes = cfg_scale, compat, num_classes
        self.null_class = num_classes if null_class is None else null_class
        self.cfg_channels = cfg_channels
        self.precision, self.compile, self.model_jacobian = check_precision(precision), compile, model_jacobian
        network = torch.compile(model) if compile else model
        self.model_fn = guided_model(
            mixed_precision(network, precision), cfg_scale, self.null_class, cfg_channels, compat
        )
        self.graphs = StepGraphs() if cuda_graphs else None
        if cuda_graphs and not all(g.capturable for g in self.guidances):
            eager = sorted({type(g).__name__ for g in self.guidances if not g.capturable})
            say_once(f"cuda_graphs: {', '.join(eager)} cannot be recorded as CUDA graphs; guided steps run eagerly")

    def replace(
        self, *, model: nn.Module | ModelFn | None = None, diffusion: GaussianDiffusion | None = None
    ) -> GuidedSampler:
        """A sampler with another model and/or diffusion and every other setting of this one.

        CFG, labels, guidances and speed options are kept.

        Args:
            model: the new model (None: this sampler's).
            diffusion: the new diffusion (None: this sampler's).

        Returns:
            The new GuidedSampler.
        """
        return GuidedSampler(
            self.model if model is None else model,
            self.diffusion if diffusion is None else diffusion,
            self.guidances,
            self.cfg_scale,
            self.null_class,
            self.cfg_channels,
            self.compat,
            self.num_classes,
            precision=self.precision,
            compile=self.compile,
            cuda_graphs=self.graphs is not None,
            model_jacobian=self.model_jacobian,
        )

    @property
    def rows_per_image(self) -> int:
        return 2 if self.compat else 1

    def _state_labels(self, labels: Tensor, device: torch.device) -> Tensor:
        """y of the sampler rows: [B] labels, or [labels; null] in compat mode."""
        labels = labels.to(device)
        return torch.cat([labels, torch.full_like(labels, self.null_class)]) if self.compat else labels

    def _loop(
        self,
        x: Tensor,
        labels: Tensor,
        image_ids: Sequence[ImageId],
        indices: Sequence[int],
        noise_steps: Tensor | None,
        method: str,
        eta: float,
        progress: bool,
    ) -> Tensor:
        batch = labels.shape[0]
        y = self._state_labels(labels, x.device)
        for guidance in self.guidances:
            guidance.begin_batch(labels, image_ids)
        with value_checks(False):  # inputs were checked before the loop: no NaN scans (host syncs) per step
            for index in progress_bar(indices, disable=not progress, desc=f"sampling ({method})", leave=False):
                noise = None if noise_steps is None else noise_steps[index]
                x = self._step(x, index, y, noise, batch, image_ids, method, eta)
        final = x[:batch]
        for guidance in self.guidances:
            guidance.end_batch(final, labels)
        return final

    def _step(
        self,
        x: Tensor,
        index: int,
        y: Tensor,
        noise: Tensor | None,
        batch: int,
        image_ids: Sequence[ImageId],
        method: str,
        eta: float,
    ) -> Tensor:
        """One step, replayed from a CUDA graph when graphs are on and every active guidance is capturable."""

        def step(x: Tensor, y: Tensor, noise: Tensor | None) -> Tensor:
            return sample_step(
                self.model_fn,
                self.diffusion,
                x,
                index,
                y,
                noise,
                self.guidances,
                rows=batch,
                image_ids=image_ids,
                method=method,
                eta=eta,
                model_jacobian=self.model_jacobian,
            )

        active = [g for g in self.guidances if g.active(index)]
        if self.graphs is None or not all(g.capturable for g in active):
            return step(x, y, noise)
        key = (method, eta, index, tuple(x.shape), noise is None, tuple(g.capture_key(image_ids) for g in active))
        return self.graphs.run(key, step, x, y, noise)

    def sample(
        self,
        labels: Tensor | Sequence[int],
        image_ids: Sequence[ImageId],
        latent_shape: Sequence[int],
        device: torch.device | str,
        progress: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Ancestral sampling over all N steps.

        Args:
            labels: [B] class labels.
            image_ids: [(class_index, image_index, seed)] per image; they give the trajectory noise.
            latent_shape: (C, H, W).
            device: where to sample.
            progress: show a progress bar.
            dtype: dtype of the noise and latents.

        Returns:
            [B, C, H, W] final latents (the x̂0 of index 0, plus any guidance delta of that step), in `dtype`.

        Raises:
            ValueError: if labels is not a non-empty [B] of classes in 0..num_classes - 1, or image_ids are not B
                triples.
        """
        labels = _as_labels(labels, self.num_classes)
        image_ids = _check_image_ids(image_ids, labels.shape[0])
        noise = batch_trajectory_noise(
            image_ids, latent_shape, self.diffusion.num_steps, device, dtype, self.rows_per_image
        )
        x = torch.cat([noise.initial] * self.rows_per_image)
        indices = range(self.diffusion.num_steps - 1, -1, -1)
        return self._loop(x, labels, image_ids, indices, noise.steps, "ddpm", 0.0, progress)

    def ddim_sample(
        self,
        labels: Tensor | Sequence[int],
        image_ids: Sequence[ImageId] | None = None,
        latent_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        *,
        start_index: int | None = None,
        x_start: Tensor | None = None,
        eta: float = 0.0,
        progress: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """DDIM from respaced index start_index down to 0.

        The last step goes from index 0 to ᾱ = 1 (returns x̂0), as diffusers' DDIMScheduler with
        set_alpha_to_one. Guidances run as in `sample`. D3HR: GaussianDiffusion(50, timestep_spacing="leading"),
        its start_step 18 (of 50, timestep 620) is start_index=31 here. Not reproduced: D3HR's own update uses ᾱ at
        max(1, t - 20) as the previous ᾱ, so its last two steps end at ᾱ_1 instead of ᾱ_0 and 1.

        Args:
            labels: [B] class labels.
            image_ids: [(class_index, image_index, seed)] per image, for the noise (needed without x_start, or with
                eta > 0).
            latent_shape: (C, H, W) (needed without x_start).
            device: where to sample (needed without x_start).
            start_index: the first respaced index (default N-1).
            x_start: [B, C, H, W] latents at start_index (e.g. from `ddim_invert`, as D3HR); without it the
                initial latents come from image_ids' trajectory noise.
            eta: DDIM η; eta > 0 draws the per-step noise from image_ids.
            progress: show a progress bar.
            dtype: dtype of the noise and latents.

        Returns:
            [B, C, H, W] final latents.

        Raises:
            ValueError: if labels, image_ids, start_index or x_start are invalid, or the noise is needed and
                image_ids (and latent_shape, device without x_start) are missing.
        """
        labels = _as_labels(labels, self.num_classes)
        start = self.diffusion.num_steps - 1 if start_index is None else self.diffusion._check_index(start_index)
        need_noise = x_start is None or eta > 0
        if need_noise and (image_ids is None or (x_start is None and (latent_shape is None or device is None))):
            raise ValueError("image_ids (and latent_shape, device without x_start) are required for noise")
        image_ids = _check_image_ids(image_ids, labels.shape[0]) if image_ids is not None else []
        noise = None
        if need_noise:
            shape = latent_shape if x_start is None else x_start.shape[1:]
            where = device if x_start is None else x_start.device
            noise = batch_trajectory_noise(
                image_ids, shape, self.diffusion.num_steps, where, dtype, self.rows_per_image
            )
        if x_start is None:
            x = noise.initial
        else:
            if x_start.dim() != 4 or x_start.shape[0] != labels.shape[0]:
                raise ValueError(f"x_start: expected [{labels.shape[0]}, C, H, W], got {list(x_start.shape)}")
            x = x_start.to(dtype)
        x = torch.cat([x] * self.rows_per_image)
        steps = noise.steps if (noise is not None and eta > 0) else None
        return self._loop(x, labels, image_ids, range(start, -1, -1), steps, "ddim", eta, progress)

    def dpm_solver_sample(
        self,
        labels: Tensor | Sequence[int],
        image_ids: Sequence[ImageId],
        latent_shape: Sequence[int],
        device: torch.device | str,
        num_steps: int | None = None,
        solver_order: int = 2,
        progress: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Deterministic DPM-Solver++ from the same initial latents as `sample`.

        diffusers' DPMSolverMultistepScheduler on the original T-step betas, on the timesteps the sampler's diffusion
        keeps (its `timestep_spacing`), or on diffusers' default "linspace" timesteps when num_steps is given.
        Guidances are not run (a multistep solver has no single-step update to add deltas to), so a sampler with
        guidances refuses. The scheduler itself does a few host syncs per step (diffusers' step-index bookkeeping).

        Args:
            labels: [B] class labels.
            image_ids: [(class_index, image_index, seed)] per image.
            latent_shape: (C, H, W).
            device: where to sample.
            num_steps: solver steps on diffusers' "linspace" timesteps (default: the diffusion's own timesteps).
            solver_order: the solver order.
            progress: show a progress bar.
            dtype: dtype of the initial noise.

        Returns:
            [B, C, H, W] final latents.

        Raises:
            ValueError: if the sampler has guidances, labels is invalid or image_ids are not B triples.
        """
        from diffusers import DPMSolverMultistepScheduler

        if self.guidances:
            raise ValueError("guidances: dpm_solver_sample does not run guidances; use sample() or ddim_sample()")
        labels = _as_labels(labels, self.num_classes)
        image_ids = _check_image_ids(image_ids, labels.shape[0])
        initial = batch_trajectory_noise(image_ids, latent_shape, 1, device, dtype).initial
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=self.diffusion.num_train_steps,
            trained_betas=self.diffusion.train_betas.numpy(),
            solver_order=solver_order,
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
        )
        if num_steps is None:
            scheduler.set_timesteps(timesteps=self.diffusion.timesteps.flip(0).tolist(), device=device)
        else:
            scheduler.set_timesteps(num_steps, device=device)
        x = torch.cat([initial] * self.rows_per_image)
        y = self._state_labels(labels, x.device)
        with torch.no_grad():
            for t in progress_bar(scheduler.timesteps, disable=not progress, desc="dpm-solver++", leave=False):
                out = self.model_fn(x, t.expand(x.shape[0]), y)
                eps, _ = self.diffusion.split_model_output(out, x)
                x = scheduler.step(eps, t, x).prev_sample
        return x[: labels.shape[0]]


def ddim_invert(
    model: nn.Module | ModelFn,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    y: Tensor,
    target_index: int,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    cfg_channels: int | None = None,
    *,
    eps_timestep: str = "next",
    return_intermediates: bool = False,
    progress: bool = False,
) -> Tensor:
    """Deterministic DDIM inversion of clean latents x0 (index 0) to respaced index target_index.

    Clean CFG (all eps channels by default, as D3HR's diffusers pipeline). To reproduce D3HR use
    GaussianDiffusion(50, timestep_spacing="leading") (timesteps 0, 20, ..., 980): its stored latent after
    inversion step k (timestep 20k) is index k here. Sampling back down to index 0 ends with the step to
    ᾱ = 1, so a round trip returns x̂0 of x0 at timestep 0, not x0 itself.

    Args:
        model: model(x, t, y) or a ModelFn.
        diffusion: the respaced diffusion.
        x0: [B, C, H, W] clean latents.
        y: [B] class labels.
        target_index: respaced index to invert to.
        cfg_scale: CFG scale.
        null_class: the unconditional label.
        cfg_channels: guided eps channels (None: all).
        eps_timestep: "next" (D3HR): step i -> i+1 evaluates the model at timesteps[i+1] on x_i; "current"
            (IDDPM ddim_reverse_sample): at timesteps[i].
        return_intermediates: return the latents of every index 0..target_index, stacked.
        progress: show a progress bar.

    Returns:
        [B, C, H, W] x at target_index, or with return_intermediates the latents at indices 0..target_index:
        [target_index + 1, B, C, H, W].

    Raises:
        ValueError: if eps_timestep or target_index is invalid, or x0 / y are not [B, C, H, W] / [B].
    """
    if eps_timestep not in ("next", "current"):
        raise ValueError(f"eps_timestep must be 'next' or 'current', got {eps_timestep!r}")
    diffusion._check_index(target_index)
    if x0.dim() != 4 or y.shape != (x0.shape[0],):
        raise ValueError(f"x0, y: expected [B, C, H, W] and [B], got {list(x0.shape)} and {list(y.shape)}")
    model_fn = guided_model(model, cfg_scale, null_class, cfg_channels)
    timesteps = diffusion.timesteps_on(x0.device)
    y = y.to(x0.device)
    x, kept = x0, [x0]
    with torch.no_grad():
        for i in progress_bar(range(target_index), disable=not progress, desc="ddim inversion", leave=False):
            t = timesteps[i + 1 if eps_timestep == "next" else i].expand(x.shape[0])
            eps, _ = diffusion.split_model_output(model_fn(x, t, y), x)
            x = diffusion.ddim_inversion_step(eps, x, i)
            if return_intermediates:
                kept.append(x)
    return torch.stack(kept) if return_intermediates else x
