"""What a method's run wiring receives and returns.

A method is a `Method`: a frozen options dataclass (`fastdd.options`) and a builder
`build(options, spec: RunSpec, models: Models, data: RealData) -> MethodSetup`, which returns the guidances to plug
into `GuidedSampler`, the resolved hyper-parameters for the manifest, and optionally a per-batch hook and a sampling
override. Builders raise ValueError naming the CLI option on bad input and do no heavy work in a dry run.

Conventions a builder can rely on:
- Guidances see *local* class indices 0..num_classes-1 (positions in the class list) in ctx.y, in image_ids and in
  begin_batch / end_batch labels, even when the model's labels differ (ImageNet DiT: 1000 labels); the pipeline
  wraps them in `LocalLabels`.
- Resume replays `end_batch(final_latents, local_labels)` of every guidance on every finished batch, in plan
  order, so memory-like state is restored exactly.
- A batch may hold several images of a class (images_per_batch); a builder whose guidances carry state from a
  class's earlier images to its later ones calls `require_one_image_per_batch(spec, reason)` before heavy work.
- `spec.state_dir`: a folder in the run directory for caches (a dry run only looks into it: whether a cache exists
  decides what is left to estimate).
"""

from __future__ import annotations

import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.latents import ClassCache
from ..data.real import RealData, fingerprint_of
from ..options import REQUIRED, documented, flag_of, option, option_fields
from ..sampling.sampler import Guidance

STATE_DIR = ".fastdd"
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
SPACINGS = ("iddpm", "leading", "trailing")
PRECISIONS = ("fp32", "bf16")
MAX_IMAGES = 2_000_000  # a larger plan is refused (ImageNet-1K at IPC 2,000)


@documented
@dataclass(frozen=True)
class RunSpec:
    """Everything a `fastdd distill` run is given except the method's own options (`fastdd distill`'s global flags).

    The images depend on every field but device, workers, dry_run, quiet, compile and cuda_graphs (the run config in
    the manifest records the others)."""

    method: str = option(REQUIRED, "the distillation method (`fastdd distill --help` lists each with its options)")
    ipc: int = option(REQUIRED, "images per class")
    out: str = option(REQUIRED, "output folder (resumed if it holds this run's manifest)")
    data: str | None = option(None, "real ImageFolder (default: the scikit-learn digits, offline)")
    classes: str | None = option(
        None,
        "the classes: imagenette | imagewoof | imagenet1k (the 1,000 wnids, label = index) | FILE ('name [label]' "
        "per line) (default: every class folder of --data, or the prior's classes)",
    )
    model: str | None = option(
        None,
        "the generator: a fastdd prior, an official DiT checkpoint (.pt/.safetensors), a diffusers DiT or pipeline "
        "folder, or a hub id (default: the bundled digits prior without --data, facebook/DiT-XL-2-256 with --data)",
    )
    vae: str | None = option(
        None,
        "the VAE that decodes latents: mse (stabilityai/sd-vae-ft-mse) | ema | none | hub id | folder (default: a "
        "diffusers pipeline's own vae/, else mse for DiT checkpoints; pixel-space priors take none)",
    )
    seed: int = option(
        0, "run seed; image i of class c is seeded by hash(seed, c, i), so it does not depend on the others"
    )
    steps: int = option(50, "sampling steps, respaced from the 1000 training steps (guided step ranges are rescaled)")
    sampler: str = option(
        "ddpm", "ancestral DDPM (the authors'), DDIM, or DPM-Solver++ (unguided methods only)", choices=SAMPLERS
    )
    spacing: str | None = option(
        None,
        "timesteps kept of the 1000: iddpm (the official DiT sampler's 999, 979, ...), leading (DiTPipeline's DDIM: "
        "980, 960, ...) or trailing — default: the method's (d3hr: leading, else iddpm; with --compat the authors')",
        choices=SPACINGS,
    )
    eta: float = option(
        0.0, "DDIM's noise scale η with --sampler ddim (0: deterministic; 1: as ancestral DDPM; Song et al. 2021)"
    )
    cfg_scale: float | None = option(None, "CFG scale (default 4.0; digits 2.0)")
    compat: bool = option(
        False,
        "the authors' settings for the method: their DiT numerics, spacing, CFG channels and the shadow rows of the "
        "official 2-row loop (README: Bring your own weights); an explicit --numerics / --spacing still wins",
    )
    class_batch: int = option(
        10, "classes sampled together in one batch; torchrun processes get whole chunks of this many classes"
    )
    device: str | None = option(None, "torch device (default: cuda when available, else cpu)")
    precision: str = option(
        "fp32",
        "bf16: DiT forward and VAE decoder under bf16 autocast (guidance reductions stay fp32)",
        choices=PRECISIONS,
    )
    images_per_batch: int = option(
        1,
        "consecutive images of each class in a batch (rows: classes × this); the same "
        "images as 1, up to float rounding, for every method but igds (its entropy term "
        "spans the batch); igd with --igd-gamma > 0 needs 1",
    )
    workers: int | None = option(
        None,
        "DataLoader worker processes that decode real images (default: min(4, CPUs); 0: in this process); does not "
        "change the images",
    )
    compile: bool = option(False, "torch.compile the DiT (first batch pays compilation)")
    cuda_graphs: bool = option(False, "replay whole sampling steps as CUDA graphs from the second batch on (CUDA only)")
    fast: bool = option(
        False, "opt-in approximation: guidance gradients skip the DiT Jacobian (no backward through the DiT)"
    )
    numerics: str | None = option(
        None,
        "DiT numerics: official (the DiT code's timestep frequencies; the authors' IGD/MGD3/SAM runs) or diffusers "
        "(DiTPipeline's; D3HR) — default: those of the weights' format",
        choices=("official", "diffusers"),
    )
    revision: str | None = option(None, "hub revision (branch, tag or commit) of a --model hub id")
    num_heads: int | None = option(
        None, "attention heads of an official checkpoint whose width is not a standard DiT variant"
    )
    allow_missing_keys: bool = option(
        False,
        "load an official DiT checkpoint that lacks some keys (they keep the "
        "official initialisation; the missing keys are listed); default: refused",
    )
    dry_run: bool = option(False, "print the plan and a time estimate, write nothing")
    quiet: bool = option(False, "no progress bars and no closing summary line (errors still print)")

    def validate(self) -> None:
        """ValueError naming the flag of the first invalid field (before anything is loaded or written)."""
        check_options(self)
        if self.ipc <= 0:
            raise ValueError(f"--ipc must be > 0, got {self.ipc}")
        if self.ipc > MAX_IMAGES:
            raise ValueError(f"--ipc {self.ipc} is larger than fastdd's limit of {MAX_IMAGES:,} images per run")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.steps <= 1:
            raise ValueError(f"--steps must be > 1, got {self.steps}")
        if self.class_batch <= 0:
            raise ValueError(f"--class-batch must be > 0, got {self.class_batch}")
        if self.images_per_batch <= 0:
            raise ValueError(f"--images-per-batch must be > 0, got {self.images_per_batch}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"--cfg-scale must be >= 0, got {self.cfg_scale}")
        if self.eta < 0:
            raise ValueError(f"--eta must be >= 0, got {self.eta}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.num_heads is not None and self.num_heads <= 0:
            raise ValueError(f"--num-heads must be > 0, got {self.num_heads}")

    @property
    def state_dir(self) -> Path:
        """The run's cache folder DIR/.fastdd (a dry run writes nothing there)."""
        return Path(self.out) / STATE_DIR

    @property
    def progress(self) -> bool:
        return not self.quiet


@dataclass
class Models:
    """The loaded generator. prior: DiT; codec: PixelCodec or LatentCodec (decode: latents -> images in [-1, 1]);
    diffusion: the sampling schedule; latent_shape: (C, h, w) of the sampler; image_shape: (C, H, W) of decoded
    images; class_labels: the model label of each local class; num_model_classes: the model's label count (its null
    class comes after); description: what the manifest records about the weights."""

    prior: nn.Module
    codec: Any
    diffusion: Any
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    class_labels: list[int]
    num_model_classes: int
    device: torch.device
    description: dict = field(default_factory=dict)


@dataclass
class Cost:
    """What a method adds to plain sampling, for the dry run's time estimate (`fastdd.pipeline.estimate_seconds`).

    guided_steps: sampling steps with a guidance backward, each costing `guided_step_calls` model forwards (measured
    per method on the digits default); sampling_steps: the steps each image is sampled for (default: the run's);
    state(probe, classes) -> seconds of the per-run state still to compute (surrogate, fine-tuning, inversion,
    estimator) for the local classes whose batches are left, from timed probes; None when nothing is left (cached).
    """

    guided_steps: int = 0
    guided_step_calls: float = 3.0
    sampling_steps: int | None = None
    state: Callable[[Any, set[int]], float] | None = None


@dataclass
class MethodSetup:
    """What a method contributes to the run.

    guidances: in the order their deltas are added; params: the method's resolved hyper-parameters (JSON-able) for
    the manifest; prepare(local_classes): called before each batch with the local class of each of its rows;
    sample(sampler, labels, image_ids, latent_shape, device) -> final latents [B, C, h, w]: replaces the default
    sampling call (e.g. DDIM from inverted latents); cost: the dry run's estimate of its extra work; sampling: how a
    `sample` override samples, for the dry run's plan (default: the run's sampler settings).
    """

    guidances: list[Guidance] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    prepare: Callable[[Sequence[int]], None] | None = None
    sample: Callable[..., Tensor] | None = None
    cost: Cost = field(default_factory=Cost)
    sampling: str | None = None


@dataclass(frozen=True)
class SamplingSettings:
    """A run's resolved sampling settings (recorded in the manifest), and what --compat sets for a method: those of
    its authors' code.

    numerics: "official" (the DiT repository's model code), "diffusers" (DiTPipeline's) or None (the weights'
    format's); spacing: see SPACINGS; cfg_channels: eps channels CFG guides (None: all); shadow_rows: the official
    sampler's 2-row [cond; uncond] loop in which the unconditional row keeps its own variance and noise."""

    numerics: str | None = None
    spacing: str = "iddpm"
    cfg_channels: int | None = None
    shadow_rows: bool = False

    @classmethod
    def of(cls, spec: RunSpec, method: Method) -> SamplingSettings:
        """--compat: the method's authors' settings, else fastdd's (the method's spacing); an explicit --numerics /
        --spacing wins over both."""
        base = method.authors if spec.compat else cls(spacing=method.spacing)
        return replace(base, numerics=spec.numerics or base.numerics, spacing=spec.spacing or base.spacing)


OFFICIAL_DIT = SamplingSettings("official", "iddpm", 3, True)  # DiT's sample.py: IGD, Minimax, SAM, MGD3 (DAP, IGDS)
DIT_PIPELINE = SamplingSettings("diffusers", "leading", None, False)  # diffusers' DiTPipeline: D3HR


@dataclass(frozen=True)
class Method:
    """A registered method: its name, options dataclass, builder, whether it reads real images, a one-line help, its
    authors' settings (--compat), its default spacing, and whether it guides the sampler's steps (then it needs a
    single-step sampler, not DPM-Solver++)."""

    name: str
    options: type
    build: Callable[[Any, RunSpec, Models, RealData], MethodSetup]
    needs_data: bool
    help: str
    authors: SamplingSettings = OFFICIAL_DIT
    spacing: str = "iddpm"
    guides_steps: bool = True


# ----------------------------------------------------------------------------------------- helpers for builders
def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether value fits a field annotation (int, float, str, bool, tuple[int, int], X | None); bools are not ints."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, a) for v, a in zip(value, typing.get_args(hint)))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_options(options: Any) -> None:
    """ValueError naming the flag of the first field of `options` (a dataclass of `option` fields) whose value has
    another type than its annotation (the Python API: seed=0.5, out=None), is a NaN or infinite float (it would turn
    every image black or into noise without an error) or is not one of its choices."""
    hints = typing.get_type_hints(type(options))
    for option_field in option_fields(type(options)):
        value, choices = getattr(options, option_field.name), option_field.metadata.get("choices")
        if not _type_ok(value, hints[option_field.name]):
            expected = str(hints[option_field.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{flag_of(option_field)} must be {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag_of(option_field)} must be a finite number, got {value}")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{flag_of(option_field)} must be one of {', '.join(choices)}, got {value!r}")


# bump when a cached artefact's content changes meaning; 2: SAM's gammas in Minimax's blocks (all blocks of a DiT of
# depth <= 14); 3: keys name numerics, precision, compat, the scheduler and hub snapshots
CACHE_FORMAT = 3
# what the manifest and every cache record of the weights: source, fingerprint, hub revision and resolved snapshot
WEIGHT_KEYS = ("model", "model_sha256", "revision", "model_snapshot", "vae", "vae_sha256", "vae_snapshot")


def cache_inputs(spec: RunSpec, models: Models, data: RealData, depends_on: dict) -> dict:
    """Everything a cached or shared artefact depends on, in one place (every cache, the shared D3HR statistics folder
    and the manifest's run config name the same facts): format version, the real data (`RealData.fingerprint`), the
    weights of the model and the VAE (fingerprints, hub snapshots), the DiT numerics, the scheduler a diffusers
    pipeline brings, --precision, --compat, and `depends_on` (the method options and seeds it depends on)."""
    weights = {k: models.description.get(k) for k in WEIGHT_KEYS}
    return {
        "format": CACHE_FORMAT,
        "data": data.fingerprint,
        "weights": weights,
        "numerics": models.description.get("numerics"),
        "scheduler": models.description.get("scheduler"),
        "precision": spec.precision,
        "compat": spec.compat,
        **depends_on,
    }


def cache_key(inputs: dict) -> str:
    """A short hash of `cache_inputs`: a cache is named by it, so changed inputs never reuse an old artefact."""
    return fingerprint_of(inputs)[:12]


def read_cache(path: Path, load: Callable[[Path], Any], dry_run: bool = False) -> Any:
    """load(path) of a cached artefact, or None when it is missing or unreadable (a corrupt file, e.g. from a full
    disk, is removed and said on stderr, so the caller computes it again; a dry run leaves it)."""
    if not path.is_file():
        return None
    try:
        return load(path)
    except Exception as err:  # safetensors, torch and JSON raise their own error types for corrupt files
        if not dry_run:
            print(
                f"fastdd: cached {path.name} is unreadable ({type(err).__name__}); computing it again", file=sys.stderr
            )
            path.unlink(missing_ok=True)
        return None


def cache_path(spec: RunSpec, models: Models, data: RealData, kind: str, depends_on: dict) -> Path:
    """spec.state_dir / '<kind>_<cache_key>.safetensors'."""
    return spec.state_dir / f"{kind}_{cache_key(cache_inputs(spec, models, data, depends_on))}.safetensors"


def rescale_index(index: int, steps: int, of_steps: int = 50) -> int:
    """A respaced step index given for `of_steps` sampling steps (the papers' 50), rescaled to `steps`."""
    return round(index * (steps - 1) / (of_steps - 1))


def guided_range(spec: RunSpec, low_high: tuple[int, int], of_steps: int = 50) -> tuple[int, int]:
    """A guided step range (low, high) given for `of_steps` sampling steps, rescaled to spec.steps."""
    return rescale_index(low_high[0], spec.steps, of_steps), rescale_index(low_high[1], spec.steps, of_steps)


def require_one_image_per_batch(spec: RunSpec, reason: str) -> None:
    """ValueError naming --images-per-batch unless every batch holds one image per class, so that state a guidance
    keeps from a class's earlier images (reason: which) sees them one at a time."""
    if min(spec.images_per_batch, spec.ipc) > 1:
        raise ValueError(
            f"--images-per-batch {spec.images_per_batch}: {spec.method}: {reason}, so each class's "
            "images are made one at a time; use --images-per-batch 1"
        )


def check_pool(spec: RunSpec, data: RealData, minimum: int, why: str, ipc_bound: bool = True) -> None:
    """Every class has >= minimum real images and, with ipc_bound (methods that pick IPC items from the class),
    >= ipc of them (ValueError naming --data / --ipc otherwise)."""
    for name, count in zip(data.class_names, data.class_counts()):
        check(count > 0, f"--data: class {name!r} has no real images")
        check(count >= minimum, f"--data: class {name!r} has {count} real images, {why} needs at least {minimum}")
        check(
            not ipc_bound or spec.ipc <= count, f"--ipc {spec.ipc} is larger than class {name!r} ({count} real images)"
        )


def real_latents(spec: RunSpec, models: Models, data: RealData, sample: bool = False) -> ClassCache:
    """{local class: [n, C, h, w] real latents}: per class, on first use, the codec's encoder mean (sample=False) or a
    draw seeded from (spec.seed, class) (sample=True), stored per class in the state folder for a VAE (in pixel space
    the images, not stored); at most max(8, --class-batch) classes held in memory."""
    from ..data.latents import class_latents
    from ..models.vae import PixelCodec
    from ..sampling.seeds import image_seed

    data.require()
    device, codec = models.device, models.codec
    folder = None
    if not isinstance(codec, PixelCodec):
        key = cache_key(cache_inputs(spec, models, data, {"sample": sample, "seed": spec.seed}))
        folder = spec.state_dir / f"latents_{key}"

    def compute(c: int) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(image_seed(spec.seed, c, 0)) if sample else None
        return class_latents(data, c, codec, device, sample=sample, generator=generator)

    return ClassCache(range(data.num_classes), compute, folder, keep=max(8, spec.class_batch))


def default_sample(spec: RunSpec, sampler, labels, ids, latent_shape, device, progress: bool = False) -> Tensor:
    """The run's own sampling call: ancestral, DDIM (sampler 'ddim') or DPM-Solver++ on the run's timesteps
    (progress: a bar over the steps)."""
    if spec.sampler == "ddim":
        return sampler.ddim_sample(labels, ids, latent_shape, device, eta=spec.eta, progress=progress)
    if spec.sampler == "dpm-solver++":
        return sampler.dpm_solver_sample(labels, ids, latent_shape, device, progress=progress)
    return sampler.sample(labels, ids, latent_shape, device, progress=progress)
