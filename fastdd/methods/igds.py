"""`--method igds`: IGDS's run wiring (the math and its assumptions are in `fastdd.guidance.igds`): train (or load the
cached) variational estimator, then η-scaled ascent of E log P(ŷ|y) + H(Ŷ) + β·KL on the decoded images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.atomic import computed_once
from ..data.latents import EncodedBatches
from ..guidance.igds import (
    DEFAULT_TAU,
    InformationEstimator,
    InformationGuidance,
    beta_for_ipc,
    default_depth,
    train_information_estimator,
)
from ..models.convnet import ConvNet
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
    check_pool,
    guided_range,
    read_cache,
)

IGDS_GUIDED_STEP_CALLS = 6.0  # a guided step in model forwards (decoder + estimator + backward; digits)
IGDS_ETA_PRESETS = {"digits": 2.0}  # no published η: only the digits default is set (moves the images about as DAP)


@documented
@dataclass(frozen=True)
class IGDSOptions:
    """IGDS (Ye et al. 2025): information-guided sampling with a trained variational estimator."""

    eta: float | None = option(
        None, "step size η >= 0 (no published value: digits default 2.0; required for other data)", flag="--igds-eta"
    )
    beta: float | None = option(
        None, "weight β of the KL term (default by IPC: 0.5·log(IPC)/log(50) clipped to [0, 0.5])", flag="--igds-beta"
    )
    range: tuple[int, int] = option(
        (0, 49), "guided steps low,high for 50 steps (default: every step)", flag="--igds-range"
    )
    source: str = option(
        "xstart",
        "the estimator sees the decoded x̂0 (default) or the ancestral sample x'_{t-1} (paper)",
        flag="--igds-source",
        choices=("xstart", "sample"),
    )
    epochs: int = option(50, "contrastive training epochs of the estimator encoder", flag="--igds-epochs")
    classifier_epochs: int = option(
        100, "linear-probe epochs of the estimator classifier", flag="--igds-classifier-epochs"
    )
    lam: float = option(1.0, "weight λ of the KL term in the estimator's training loss", flag="--igds-lambda")


def build(options: IGDSOptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """Information guidance with the estimator trained once per (options, seed) and cached."""
    eta = IGDS_ETA_PRESETS.get(data.dataset) if options.eta is None else options.eta
    check(eta is not None, "--igds-eta: IGDS publishes no step size; give one (the digits default is 2.0)")
    check(math.isfinite(eta) and eta >= 0, f"--igds-eta must be >= 0, got {eta}")
    beta = beta_for_ipc(spec.ipc) if options.beta is None else options.beta
    check(math.isfinite(beta) and beta >= 0, f"--igds-beta must be >= 0, got {beta}")
    check(options.epochs > 0, f"--igds-epochs must be > 0, got {options.epochs}")
    check(options.classifier_epochs > 0, f"--igds-classifier-epochs must be > 0, got {options.classifier_epochs}")
    check(math.isfinite(options.lam) and options.lam >= 0, f"--igds-lambda must be >= 0, got {options.lam}")
    check(options.source == "xstart" or spec.sampler == "ddpm", "--igds-source sample needs --sampler ddpm")
    low, high = guided_range(spec, parse_range(options.range, "--igds-range"))
    check_pool(spec, data, 1, "IGDS's estimator", ipc_bound=False)
    check(sum(data.class_counts()) >= 2, "--data: the estimator needs at least 2 real images")
    flip = data.dataset != "digits"
    params = {
        "eta": eta,
        "beta": beta,
        "guided_range": [low, high],
        "source": options.source,
        "estimator": {
            "epochs": options.epochs,
            "classifier_epochs": options.classifier_epochs,
            "lambda": options.lam,
            "tau": DEFAULT_TAU,
            "seed": spec.seed,
            "flip": flip,
        },
    }
    count, channels, size = sum(data.class_counts()), models.image_shape[0], models.image_shape[1]
    # a contrastive epoch: two encoder forwards and one backward (≈ 1.5 training steps); the linear probe is cheap
    batches = 1.5 * options.epochs * math.ceil(count / 256)
    encoder = ConvNet(channels, 128, width=64, depth=default_depth(size), im_size=size)
    cost = Cost(
        guided_steps=high - low + 1,
        guided_step_calls=IGDS_GUIDED_STEP_CALLS,
        state=lambda probe, classes: batches * probe.network_train_step(encoder, min(count, 256)),
    )
    cache = cache_path(spec, models, data, "igds_estimator", params["estimator"])
    if spec.dry_run:
        if cache.is_file():  # trained already: only sampling is left
            cost.state = None
        return MethodSetup(params=params, cost=cost)
    with computed_once(cache):  # torchrun ranks: one trains it, the others read its file
        estimator = read_cache(cache, lambda path: InformationEstimator.load(path, models.device))
        if estimator is None:
            estimator = train_information_estimator(
                EncodedBatches(data, torch.device("cpu")),
                None,
                data.num_classes,
                lam=options.lam,
                epochs=options.epochs,
                batch_size=min(256, data.num_images),
                classifier_epochs=options.classifier_epochs,
                flip=flip,
                seed=spec.seed,
                device=models.device,
                progress=spec.progress,
            )
            estimator.save(cache)
    params["estimator_file"] = str(cache)
    guidance = InformationGuidance(models.codec.decode, estimator, eta, beta, low=low, high=high, source=options.source)
    return MethodSetup(guidances=[guidance], params=params, cost=cost)


METHOD = Method(
    "igds",
    IGDSOptions,
    build,
    needs_data=True,
    help="IGDS (Ye et al. 2025): information-guided sampling with a trained variational estimator",
)
