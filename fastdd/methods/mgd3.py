"""`--method mgd3`: MGD3's run wiring (the math is in `fastdd.guidance.mgd3`): k-means (IPC modes) of each class's
encoder-mean latents, cached in the state folder; mode j pulls image j on the steps after `stop`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.latents import ClassCache
from ..guidance.mgd3 import MGD3_LAMBDA, MGD3_STOP_INDEX, ModeGuidance, class_modes
from ..options import documented, option
from .base import (
    Cost,
    Method,
    MethodSetup,
    Models,
    RealData,
    RunSpec,
    cache_inputs,
    cache_key,
    check,
    check_pool,
    real_latents,
    rescale_index,
)


@documented
@dataclass(frozen=True)
class MGD3Options:
    """MGD3 (ICML 2025): k-means modes of the real latents guide the early steps."""

    lam: float = option(MGD3_LAMBDA, "mode guidance scale λ >= 0 (MGD3's default: 0.1)", flag="--mgd3-lambda")
    stop: int = option(
        MGD3_STOP_INDEX,
        "last unguided step for 50 steps: steps above it are guided (MGD3's default: 25, i.e. 24 of 50); -1 guides all",
        flag="--mgd3-stop",
    )
    kmeans_seed: int = option(0, "k-means++ seed (the authors' random_state=0)", flag="--mgd3-kmeans-seed")


def build(options: MGD3Options, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """Mode guidance toward the class's k-means modes (fitted once, cached)."""
    check(math.isfinite(options.lam) and options.lam >= 0, f"--mgd3-lambda must be >= 0, got {options.lam}")
    check(-1 <= options.stop <= 49, f"--mgd3-stop must be in -1..49, got {options.stop}")
    stop = -1 if options.stop == -1 else rescale_index(options.stop, spec.steps)
    check_pool(spec, data, 1, "MGD3")
    params = {
        "lambda": options.lam,
        "stop_index": stop,
        "guided_range": [stop + 1, spec.steps - 1],
        "kmeans_seed": options.kmeans_seed,
        "modes": f"k-means of the encoder-mean latents, {spec.ipc} per class",
    }
    cost = Cost()  # k-means and the mode pull cost little next to sampling
    if spec.dry_run:
        return MethodSetup(params=params, cost=cost)
    latents = real_latents(spec, models, data)
    key = cache_key(cache_inputs(spec, models, data, {"ipc": spec.ipc, "seed": options.kmeans_seed}))
    modes = ClassCache(
        range(data.num_classes),
        lambda c: class_modes(latents[c].to(models.device), spec.ipc, seed=options.kmeans_seed),
        spec.state_dir / f"mgd3_modes_{key}",
        keep=max(8, spec.class_batch),
    )
    guidance = ModeGuidance(modes, lam=options.lam, stop_index=stop, compat=spec.compat)
    return MethodSetup(guidances=[guidance], params=params, cost=cost)


METHOD = Method(
    "mgd3",
    MGD3Options,
    build,
    needs_data=True,
    help="MGD3 (ICML 2025): k-means modes of the real latents guide the early steps",
)
