"""`--method igd`: IGD's run wiring (the math is in `fastdd.guidance.igd`).

Presets (SPEC "IGD"): (k, γ) per dataset and IPC bound for DiT weights; digits (the 16×16 pixel prior): γ scaled by
the latent size (16·16 values instead of 4·32·32: 120 · 256 / 4096 ≈ 8). The surrogate is `surrogate`, the shipped
digits bundle, or trained on the real data at the start of the run and cached in the state folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..guidance.igd import (
    DIGITS_SURROGATE_PATH,
    MAX_CHECKPOINTS,
    SELECTION_RULES,
    DeviationGuidance,
    InfluenceGuidance,
    SurrogateBundle,
    compute_surrogate_bundle,
    surrogate_config_for,
)
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
    k: float | None = option(None, "influence scale k (default: SPEC preset, 5)", flag="--igd-k")
    gamma: float | None = option(
        None, "deviation scale gamma (default: SPEC preset by dataset and IPC)", flag="--igd-gamma"
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
    if config.num_classes != data.num_classes or bundle.real_grads.shape[0] != data.num_classes:
        raise ValueError(
            f"--surrogate {source}: made for {config.num_classes} classes, the class list has {data.num_classes}"
        )
    if config.channel != channels:
        raise ValueError(f"--surrogate {source}: takes {config.channel}-channel images, the prior makes {channels}")


def surrogate_bundle(options: IGDOptions, spec: RunSpec, models: Models, data: RealData):
    """(bundle or None in a dry run, source): options.surrogate, the shipped digits bundle, or computed from the real
    data (cached in the state folder)."""
    path = options.surrogate
    if path is None and data.dataset == "digits" and DIGITS_SURROGATE_PATH.is_file():
        path = str(DIGITS_SURROGATE_PATH)
    if path is not None:
        bundle = SurrogateBundle.load(path)
        check_bundle(bundle, models, data, path)
        return bundle, path
    check(options.surrogate_epochs > 0, f"--surrogate-epochs must be > 0, got {options.surrogate_epochs}")
    check(options.max_checkpoints > 0, f"--igd-max-checkpoints must be > 0, got {options.max_checkpoints}")
    selection = options.selection or ("authors" if spec.compat else "paper")
    if spec.dry_run:
        return None, "computed from the real data at the start of the run"
    cache = cache_path(
        spec,
        models,
        data,
        "surrogate",
        {"seed": spec.seed, "epochs": options.surrogate_epochs, "k": options.max_checkpoints, "selection": selection},
    )
    cached = read_cache(cache, SurrogateBundle.load)
    if cached is not None:
        return cached, str(cache)
    images, labels = data.load()
    config = surrogate_config_for(models.image_shape, data.num_classes)
    bundle = compute_surrogate_bundle(
        config,
        images,
        labels,
        epochs=options.surrogate_epochs,
        max_checkpoints=options.max_checkpoints,
        selection=selection,
        seed=spec.seed,
        flip=data.dataset != "digits",
        progress=spec.progress,
    )
    bundle.save(cache)
    return bundle, str(cache)


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
    if bundle is None:  # a dry run that would train the surrogate: a trajectory and Algorithm 2's gradients
        count, config = sum(data.class_counts()), surrogate_config_for(models.image_shape, data.num_classes)
        steps = 2 * options.surrogate_epochs * math.ceil(count / 64)
        cost.state = lambda probe: steps * probe.network_train_step(config.build(), min(count, 64))
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
        bundle.real_grads.to(device),
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
