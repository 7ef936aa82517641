"""Per-image time of plain and guided sampling, per method: the authors' algorithm vs fastdd, side by side on one device.

    fastdd bench [--config tiny|dit-s2-128|dit-xl2-256] [--device cpu|cuda] [--methods dit,igd,...] [--repeats 3]
                 [--batch 4] [--steps 50] [--no-compile] [--bf16] [--fast] [--out DIR]

(`python benchmarks/bench_sampler.py` takes the same options.) Random weights: timing only.

Paths (one record per method and path):
  authors   (a) the method's loop from fastdd.authors_reference: one image per call, fp32, as SPEC restates it.
  eager     (b) fastdd's GuidedSampler with the method's guidances, `--batch` classes per call, default options.
  compiled  (c) (b) with compile=True, and cuda_graphs=True on CUDA (left out by --no-compile).
  bf16      (only with --bf16) (c) with precision="bf16" and the decoders wrapped in `mixed_precision` (with
            --no-compile: (b) with them).
  fast      (only with --fast) (c) (or (b) with --no-compile) with model_jacobian=False: the opt-in approximation
            of `fastdd distill --fast` (no backward through the DiT). bf16 and fast change the math, so they are
            not "fastdd's best path" of speedup_vs_reference.
Warm-up calls are not timed (compilation, CUDA-graph capture, memories and feature caches filled); each time is
the median of --repeats calls.

What is timed per method (guided step windows are SPEC's for 50 steps, rescaled to --steps like `fastdd distill`):
  dit   plain class-conditional ancestral sampling with CFG 4 (authors: the official DiT sampler under no_grad).
        Always run: it is the plain baseline of every method's guided_over_plain.
  igd   deviation + influence guidance on indices [30, 45], K = 4 surrogate checkpoints (authors: Algorithm 1 with
        the [cond; uncond] pair, autograd on every step, K backward passes per guided step, shadow row decoded,
        checkpoints copied from the host every step; two images per call, so the second one uses the deviation
        memory; without the authors' per-step gc.collect() / empty_cache(), so its time is a lower bound).
  dap   Mercer guidance (linear kernel, γ = 1) on the output of block depth // 2 at every step, real features at
        t = 0 of `reals` real latents per class, computed once per class outside the timing (authors: the paper's
        loop, two CFG forwards, one real sample at a time).
  mgd3  mode guidance (λ = 0.1) on indices > 25 (authors: the official sampler plus the mode term).
  igds  information guidance (η = 0.05, β = 0.5) on every step (authors: the paper's loop, two CFG forwards,
        the loss written per image).
  sam   SAM's sampling stage: plain sampling of the DiffFit copy of the prior (the fine-tuning is not timed;
        authors: the official DiT sampler on that model).
  d3hr  D3HR's sampling stage: DDIM (η = 0) from index 31 of 50 on the "leading" schedule, from given latents
        (DDIM inversion and group selection are not timed; authors: the generation loop of diffusers' DiTPipeline
        as SPEC restates it, one DiT forward of the [cond; uncond] pair per step, CFG on all eps channels, then
        the DDIM update; fp32, where the authors run fp16; D3HR's own previous-ᾱ quirk (ᾱ at max(1, t − 20)) is
        not reproduced, as in fastdd: the same work per step).

Record fields: method, path, config, device, batch (images per call), steps, seconds_per_image, images_per_second,
guided_over_plain (this path's time over the same path's dit time), cost_model_ratio (FLOPs of one image of the
method over one plain image, counted by torch.utils.flop_counter on fastdd's eager path at batch 1: what the
arithmetic alone costs), speedup_vs_reference (authors' time over this path's time; on the authors' record, over
the best fp32 fastdd path (eager or compiled): the method's headline speed-up).
Writes <out>/sampler_<config>_<device type>.json, .md (table) and .png (bar chart); when --methods picks a subset,
the names end in _<methods run, joined by ->, e.g. sampler_dit-xl2-256_cuda_dit-igd.json (one device call per subset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector
from torch.utils.flop_counter import FlopCounterMode

from .. import authors_reference as authors
from ..guidance import (
    DeviationGuidance,
    InfluenceGuidance,
    InformationEstimator,
    InformationGuidance,
    MercerGuidance,
    ModeGuidance,
    RealFeatures,
)
from ..guidance.sam import to_difffit
from ..methods.base import rescale_index
from ..models import ConvNet, DiT, LatentCodec
from ..sampling import GaussianDiffusion, GuidedSampler, mixed_precision, trajectory_noise
from .common import device_name, timeit, write_report

SPEC_STEPS, NUM_CLASSES, CFG_SCALE, SEED = 50, 10, 4.0, 0
IGD_K, IGD_GAMMA, IGD_LOW, IGD_HIGH, IGD_CHECKPOINTS = 5.0, 120.0, 30, 45, 4
DAP_GAMMA, MGD3_LAMBDA, MGD3_STOP, IGDS_ETA, IGDS_BETA, D3HR_TARGET = 1.0, 0.1, 25, 0.05, 0.5, 31

CONFIGS = {
    # latent side, DiT kwargs, VAE block widths (None: the SD VAE), surrogate (width, depth), IGDS estimator
    # (dim, width), DAP real latents per class
    "tiny": dict(
        latent=8,
        dit=dict(patch_size=2, hidden_size=32, depth=2, num_heads=2),
        vae=(8, 8),
        surrogate=(8, 2),
        estimator=(16, 8),
        reals=8,
    ),
    "dit-s2-128": dict(
        latent=16,
        dit=dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
        vae=None,
        surrogate=(128, 6),
        estimator=(128, 64),
        reals=32,
    ),
    "dit-xl2-256": dict(
        latent=32,
        dit=dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16),
        vae=None,
        surrogate=(128, 6),
        estimator=(128, 64),
        reals=64,
    ),
}
METHODS = ("dit", "igd", "dap", "mgd3", "igds", "sam", "d3hr")
FP32_PATHS = ("eager", "compiled")


@dataclass(frozen=True)
class BenchOptions:
    config: str
    device: torch.device
    methods: tuple[str, ...]
    repeats: int
    batch: int
    steps: int
    compile: bool
    bf16: bool
    fast: bool
    out: Path

    @property
    def paths(self) -> tuple[str, ...]:
        optional = (("compiled", self.compile), ("bf16", self.bf16), ("fast", self.fast))
        return ("authors", "eager") + tuple(path for path, wanted in optional if wanted)


class BenchModels:
    """Random-weight models of one config on one device, and what each method needs besides them."""

    def __init__(self, config: str, device: torch.device, steps: int):
        from diffusers import AutoencoderKL

        spec = CONFIGS[config]
        self.device, self.steps = device, steps
        torch.manual_seed(0)
        dit = DiT(input_size=spec["latent"], in_channels=4, num_classes=NUM_CLASSES, learn_sigma=True, **spec["dit"])
        with torch.no_grad():  # the official init zeroes the output layer: give the model a non-trivial output
            dit.final_layer.linear.weight.normal_(0, 0.02)
        self.dit = dit.to(device).eval().requires_grad_(False)
        widths = spec["vae"]
        if widths is None:  # the architecture of stabilityai/sd-vae-ft-mse
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
            )
        else:
            vae = AutoencoderKL(
                block_out_channels=widths,
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths),
            )
        self.codec = LatentCodec(vae.to(device).eval().requires_grad_(False))
        self.latent_shape = (4, spec["latent"], spec["latent"])
        self.image_size = spec["latent"] * self.codec.downsample
        width, depth = spec["surrogate"]

        def convnet() -> ConvNet:
            return ConvNet(3, NUM_CLASSES, width=width, depth=depth, im_size=self.image_size)

        self.surrogate = convnet().to(device).eval()
        # host copies: the authors' loop moves them to the device every guided step
        self.checkpoints_host = torch.stack(
            [parameters_to_vector(convnet().parameters()) for _ in range(IGD_CHECKPOINTS)]
        ).detach()
        self.real_grads_host = torch.randn(NUM_CLASSES, *self.checkpoints_host.shape) * 1e-3
        dim, estimator_width = spec["estimator"]
        estimator = InformationEstimator(3, NUM_CLASSES, self.image_size, dim=dim, width=estimator_width)
        images = torch.rand(2 * NUM_CLASSES, 3, self.image_size, self.image_size) * 2 - 1
        estimator.set_class_means(images, torch.arange(2 * NUM_CLASSES) % NUM_CLASSES)
        self.estimator = estimator.to(device).eval().requires_grad_(False)
        self.real_labels = torch.arange(NUM_CLASSES).repeat_interleave(spec["reals"])
        self.real_latents = torch.randn(len(self.real_labels), *self.latent_shape).to(device)
        self.dap_block = self.dit.depth // 2
        self.modes = torch.randn(NUM_CLASSES, 1, *self.latent_shape).to(device)  # mode 0 of each class guides image 0
        self.d3hr_start = torch.randn(NUM_CLASSES, *self.latent_shape).to(device)  # stands in for the selected group

    @cached_property
    def difffit(self) -> DiT:
        """SAM's model: the prior with DiffFit gammas (all ones, as before fine-tuning)."""
        return to_difffit(self.dit).eval().requires_grad_(False)

    def index(self, index_of_50: int) -> int:
        """A respaced index given for 50 steps, rescaled to self.steps (as `fastdd distill` rescales its ranges)."""
        return rescale_index(index_of_50, self.steps, SPEC_STEPS)


# --------------------------------------------------------------------------- the paths
def authors_call(method: str, models: BenchModels) -> tuple[Callable[[], object], int]:
    """(one call of the method's loop from fastdd.authors_reference, images it makes)."""
    common = dict(num_steps=models.steps, cfg_scale=CFG_SCALE, null_class=NUM_CLASSES, seed=SEED)
    if method in ("dit", "sam"):
        model = models.dit if method == "dit" else models.difffit
        return (lambda: authors.authors_dit_sample(model, 0, 0, models.latent_shape, **common)), 1
    if method == "mgd3":
        mode, stop = models.modes[0, 0], models.index(MGD3_STOP)
        return (
            lambda: authors.authors_dit_sample(
                models.dit, 0, 0, models.latent_shape, mode=mode, lam=MGD3_LAMBDA, stop_index=stop, **common
            )
        ), 1
    if method == "igd":

        def noise(class_index: int, image_index: int) -> tuple[Tensor, Tensor]:
            shape, steps = models.latent_shape, models.steps
            trajectory = trajectory_noise(SEED, class_index, image_index, shape, steps, models.device, rows=2)
            return trajectory.initial, trajectory.steps.flip(0)

        def igd() -> object:
            return authors.authors_igd_sample(
                models.dit,
                models.codec.decode,
                models.surrogate,
                models.checkpoints_host,
                models.real_grads_host,
                [0],
                2,
                models.steps,
                noise,
                k=IGD_K,
                gamma=IGD_GAMMA,
                low=models.index(IGD_LOW),
                high=models.index(IGD_HIGH),
                cfg_scale=CFG_SCALE,
                null_class=NUM_CLASSES,
            )

        return igd, 2
    if method == "dap":
        reals = authors.dap_real_features(models.dit, models.real_latents, models.real_labels, 0, models.dap_block)
        diffusion = GaussianDiffusion(models.steps)
        return (
            lambda: authors.authors_dap_sample(
                models.dit,
                diffusion,
                0,
                0,
                models.real_latents,
                models.real_labels,
                block_index=models.dap_block,
                gamma=DAP_GAMMA,
                seed=SEED,
                cfg_scale=CFG_SCALE,
                null_class=NUM_CLASSES,
                real_features=reals,
            )
        ), 1
    if method == "igds":
        return (
            lambda: authors.authors_igds_sample(
                models.dit,
                models.codec.decode,
                models.estimator,
                [(0, 0, SEED)],
                IGDS_ETA,
                IGDS_BETA,
                models.latent_shape,
                num_steps=models.steps,
                cfg_scale=CFG_SCALE,
                null_class=NUM_CLASSES,
            )
        ), 1
    if method == "d3hr":
        start, x_start = models.index(D3HR_TARGET), models.d3hr_start[0]
        return (
            lambda: authors.authors_d3hr_generate(
                models.dit, x_start, 0, start, num_steps=models.steps, cfg_scale=CFG_SCALE, null_class=NUM_CLASSES
            )
        ), 1
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def fastdd_call(
    method: str,
    models: BenchModels,
    batch: int,
    *,
    precision: str = "fp32",
    compile: bool = False,
    model_jacobian: bool = True,
) -> Callable[[], Tensor]:
    """One fastdd sampling call of `batch` images (image 0 of classes 0, 1, ...). compile: torch.compile, and CUDA
    graphs on CUDA; precision and model_jacobian: the sampler's options."""
    device = models.device
    decode = mixed_precision(models.codec.decode, precision)
    model, diffusion, guidances = models.dit, GaussianDiffusion(models.steps), []
    if method == "igd":
        low, high = models.index(IGD_LOW), models.index(IGD_HIGH)
        dim = models.latent_shape[0] * models.latent_shape[1] * models.latent_shape[2]
        guidances = [
            DeviationGuidance(NUM_CLASSES, dim, gamma=IGD_GAMMA, low=low, high=high, device=device),
            InfluenceGuidance(
                decode,
                models.surrogate,
                models.checkpoints_host.to(device),
                models.real_grads_host.to(device),
                k=IGD_K,
                low=low,
                high=high,
            ),
        ]
    elif method == "dap":
        feature_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        bank = RealFeatures(
            model,
            models.real_latents,
            models.real_labels,
            models.dap_block,
            device=device,
            dtype=feature_dtype,
            max_cached_classes=NUM_CLASSES,
        )
        guidances = [MercerGuidance(model, bank, models.dap_block, "linear", DAP_GAMMA)]
    elif method == "mgd3":
        guidances = [ModeGuidance(models.modes, lam=MGD3_LAMBDA, stop_index=models.index(MGD3_STOP))]
    elif method == "igds":
        guidances = [InformationGuidance(decode, models.estimator, IGDS_ETA, IGDS_BETA)]
    elif method == "sam":
        model = models.difffit
    elif method == "d3hr":
        diffusion = GaussianDiffusion(models.steps, timestep_spacing="leading")
    sampler = GuidedSampler(
        model,
        diffusion,
        guidances,
        cfg_scale=CFG_SCALE,
        num_classes=NUM_CLASSES,
        precision=precision,
        compile=compile,
        cuda_graphs=compile and device.type == "cuda",
        model_jacobian=model_jacobian,
    )
    labels = [c % NUM_CLASSES for c in range(batch)]
    image_ids = [(c, 0, SEED) for c in labels]
    if method == "d3hr":
        start, x_start = models.index(D3HR_TARGET), models.d3hr_start[labels]
        return lambda: sampler.ddim_sample(labels, image_ids, start_index=start, x_start=x_start, progress=False)
    return lambda: sampler.sample(labels, image_ids, models.latent_shape, device, progress=False)


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks refuse torch.autograd.grad with respect
    to a leaf that entered a module (DAP's truncated forward on x_t): every FLOP is counted under "Global"."""

    parents = ("Global",)

    def __enter__(self) -> _NoModuleTracking:
        return self

    def __exit__(self, *args) -> None:
        return None


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of the second call (the first fills memories and feature caches, as in a real run)."""
    call()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        call()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- the run
def time_paths(method: str, models: BenchModels, options: BenchOptions) -> dict[str, tuple[float, int]]:
    """{path: (seconds per image, batch)} of one method; batch: images per sampler call (the authors' loops: 1)."""
    device = options.device
    call, images = authors_call(method, models)
    times = {"authors": (timeit(call, device, options.repeats, warmup=1, do_bench=False) / images, 1)}
    for path in options.paths[1:]:
        compile = path == "compiled" or (path in ("bf16", "fast") and options.compile)
        if compile:
            torch._dynamo.reset()  # each method compiles afresh (no recompilation limit shared across methods)
        call = fastdd_call(
            method,
            models,
            options.batch,
            precision="bf16" if path == "bf16" else "fp32",
            compile=compile,
            model_jacobian=path != "fast",
        )
        warmup = 2 if compile and device.type == "cuda" else 1  # compile, then record the CUDA graphs
        times[path] = (
            timeit(call, device, options.repeats, warmup=warmup, do_bench=False) / options.batch,
            options.batch,
        )
        del call
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return times


def records_for(method: str, times: dict, plain: dict, flop_ratio: float, options: BenchOptions) -> list[dict]:
    """One record per path of `method` (times and plain: `time_paths` of the method and of dit)."""
    reference = times["authors"][0]
    best = min(times[p][0] for p in FP32_PATHS if p in times)
    records = []
    for path, (seconds, batch) in times.items():
        speedup = reference / (best if path == "authors" else seconds)
        records.append(
            dict(
                method=method,
                path=path,
                config=options.config,
                device=device_name(options.device),
                batch=batch,
                steps=options.steps,
                seconds_per_image=seconds,
                images_per_second=1.0 / seconds,
                guided_over_plain=seconds / plain[path][0],
                cost_model_ratio=flop_ratio,
                speedup_vs_reference=speedup,
            )
        )
    return records


def run_benchmark(options: BenchOptions) -> list[dict]:
    """Time every (method, path), write the JSON, markdown table and bar chart into options.out; -> the records."""
    models = BenchModels(options.config, options.device, options.steps)
    plain_flops = count_flops(fastdd_call("dit", models, 1))
    records, plain = [], {}
    for method in options.methods:  # dit first
        times = time_paths(method, models, options)
        plain = times if method == "dit" else plain
        flop_ratio = 1.0 if method == "dit" else count_flops(fastdd_call(method, models, 1)) / plain_flops
        print(
            f"{options.config} {method}: " + ", ".join(f"{p} {s:.4g} s/image" for p, (s, _) in times.items()),
            flush=True,
        )
        records += records_for(method, times, plain, flop_ratio, options)
    name = f"sampler_{options.config}_{options.device.type}"
    if options.methods != METHODS:
        name += "_" + "-".join(options.methods)
    json_path = write_report(records, name, options.out)
    bar_chart(records, json_path.with_suffix(".png"))
    return records


def bar_chart(records: list[dict], path: Path) -> None:
    """Seconds per image, one bar per (method, path): a PNG drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, bar, gap, left = 760, 22, 8, 170
    height = 40 + len(records) * (bar + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    longest = max(r["seconds_per_image"] for r in records)
    colours = {
        "authors": (200, 80, 60),
        "eager": (60, 120, 200),
        "compiled": (40, 160, 90),
        "bf16": (150, 90, 190),
        "fast": (220, 150, 40),
    }
    first = records[0]
    draw.text(
        (10, 10), f"seconds per image, {first['config']}, {first['steps']} steps, on {first['device']}", fill="black"
    )
    for i, r in enumerate(records):
        y = 34 + i * (bar + gap)
        length = int((width - left - 90) * r["seconds_per_image"] / longest)
        draw.text((10, y + 5), f"{r['method']} / {r['path']}", fill="black")
        draw.rectangle([left, y, left + max(length, 1), y + bar], fill=colours[r["path"]])
        draw.text((left + length + 6, y + 5), f"{r['seconds_per_image']:.3g} s", fill="black")
    image.save(path)


# --------------------------------------------------------------------------- output folder
def default_out() -> Path:
    """benchmarks/results when run from the repository root, else ./fastdd-bench."""
    in_repo = Path("benchmarks").is_dir() and Path("fastdd").is_dir()
    return Path("benchmarks/results") if in_repo else Path("fastdd-bench")
