"""`--method igd`: IGD's run wiring (the math is in `fastdd.guidance.igd`).

Presets (SPEC "IGD"): (k, γ) per dataset and IPC bound for DiT weights; digits (the 16×16 pixel prior): γ scaled by
the latent size (16·16 values instead of 4·32·32: 120 · 256 / 4096 ≈ 8). The surrogate is `surrogate`, the shipped
digits bundle, or trained on the real data at the start of the run and cached in the state folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.atomic import computed_once
from ..data.augment import color_jitter_lighting, random_resized_crop
from ..data.latents import ClassCache
from ..guidance.igd import (
    DIGITS_SURROGATE_PATH,
    MAX_CHECKPOINTS,
    REAL_CHUNK,
    REAL_IMAGES_PER_CLASS,
    SELECTION_RULES,
    DeviationGuidance,
    InfluenceGuidance,
    SurrogateBundle,
    class_real_gradients,
    select_epochs,
    surrogate_config_for,
    train_trajectory,
)
from ..models.loading import file_digest
from ..options import documented, option, parse_range
from .base import (
    Cost,
    Method,
    MethodSetup,
    Models,
    RealData,
    RunSpec,
    cache_path,
    check,
    guided_range,
    read_cache,
    require_one_image_per_batch,
)

IGD_GUIDED_STEP_CALLS = 12.0  # a guided step in model forwards (decoder + K surrogate grads + backward; digits)
# dataset -> [(IPC bound or None, k, gamma)]
IGD_PRESETS = {
    "imagenette": [(10, 5.0, 50.0), (None, 5.0, 120.0)],
    "imagewoof": [(10, 5.0, 50.0), (None, 5.0, 120.0)],
    "imagenet": [(None, 5.0, 120.0)],
    "digits": [(None, 5.0, 8.0)],
}


def igd_preset(dataset: str, ipc: int) -> tuple[float, float]:
    """(k, gamma) of SPEC's presets for a dataset kind and IPC (ImageNet's for other data)."""
    for bound, k, gamma in IGD_PRESETS.get(dataset, IGD_PRESETS["imagenet"]):
        if bound is None or ipc <= bound:
            return k, gamma
    raise AssertionError("every preset list ends with an open bound")


@documented
@dataclass(frozen=True)
class IGDOptions:
    """IGD (Chen et al., ICLR 2025): deviation guidance (per-class cosine memory) + influence guidance."""

    surrogate: str | None = option(
        None,
        "surrogate file from `fastdd surrogate` (default: the shipped digits one, or "
        "computed from --data and cached in DIR/.fastdd)",
        flag="--surrogate",
    )
    k: float | None = option(
        None, "influence scale k (default: the IGD authors' preset, 5; their sample_mp.sh)", flag="--igd-k"
    )
    gamma: float | None = option(
        None,
        "deviation scale γ (default: the IGD authors' preset by dataset and IPC, e.g. 50 for ImageNette IPC 10, 120 above, 8 for the digits prior; their sample_mp.sh --dev-scale)",
        flag="--igd-gamma",
    )
    range: tuple[int, int] = option(
        (30, 45), "guided respaced steps low,high for 50 steps (rescaled to --steps)", flag="--igd-range"
    )
    memory: int = option(64, "deviation memory capacity per class", flag="--igd-memory")
    surrogate_epochs: int = option(20, "trajectory length when computed on the fly", flag="--surrogate-epochs")
    max_checkpoints: int = option(
        MAX_CHECKPOINTS,
        "at most this many surrogate checkpoints, the first ones Algorithm 2 selects, when computed on the fly "
        "(every published pick has K = 4)",
        flag="--igd-max-checkpoints",
    )
    selection: str | None = option(
        None,
        "Algorithm 2 as the paper states it (cosine of class-mean gradients) or as the authors' test_ckpts_grad_sim.py "
        "computes it (mean of per-class cosines +1e-6 on 80 images per class from one shuffled pass, seeded by "
        "--seed), when computed on the fly (default: paper; authors with --compat)",
        flag="--igd-selection",
        choices=SELECTION_RULES,
    )


def check_bundle(bundle: SurrogateBundle, models: Models, data: RealData, source: str) -> None:
    """The surrogate must match the class list and the decoded images."""
    config, (channels, _, _) = bundle.config, models.image_shape
    rows = config.num_classes if bundle.real_grads is None else len(bundle.real_grads)
    if config.num_classes != data.num_classes or rows != data.num_classes:
        raise ValueError(
            f"--surrogate {source}: made for {config.num_classes} classes, the class list has {data.num_classes}"
        )
    if config.channel != channels:
        raise ValueError(f"--surrogate {source}: takes {config.channel}-channel images, the prior makes {channels}")


def surrogate_bundle(options: IGDOptions, spec: RunSpec, models: Models, data: RealData):
    """(bundle, source): options.surrogate, the shipped digits bundle, or computed from the real data (cached in the
    state folder); None in a dry run that would train it. Real gradients a bundle does not hold (a computed one, a
    checkpoints-only file from `fastdd surrogate`) are computed per class when a batch first needs them, stored per
    class in the state folder, at most --class-batch classes held."""
    path = options.surrogate
    if path is None and data.dataset == "digits" and DIGITS_SURROGATE_PATH.is_file():
        path = str(DIGITS_SURROGATE_PATH)
    if path is not None:
        bundle = SurrogateBundle.load(path)
        check_bundle(bundle, models, data, path)
        if bundle.real_grads is None:
            inputs = {"surrogate": file_digest(Path(path))}
            attach_real_gradients(bundle, models, data, cache_path(spec, models, data, "surrogate_file", inputs), spec)
        return bundle, path
    check(options.surrogate_epochs > 0, f"--surrogate-epochs must be > 0, got {options.surrogate_epochs}")
    check(options.max_checkpoints > 0, f"--igd-max-checkpoints must be > 0, got {options.max_checkpoints}")
    selection = options.selection or ("authors" if spec.compat else "paper")
    photometric = data.dataset != "digits" and models.image_shape[0] == 3
    depends_on = {"seed": spec.seed, "epochs": options.surrogate_epochs, "k": options.max_checkpoints,
                  "selection": selection, "augment": "crop+flip+jitter+lighting" if photometric else "crop"}  # fmt: skip
    cache = cache_path(spec, models, data, "surrogate", depends_on)
    with computed_once(cache, not spec.dry_run):  # torchrun ranks: one trains, the others read its file
        bundle = read_cache(cache, SurrogateBundle.load, spec.dry_run)
        if bundle is None and spec.dry_run:
            return None, "computed from the real data at the start of the run"
        if bundle is None:  # the trajectory and Algorithm 2 (the data read batch by batch, then class by class)
            data.require()
            config = surrogate_config_for(models.image_shape, data.num_classes)
            snapshots = train_trajectory(
                config,
                data,
                epochs=options.surrogate_epochs,
                flip=data.dataset != "digits",
                photometric=photometric,
                seed=spec.seed,
                device=models.device,
                progress=spec.progress,
            )
            epochs = select_epochs(
                config,
                snapshots,
                data,
                max_checkpoints=options.max_checkpoints,
                selection=selection,
                seed=spec.seed,
                progress=spec.progress,
            )
            bundle = SurrogateBundle(config, snapshots[epochs], None, epochs)
            bundle.save(cache)  # without real gradients: those are computed per class when a batch needs them
    attach_real_gradients(bundle, models, data, cache, spec)
    return bundle, str(cache)


def attach_real_gradients(bundle: SurrogateBundle, models: Models, data: RealData, cache: Path, spec: RunSpec) -> None:
    """bundle.real_grads = a per-class cache beside `cache` (`<cache stem>_real_grads/<class>.safetensors`): each
    class's K real gradients computed from its first images when first needed, at most --class-batch classes held."""
    model, flat = bundle.network(models.device), bundle.flat_params.to(models.device)
    bundle.real_grads = ClassCache(
        range(data.num_classes),
        lambda c: class_real_gradients(model, flat, data, c),
        cache.with_name(cache.stem + "_real_grads"),
        keep=spec.class_batch,
    )


def build(options: IGDOptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """Deviation guidance then influence guidance on the guided range."""
    k, gamma = igd_preset(data.dataset, spec.ipc)
    k = k if options.k is None else options.k
    gamma = gamma if options.gamma is None else options.gamma
    low, high = parse_range(options.range, "--igd-range")
    check(k >= 0 and gamma >= 0, f"--igd-k and --igd-gamma must be >= 0, got {k} and {gamma}")
    check(options.memory > 0, f"--igd-memory must be > 0, got {options.memory}")
    if gamma > 0:
        require_one_image_per_batch(
            spec, "its deviation guidance (--igd-gamma > 0) pushes each image away from the earlier images of its class"
        )
    low, high = guided_range(spec, (low, high))
    bundle, source = surrogate_bundle(options, spec, models, data)
    params = {"k": k, "gamma": gamma, "guided_range": [low, high], "memory": options.memory, "surrogate": source}
    cost = Cost(guided_steps=high - low + 1, guided_step_calls=IGD_GUIDED_STEP_CALLS)
    config = surrogate_config_for(models.image_shape, data.num_classes) if bundle is None else bundle.config
    real_grads = None if bundle is None else bundle.real_grads

    def trajectory_extras(probe, network, rows: int) -> float:
        """A trajectory batch's augmentation (crop, flip; colour jitter and lighting on RGB) and SGD step."""
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(rows, *models.image_shape) * 2 - 1
        photometric = data.dataset != "digits" and models.image_shape[0] == 3

        def augment() -> Tensor:
            batch = random_resized_crop(images, generator, flip=True)
            return color_jitter_lighting(batch, generator) if photometric else batch

        for p in network.parameters():
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return probe.seconds(augment, repeats=3) + probe.seconds(optimizer.step, repeats=3)

    def state_seconds(probe, classes) -> float:
        """When not cached: the trajectory (every epoch reads the real images and trains on them, batch 64) and
        Algorithm 2 (every snapshot's gradient on each class's first 200 images, chunks of 50); plus the real
        gradients of the classes left that are not stored yet (K gradients of the class's first 200 images)."""
        counts, network = data.class_counts(), config.build()
        per_image = probe.image_read(64)
        chunk = probe.network_train_step(network, min(data.num_images, REAL_CHUNK))

        def class_gradients(c: int, snapshots: int) -> float:
            used = min(counts[c], REAL_IMAGES_PER_CLASS)
            return used * per_image + snapshots * math.ceil(used / REAL_CHUNK) * chunk

        seconds = 0.0
        if bundle is None:
            epochs, count = options.surrogate_epochs, data.num_images
            step = probe.network_train_step(network, min(count, 64)) + trajectory_extras(probe, network, min(count, 64))
            seconds += epochs * (count * per_image + math.ceil(count / 64) * step)
            seconds += sum(class_gradients(c, epochs + 1) for c in range(data.num_classes))
        if bundle is None or isinstance(real_grads, ClassCache):  # computed per class, unless stored already
            todo = [c for c in classes if bundle is None or not real_grads.done(c)]
            seconds += sum(class_gradients(c, options.max_checkpoints) for c in todo)
        return seconds

    cost.state = state_seconds if (bundle is None or isinstance(real_grads, ClassCache)) else None
    if bundle is None:  # a dry run that would train the surrogate
        return MethodSetup(params=params, cost=cost)
    params["surrogate_epochs_kept"] = bundle.epochs
    device, codec, size = models.device, models.codec, bundle.config.im_size

    def decode(latents: Tensor) -> Tensor:
        images = codec.decode(latents)
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    deviation = DeviationGuidance(
        data.num_classes,
        math.prod(models.latent_shape),
        gamma=gamma,
        capacity=options.memory,
        low=low,
        high=high,
        device=device,
    )
    influence = InfluenceGuidance(
        decode,
        bundle.network(device),
        bundle.flat_params.to(device),
        bundle.real_grads,
        k=k,
        low=low,
        high=high,
        compat=spec.compat,
    )
    return MethodSetup(guidances=[deviation, influence], params=params, cost=cost)


METHOD = Method(
    "igd",
    IGDOptions,
    build,
    needs_data=False,
    help="influence-guided diffusion (Chen et al., ICLR 2025): deviation + influence guidance",
)
