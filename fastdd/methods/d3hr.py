"""`--method d3hr`: D3HR's run wiring (the math is in `fastdd.guidance.d3hr`): per class, DDIM-invert the real
latents to the target step, fit a diagonal Gaussian, keep the most representative of n candidate groups of IPC
latents, and DDIM (η = 0) from there on the run's `steps`-step schedule (spacing "leading" unless --spacing says
otherwise: D3HR's DiTPipeline) with the run's CFG scale. Ignores the run's sampler and eta. --compat: DiTPipeline's
numerics and CFG on every eps channel."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import ops
from ..bench.common import timeit
from ..data.latents import ClassCache
from ..guidance.d3hr import (
    D3HR_AUTHORS_CANDIDATES,
    D3HR_CANDIDATES,
    D3HR_WEIGHTS,
    check_statistics_file,
    claim_statistics_folder,
    class_group,
    load_class_statistics,
    statistics_config,
    statistics_path,
)
from ..options import documented, option
from ..sampling import GuidedSampler
from .base import (
    DIT_PIPELINE,
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
    read_cache,
    real_latents,
    rescale_index,
)


@documented
@dataclass(frozen=True)
class D3HROptions:
    """D3HR (2025): DDIM inversion, per-class Gaussian, representative group, DDIM generation."""

    target: int = option(
        31,
        "inversion target / generation start step for 50 steps: 31 = timestep 620, the authors' --start_step 18 of 50 (D3HR generation/group_sampling.py)",
        flag="--d3hr-target",
    )
    candidates: int | None = option(
        None,
        "candidate groups drawn per class (default 10,000; with --compat the authors' 100,000,000: their "
        "group_sampling.py --m 100000 draws m // 10 batches of 10,000; --dry-run says how long that takes here)",
        flag="--d3hr-candidates",
    )
    batch: int = option(64, "images per DDIM-inversion batch", flag="--d3hr-batch")
    stats: str | None = option(
        None,
        "folder of per-class inverted statistics to reuse across runs (default: in the "
        "run folder); a folder or file made with other settings is refused; not part of the run config (its files are "
        "checked against the run's settings)",
        flag="--d3hr-stats",
        compare=False,
    )


def build(options: D3HROptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """A sampling override: DDIM from each class's selected group (statistics on disk, group recomputed)."""
    check(0 <= options.target <= 49, f"--d3hr-target must be in 0..49, got {options.target}")
    candidates = options.candidates
    if candidates is None:
        candidates = D3HR_AUTHORS_CANDIDATES if spec.compat else D3HR_CANDIDATES
    check(candidates > 0, f"--d3hr-candidates must be > 0, got {candidates}")
    check(options.batch > 0, f"--d3hr-batch must be > 0, got {options.batch}")
    target = rescale_index(options.target, spec.steps)
    check_pool(spec, data, 2, "D3HR's unbiased variance")
    params = {
        "target_index": target,
        "n_candidates": candidates,
        "inversion_batch": options.batch,
        "weights": list(D3HR_WEIGHTS),
        "timestep_spacing": models.diffusion.timestep_spacing,
        "sampler": "ddim, eta 0 (from the selected latents)",
        "stats_dir": options.stats,
    }
    inputs = cache_inputs(spec, models, data, {"seed": spec.seed})
    stats_dir = Path(options.stats) if options.stats else None
    if stats_dir is not None:  # a shared folder: refuse files made with other settings now, before anything is written
        like_run = GuidedSampler(
            models.prior, models.diffusion, cfg_scale=spec.cfg_scale, num_classes=models.num_model_classes
        )
        folder_config = statistics_config(like_run, 0, target, inputs)
        del folder_config["class_index"]
        claim_statistics_folder(stats_dir, folder_config, write=not spec.dry_run)
        for label in models.class_labels:
            if statistics_path(stats_dir, label).is_file():
                check_statistics_file(
                    statistics_path(stats_dir, label), statistics_config(like_run, label, target, inputs)
                )

    if stats_dir is None:  # private to the run, named by what the statistics depend on
        stats_dir = spec.state_dir / f"d3hr_stats_{cache_key(inputs)}"
    counts = data.class_counts()

    def state_seconds(probe, classes) -> float:
        """For each class left: its inversion (in batches of options.batch images, `target` DDIM steps per batch)
        unless its statistics are on disk, then its candidate groups drawn and scored."""
        seconds = 0.0
        for c in classes:
            if not statistics_path(stats_dir, models.class_labels[c]).is_file():
                full, rest = divmod(counts[c], options.batch)
                seconds += target * (full * probe.model_call(options.batch) + (probe.model_call(rest) if rest else 0))
        return seconds + len(classes) * group_seconds(probe.seconds)

    def group_seconds(timer) -> float:
        """Seconds of one class's group sampling: a timed call on min(candidates, 1024) groups, scaled."""
        dim, count = math.prod(models.latent_shape), min(candidates, 1024)
        mean = torch.zeros(dim, device=models.device)
        call = lambda: ops.group_sampling(mean, mean + 1, spec.ipc, count)  # noqa: E731
        return timer(call, repeats=2) * candidates / count

    cost = Cost(sampling_steps=target + 1, state=state_seconds)
    sampling = (
        f"ddim, eta 0, from step {target} of {spec.steps} ({models.diffusion.timestep_spacing} spacing), the "
        "selected groups as starting latents"
    )
    if spec.dry_run:
        return MethodSetup(params=params, cost=cost, sampling=sampling)
    if candidates > 10 * D3HR_CANDIDATES and spec.progress:
        per_class = group_seconds(lambda fn, repeats: timeit(fn, models.device, repeats, 1, do_bench=False))
        print(
            f"d3hr: {candidates:,} candidate groups per class take ~{per_class / 60:.1f} min per class on "
            f"{models.device.type} (a timed probe); --d3hr-candidates N draws fewer",
            file=sys.stderr,
        )
    real = real_latents(spec, models, data, sample=True)  # per class, read only for classes without statistics
    samplers: list[GuidedSampler] = []  # the run's sampler, set at its first batch

    def group_of(c: int) -> Tensor:
        """The selected IPC latents of local class c [ipc, C, h, w]."""
        latents, path = None, statistics_path(stats_dir, models.class_labels[c])
        if options.stats is None:  # a private file that is unreadable (a killed or full disk) is made again
            read_cache(path, load_class_statistics)
        if not path.is_file():
            latents = real[c].to(models.device)
        return class_group(
            samplers[0],
            latents,
            models.class_labels[c],
            spec.ipc,
            target_index=target,
            n_candidates=candidates,
            seed=spec.seed,
            stats_dir=stats_dir,
            batch_size=options.batch,
            inputs=inputs,
            progress=spec.progress,
            class_name=data.class_names[c],
        )

    groups = ClassCache(range(data.num_classes), group_of, keep=max(8, spec.class_batch))  # a chunk's classes

    def sample(sampler, labels, ids, latent_shape, device) -> Tensor:
        """DDIM (η = 0) from each image's selected latent at the target index, with the run's CFG and labels."""
        samplers[:] = [sampler]
        x_start = torch.stack([groups[c][i] for c, i, _ in ids]).to(device)
        return sampler.ddim_sample(labels, ids, start_index=target, x_start=x_start, progress=False)

    return MethodSetup(params=params, sample=sample, cost=cost, sampling=sampling)


METHOD = Method(
    "d3hr",
    D3HROptions,
    build,
    needs_data=True,
    help="D3HR (2025): DDIM inversion, per-class Gaussian, representative group, DDIM generation",
    authors=DIT_PIPELINE,
    spacing="leading",
    guides_steps=False,
)
