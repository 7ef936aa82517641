"""Registry of distillation methods for `fastdd distill --method NAME`.

A method is a builder `builder(ctx: MethodContext) -> MethodSetup`: from the parsed arguments, the loaded
models and (lazily) the real data it returns the guidances to plug into `GuidedSampler`, the hyper-parameters
to record in the manifest, and optionally a per-batch preparation hook and a sampling override.

Register a new method (e.g. in fastdd/guidance/<name>.py or a plug-in) with

    from fastdd.methods import MethodSetup, register_method

    def build_mine(ctx):
        return MethodSetup(guidances=[MyGuidance(...)], params={"scale": ctx.args.mine_scale})

    register_method("mine", build_mine, add_arguments=lambda p: p.add_argument("--mine-scale", type=float, default=1.0),
                    needs_data=True, help="my guidance")

Conventions a builder can rely on:
- Guidances see *local* class indices 0..num_classes-1 (positions in the class list) in ctx.y, in image_ids and in
  begin_batch / end_batch labels, even when the model's labels differ (ImageNet DiT: 1000 labels); the pipeline
  wraps them in `LocalLabels`.
- Resume replays `end_batch(final_latents, local_labels)` of every guidance on every finished batch, in plan
  order, so memory-like state is restored exactly.
- A batch may hold several images of a class (--images-per-batch); a builder whose guidances carry state from a
  class's earlier images to its later ones (memories filled by end_batch) calls
  `ctx.require_one_image_per_batch(reason)` before any heavy work, which refuses that.
- `ctx.dry_run`: do no heavy work (only validate inputs); `ctx.state_dir`: a folder in the run directory for
  caches (None in dry runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling.sampler import Guidance, ImageId, StepContext


def parse_range(text: str, option: str) -> tuple[int, int]:
    """'low,high' of respaced indices for 50 steps (0 <= low <= high <= 49); ValueError naming option."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be two integers low,high, got {text!r}") from None
    if not 0 <= low <= high <= 49:
        raise ValueError(f"{option} must satisfy 0 <= low <= high <= 49, got {text!r}")
    return low, high


def rescale_index(index: int, steps: int, of_steps: int = 50) -> int:
    """A respaced step index given for `of_steps` sampling steps (the papers' 50), rescaled to `steps`."""
    return round(index * (steps - 1) / (of_steps - 1))


@dataclass
class Models:
    """The loaded generator. prior: DiT; codec: PixelCodec or LatentCodec (decode: latents -> images in [-1, 1]);
    latent_shape: (C, h, w) of the sampler; image_shape: (C, H, W) of decoded images; class_labels: the model
    label of each local class; num_model_classes: the model's label count (its null class comes after)."""

    prior: torch.nn.Module
    codec: Any
    diffusion: Any
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    class_labels: list[int]
    num_model_classes: int
    device: torch.device
    description: dict = field(default_factory=dict)


@dataclass
class RealData:
    """Real images of the selected classes, loaded on first use. images: [N, C, S, S] in [-1, 1] at the
    decoded image size; labels: [N] local class indices (files in sorted order within a class)."""

    loader: Callable[[], tuple[Tensor, Tensor]]
    description: str
    _cache: tuple[Tensor, Tensor] | None = None

    def load(self) -> tuple[Tensor, Tensor]:
        if self._cache is None:
            self._cache = self.loader()
        return self._cache


@dataclass
class MethodContext:
    args: argparse.Namespace
    models: Models
    data: RealData
    class_names: list[str]
    dataset: str  # "digits", "imagenette", "imagewoof" or "custom"
    dry_run: bool = False
    state_dir: Path | None = None
    progress: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def require_one_image_per_batch(self, reason: str) -> None:
        """ValueError naming --images-per-batch unless every batch holds one image per class, so that state a
        guidance keeps from a class's earlier images (reason: which) sees them one at a time."""
        per_batch = self.args.images_per_batch
        if min(per_batch, self.args.ipc) > 1:
            raise ValueError(f"--images-per-batch {per_batch}: {self.args.method}: {reason}, so each class's images "
                             "are made one at a time; use --images-per-batch 1")  # fmt: skip

    def guided_range(self, low: int, high: int, of_steps: int = 50) -> tuple[int, int]:
        """A guided step range [low, high] given for `of_steps` sampling steps, rescaled to --steps."""
        return rescale_index(low, self.args.steps, of_steps), rescale_index(high, self.args.steps, of_steps)


@dataclass
class MethodSetup:
    """What a method contributes to the run.

    guidances: in the order their deltas are added; params: the method's hyper-parameters (JSON-able) for the
    manifest; prepare(local_classes): called before each batch with the local class of each of its rows (a class
    repeats when the batch holds several of its images; e.g. to select per-class targets);
    sample(sampler, labels, image_ids, latent_shape, device) -> final latents [B, C, h, w]: replaces the default
    `sampler.sample` (e.g. DDIM from inverted latents).
    """

    guidances: list[Guidance] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    prepare: Callable[[Sequence[int]], None] | None = None
    sample: Callable[..., Tensor] | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    builder: Callable[[MethodContext], MethodSetup]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    needs_data: bool
    help: str


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    builder: Callable[[MethodContext], MethodSetup],
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    needs_data: bool = False,
    help: str = "",
) -> None:
    """Make `fastdd distill --method name` available. add_arguments(parser) adds the method's own options
    (prefix them with the method name); needs_data: the method reads real images (ctx.data)."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"name: method names are alphanumeric (with - or _), got {name!r}")
    if name in METHODS and METHODS[name].builder is not builder:
        raise ValueError(f"name: method {name!r} is already registered")
    METHODS[name] = MethodSpec(name, builder, add_arguments, needs_data, help)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# ----------------------------------------------------------------------------------------- label mapping
class LocalLabels(Guidance):
    """Runs a guidance written for local class indices inside a sampler that uses model labels.

    label_map: [num_model_classes + 1] long, model label -> local index (the null class and unused labels -> 0;
    only the conditional rows' labels are meaningful). image_ids already hold local class indices.
    """

    def __init__(self, inner: Guidance, label_map: Tensor):
        self.inner, self.label_map = inner, label_map
        self.requires_grad, self.low, self.high = inner.requires_grad, inner.low, inner.high

    @property
    def capturable(self) -> bool:
        return self.inner.capturable

    def active(self, index: int) -> bool:
        return self.inner.active(index)

    def capture_key(self, image_ids: Sequence[ImageId]):
        return self.inner.capture_key(image_ids)

    def step(self, ctx: StepContext) -> Tensor:
        if self.label_map.device != ctx.y.device:
            self.label_map = self.label_map.to(ctx.y.device)  # once, not a host-to-device copy per step
        local = dataclasses.replace(ctx, y=self.label_map[ctx.y])
        return self.inner.step(local)

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        self.inner.begin_batch(torch.tensor([c for c, _, _ in image_ids]), image_ids)

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        self.inner.end_batch(final_latents, self.label_map.to(labels.device)[labels])


def label_map(class_labels: Sequence[int], num_model_classes: int) -> Tensor:
    table = torch.zeros(num_model_classes + 1, dtype=torch.long)
    table[torch.as_tensor(list(class_labels), dtype=torch.long)] = torch.arange(len(class_labels))
    return table


# ----------------------------------------------------------------------------------------- dit
def build_dit(ctx: MethodContext) -> MethodSetup:
    """The unguided prior (plain class-conditional sampling with CFG)."""
    return MethodSetup()


# ----------------------------------------------------------------------------------------- igd
# (k, gamma) per dataset and IPC bound for DiT weights (SPEC "IGD" presets); digits: the pixel-space prior, gamma
# scaled by the latent size (16·16 values instead of 4·32·32: 120 · 256 / 4096 ≈ 8).
IGD_PRESETS = {
    "imagenette": [(10, 5.0, 50.0), (None, 5.0, 120.0)],
    "imagewoof": [(10, 5.0, 50.0), (None, 5.0, 120.0)],
    "imagenet": [(None, 5.0, 120.0)],
    "digits": [(None, 5.0, 8.0)],
}


def igd_preset(dataset: str, ipc: int) -> tuple[float, float]:
    for bound, k, gamma in IGD_PRESETS.get(dataset, IGD_PRESETS["imagenet"]):
        if bound is None or ipc <= bound:
            return k, gamma
    raise AssertionError("every preset list ends with an open bound")


def add_igd_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("igd (influence-guided diffusion)")
    group.add_argument("--surrogate", default=None,
                       help="surrogate file from `fastdd surrogate` (default: the shipped digits one, or computed from "
                       "--data and cached in DIR/.fastdd)")  # fmt: skip
    group.add_argument("--igd-k", type=float, default=None, help="influence scale k (default: SPEC preset)")
    group.add_argument("--igd-gamma", type=float, default=None, help="deviation scale gamma (default: SPEC preset)")
    group.add_argument("--igd-range", default="30,45", help="guided respaced steps low,high for 50 steps (rescaled to --steps)")
    group.add_argument("--igd-memory", type=int, default=64, help="deviation memory capacity per class")
    group.add_argument("--surrogate-epochs", type=int, default=20, help="trajectory length when computed on the fly")


def _load_bundle(path: str | Path):
    from .surrogate import SurrogateBundle

    return SurrogateBundle.load(path)


def check_bundle(bundle, ctx: MethodContext, source: str) -> None:
    """The surrogate must match the class list and the decoded images."""
    config, (channels, height, _) = bundle.config, ctx.models.image_shape
    if config.num_classes != ctx.num_classes or bundle.real_grads.shape[0] != ctx.num_classes:
        raise ValueError(f"--surrogate {source}: made for {config.num_classes} classes, the class list has {ctx.num_classes}")
    if config.channel != channels:
        raise ValueError(f"--surrogate {source}: takes {config.channel}-channel images, the prior makes {channels}")


def igd_bundle(ctx: MethodContext):
    """The surrogate bundle: --surrogate, the shipped digits bundle, or computed from the real data (cached)."""
    from .surrogate import DIGITS_SURROGATE_PATH, compute_surrogate_bundle, surrogate_config_for

    path = ctx.args.surrogate
    if path is None and ctx.dataset == "digits" and DIGITS_SURROGATE_PATH.is_file():
        path = str(DIGITS_SURROGATE_PATH)
    if path is not None:
        bundle = _load_bundle(path)
        check_bundle(bundle, ctx, path)
        return bundle, path
    if ctx.args.surrogate_epochs <= 0:
        raise ValueError(f"--surrogate-epochs must be > 0, got {ctx.args.surrogate_epochs}")
    if ctx.dry_run:
        return None, "computed from the real data at the start of the run"
    cache = ctx.state_dir / f"surrogate_seed{ctx.args.seed}_epochs{ctx.args.surrogate_epochs}.safetensors"
    if cache.is_file():
        return _load_bundle(cache), str(cache)
    images, labels = ctx.data.load()
    config = surrogate_config_for(ctx.models.image_shape, ctx.num_classes)
    bundle = compute_surrogate_bundle(config, images, labels, epochs=ctx.args.surrogate_epochs, seed=ctx.args.seed,
                                      flip=ctx.dataset != "digits", progress=ctx.progress)  # fmt: skip
    bundle.save(cache)
    return bundle, str(cache)


def build_igd(ctx: MethodContext) -> MethodSetup:
    """IGD: deviation guidance (per-class cosine memory) + influence guidance (surrogate gradient matching)."""
    from .guidance import DeviationGuidance, InfluenceGuidance

    args = ctx.args
    k, gamma = igd_preset(ctx.dataset, args.ipc)
    k = k if args.igd_k is None else args.igd_k
    gamma = gamma if args.igd_gamma is None else args.igd_gamma
    low, high = parse_range(args.igd_range, "--igd-range")
    if k < 0 or gamma < 0:
        raise ValueError(f"--igd-k and --igd-gamma must be >= 0, got {k} and {gamma}")
    if args.igd_memory <= 0:
        raise ValueError(f"--igd-memory must be > 0, got {args.igd_memory}")
    if gamma > 0:
        ctx.require_one_image_per_batch("its deviation guidance (--igd-gamma > 0) pushes each image away from the "
                                        "earlier images of its class")  # fmt: skip
    low, high = ctx.guided_range(low, high)
    bundle, source = igd_bundle(ctx)
    params = {"k": k, "gamma": gamma, "guided_range": [low, high], "memory": args.igd_memory, "surrogate": source}
    if bundle is None:
        return MethodSetup(params=params)
    params["surrogate_epochs_kept"] = bundle.epochs
    device = ctx.models.device
    surrogate = bundle.config.build().to(device).eval().requires_grad_(False)
    size = bundle.config.im_size
    codec = ctx.models.codec

    def decode(latents: Tensor) -> Tensor:
        images = codec.decode(latents)
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    deviation = DeviationGuidance(ctx.num_classes, math.prod(ctx.models.latent_shape), gamma=gamma, capacity=args.igd_memory, low=low, high=high,
                                  compat=args.compat, device=device)  # fmt: skip
    influence = InfluenceGuidance(decode, surrogate, bundle.flat_params.to(device), bundle.real_grads.to(device),
                                  k=k, low=low, high=high, compat=args.compat)  # fmt: skip
    return MethodSetup(guidances=[deviation, influence], params=params)


register_method("dit", build_dit, help="unguided class-conditional sampling from the prior (baseline)")
register_method("igd", build_igd, add_arguments=add_igd_arguments, needs_data=False,
                help="influence-guided diffusion (Chen et al., ICLR 2025): deviation + influence guidance")  # fmt: skip
from . import distill_methods  # noqa: E402,F401  (registers dap, mgd3, d3hr, sam, igds)
