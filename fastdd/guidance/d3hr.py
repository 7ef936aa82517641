"""D3HR ("Taming Diffusion for Dataset Distillation with High Representativeness", 2025), SPEC "D3HR":
a distillation pipeline on the sampler, not a per-step guidance.

Per class:
1. `invert_class_latents`: DDIM-invert the VAE latents of every class image (encoder samples, ×0.18215) with
   the true label and CFG on all eps channels, batched, to the target respaced index.
2. `class_statistics`: per-feature mean and unbiased variance of the inverted latents (a diagonal Gaussian);
   `save_class_statistics` / `load_class_statistics` keep them per class in a safetensors file, and
   `inverted_class_statistics` reuses a file that is already there instead of inverting again.
3. `select_group`: `fastdd.ops.group_sampling` keeps the lowest-score group of IPC latents among
   n_candidates groups drawn from N(mean, std²), scored as the authors' `evaluate_distribution_batch` and
   `skewness_batch` (`fastdd.ops.reference.group_score`). Their script draws 10^8 groups per class
   (D3HR_AUTHORS_CANDIDATES, the `--compat` default); fastdd's default is 10^4.
4. `generate_from_group`: DDIM (η = 0) from the start index with `GuidedSampler.ddim_sample(x_start=group)`.
`distill_class` runs the four steps.

Schedule: the authors use diffusers' DDIMScheduler with 50 "leading" steps (timesteps 0, 20, ..., 980), i.e.
`GaussianDiffusion(50, timestep_spacing="leading")`, whose respaced index k is timestep 20k. They sample from
step 18 of 50 (timestep 620, start_index 31 here), but the statistics they use (i_step 6 of the stored
inversion steps 24..38) are those of the latents inverted to timestep 600 (index 30): an off-by-one step.
The default here is consistent (target_index = start_index = 31); target_index=30, start_index=31
reproduces the authors' pairing. Their last two DDIM steps also differ slightly (see
`GuidedSampler.ddim_sample`).

Seeds: the authors draw every class's candidates from the same seeds i·12345 (one per batch of 10,000
groups, on CUDA). Here each class gets its own generator, seeded with `group_seed(seed, class_index)`, so classes
do not share candidate noise and a class's group does not depend on which other classes run. A candidate whose
score is NaN (no skewness: a feature equal on all members, possible at IPC 2 after rounding) is never kept; the
authors' `torch.min` returns NaN there and their loop drops that whole batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .. import ops
from ..data.atomic import save_safetensors_atomic
from ..ops._checks import check_positive_int
from ..progress import progress_bar
from ..sampling.diffusion import GaussianDiffusion
from ..sampling.sampler import GuidedSampler, ddim_invert
from ..sampling.seeds import image_seed

D3HR_TARGET_INDEX = 31  # step 18 of 50 with "leading" spacing (timestep 620)
D3HR_CANDIDATES = 10_000
# the authors' group_sampling.py: --m 100000 (lines 287-291) -> m // 10 = 10,000 batches of 10,000 groups per class
# (lines 325-331): 10^8 candidates per class
D3HR_AUTHORS_CANDIDATES = 100_000_000
GROUP_SLICE = 2**20  # candidates per group_sampling call (the best is kept across slices: progress, bounded work)
D3HR_WEIGHTS = (1.0, 1.0, 0.1)
STATISTICS_KEYS = ("mean", "variance", "count")


class ClassStatistics(NamedTuple):
    """Diagonal Gaussian of one class's inverted latents: mean, variance (unbiased): [C, H, W]; count: images;
    config: what they were computed with (class_index, target_index, num_steps, timestep_spacing, cfg_scale, ...)."""

    mean: Tensor
    variance: Tensor
    count: int
    config: dict


# --------------------------------------------------------------------------------------------- inversion
def invert_class_latents(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    latents: Tensor,
    class_index: int,
    target_index: int = D3HR_TARGET_INDEX,
    *,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    cfg_channels: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    class_name: str | None = None,
) -> Tensor:
    """DDIM inversion of one class's clean latents with label class_index to target_index.

    batch_size images per `ddim_invert` call (CFG on all eps channels by default).

    Args:
        model: the DiT.
        diffusion: the respaced diffusion.
        latents: [N, C, H, W] clean latents of the class (N >= 1).
        class_index: the label.
        target_index: respaced index to invert to.
        cfg_scale: CFG scale.
        null_class: the unconditional label.
        cfg_channels: guided eps channels (None: all).
        batch_size: images per call (> 0).
        progress: show a progress bar.
        class_name: the class's name for the bar (default: its label).

    Returns:
        [N, C, H, W] latents at target_index.

    Raises:
        ValueError: if latents is not a non-empty [N, C, H, W] or batch_size <= 0.
    """
    if latents.dim() != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents: expected a non-empty [N, C, H, W] class, got shape {list(latents.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    out = []
    for start in progress_bar(
        range(0, latents.shape[0], batch_size),
        disable=not progress,
        desc=f"d3hr inversion, class {class_name or class_index}",
    ):
        chunk = latents[start : start + batch_size]
        labels = torch.full((chunk.shape[0],), class_index, dtype=torch.long, device=chunk.device)
        out.append(ddim_invert(model, diffusion, chunk, labels, target_index, cfg_scale, null_class, cfg_channels))
    return torch.cat(out)


def class_statistics(latents: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and unbiased variance over N >= 2 latents.

    float64 sums, returned in the latents' dtype.

    Args:
        latents: [N, ...].

    Returns:
        (mean [...], variance [...]).

    Raises:
        ValueError: if N < 2.
    """
    if latents.shape[0] < 2:
        raise ValueError(f"latents: the unbiased variance needs at least 2 images, got {latents.shape[0]}")
    wide = latents.double()
    return wide.mean(0).to(latents.dtype), wide.var(0, unbiased=True).to(latents.dtype)


# --------------------------------------------------------------------------------------------- files
def statistics_path(stats_dir: str | Path, class_index: int) -> Path:
    """Where `inverted_class_statistics` keeps class class_index.

    Args:
        stats_dir: the statistics folder.
        class_index: the class.

    Returns:
        Path <stats_dir>/class_<class_index, zero-padded to 5 digits>.safetensors.
    """
    return Path(stats_dir) / f"class_{class_index:05d}.safetensors"


def save_class_statistics(path: str | Path, stats: ClassStatistics) -> None:
    """Write mean, variance and count (tensors) and the config (JSON metadata) atomically.

    Args:
        path: the safetensors file.
        stats: the class statistics.
    """
    tensors = {"mean": stats.mean, "variance": stats.variance, "count": torch.tensor([stats.count], dtype=torch.long)}
    save_safetensors_atomic(tensors, path, {"fastdd_d3hr": json.dumps(stats.config, sort_keys=True)})


def load_class_statistics(path: str | Path, device: torch.device | str = "cpu") -> ClassStatistics:
    """Read a file written by `save_class_statistics`.

    Args:
        path: the safetensors file.
        device: where the tensors are loaded.

    Returns:
        ClassStatistics: mean, variance [C, H, W], count, config.

    Raises:
        ValueError: naming the file, if it or an entry is missing, it is unreadable, or mean and variance differ
            in shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"statistics file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            missing = [key for key in STATISTICS_KEYS if key not in f.keys()]
            mean, variance, count = (None,) * 3 if missing else (f.get_tensor(key) for key in STATISTICS_KEYS)
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise ValueError(f"statistics file {path} is not a readable safetensors file ({err})") from None
    if missing:
        raise ValueError(f"statistics file {path} lacks the entries {missing}")
    if "fastdd_d3hr" not in metadata:
        raise ValueError(f"statistics file {path} has no fastdd_d3hr config metadata")
    if mean.shape != variance.shape:
        raise ValueError(f"statistics file {path}: mean {list(mean.shape)} and variance {list(variance.shape)} differ")
    return ClassStatistics(mean, variance, int(count.flatten()[0]), json.loads(metadata["fastdd_d3hr"]))


def statistics_config(sampler: GuidedSampler, class_index: int, target_index: int, inputs: dict | None = None) -> dict:
    """The facts a stored class Gaussian depends on (compared before a file is reused).

    Args:
        sampler: the sampler whose diffusion and CFG settings are recorded.
        class_index: the class.
        target_index: the respaced target index, in 0..N-1.
        inputs: what else the statistics depend on (e.g. fingerprints of the real data and the weights, the seed).

    Returns:
        {class_index, target_index, timestep, num_steps, timestep_spacing, cfg_scale, cfg_channels, null_class}
        (plus inputs when given).

    Raises:
        ValueError: if target_index is not an int in 0..N-1.
    """
    diffusion = sampler.diffusion
    if (
        isinstance(target_index, bool)
        or not isinstance(target_index, int)
        or not 0 <= target_index < diffusion.num_steps
    ):
        raise ValueError(f"target_index must be an int in 0..{diffusion.num_steps - 1}, got {target_index!r}")
    config = {
        "class_index": int(class_index),
        "target_index": int(target_index),
        "timestep": int(diffusion.timestep_list[target_index]),
        "num_steps": diffusion.num_steps,
        "timestep_spacing": diffusion.timestep_spacing,
        "cfg_scale": float(sampler.cfg_scale),
        "cfg_channels": sampler.cfg_channels,
        "null_class": int(sampler.null_class),
    }
    return config | ({"inputs": inputs} if inputs else {})


FOLDER_CONFIG = "statistics.json"


def claim_statistics_folder(stats_dir: str | Path, config: dict, write: bool = True) -> None:
    """Make a shared statistics folder this run's, or refuse it (ValueError, before anything else is written).

    The folder's `statistics.json` records the settings its files are made with (a `statistics_config` without the
    class); it is read, and written when absent, under an exclusive lock on the folder's `.lock`, so two runs started
    together on an empty folder cannot both claim it: the second sees the first's settings. Per-class files are
    checked against the same settings when they are read (`check_statistics_file`).

    Args:
        stats_dir: the folder (created when write and missing).
        config: the folder-level settings.
        write: False (a dry run): only check what is there.
    """
    import fcntl

    from ..data.atomic import write_bytes_atomic

    folder = Path(stats_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--d3hr-stats {folder} is a file, not a folder")
    if not folder.exists() and not write:
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / FOLDER_CONFIG
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            try:
                stored = json.loads(record.read_text())
            except ValueError as err:
                raise ValueError(f"--d3hr-stats: {record} is not readable JSON ({err})") from None
            if stored != json.loads(json.dumps(config)):
                changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
                raise ValueError(
                    f"--d3hr-stats {folder} holds statistics made with other settings (differs in: "
                    f"{', '.join(changed)}); use another folder or delete it"
                )
        elif write:
            write_bytes_atomic((json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), record)


def check_statistics_file(path: Path, config: dict) -> ClassStatistics:
    """A stored class Gaussian, checked to have been made with `config`.

    Args:
        path: the statistics file.
        config: the `statistics_config` of the run.

    Returns:
        The file's ClassStatistics (on the CPU).

    Raises:
        ValueError: naming the file, when it was made with another config (or cannot be read).
    """
    stats = load_class_statistics(path)
    stored = stats.config
    if stored != config:
        changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        raise ValueError(
            f"statistics file {path} was made with other settings (differs in: {', '.join(changed)}); "
            "use another statistics folder or delete it"
        )
    return stats


def inverted_class_statistics(
    sampler: GuidedSampler,
    latents: Tensor | None,
    class_index: int,
    target_index: int = D3HR_TARGET_INDEX,
    *,
    stats_dir: str | Path | None = None,
    batch_size: int = 64,
    inputs: dict | None = None,
    progress: bool = True,
    class_name: str | None = None,
) -> ClassStatistics:
    """The class Gaussian at target_index, reused from stats_dir or computed by DDIM inversion.

    Loaded from `statistics_path(stats_dir, class_index)` when that file exists (latents may then be None),
    else computed by inverting latents with the sampler's model, diffusion and CFG settings and saved there
    (when stats_dir is given).

    Args:
        sampler: the sampler (model, diffusion, CFG settings).
        latents: [N, C, H, W] clean latents of the class (N >= 2), or None when the file exists.
        class_index: the class.
        target_index: the respaced target index.
        stats_dir: the statistics folder (None: not stored).
        batch_size: images per inversion call.
        inputs: what else the statistics depend on (see `statistics_config`).
        progress: show a progress bar.
        class_name: the class's name in the progress bar (default: its label).

    Returns:
        ClassStatistics: mean, variance [C, H, W], count, config.

    Raises:
        ValueError: if a stored file was made with another config (target index, schedule, CFG, class,
            `inputs`) instead of being silently reused or overwritten, or latents are None without a file, or
            there are fewer than 2 latents.
    """
    config = statistics_config(sampler, class_index, target_index, inputs)
    path = statistics_path(stats_dir, class_index) if stats_dir is not None else None
    if path is not None and path.is_file():
        return check_statistics_file(path, config)
    if latents is None:
        raise ValueError(f"latents are needed: no statistics file for class {class_index} in stats_dir={stats_dir}")
    if latents.shape[0] < 2:
        raise ValueError(
            f"latents: class {class_index} needs at least 2 images for an unbiased variance, got {latents.shape[0]}"
        )
    inverted = invert_class_latents(
        sampler.model,
        sampler.diffusion,
        latents,
        class_index,
        target_index,
        cfg_scale=sampler.cfg_scale,
        null_class=sampler.null_class,
        cfg_channels=sampler.cfg_channels,
        batch_size=batch_size,
        progress=progress,
        class_name=class_name,
    )
    mean, variance = class_statistics(inverted)
    stats = ClassStatistics(mean, variance, latents.shape[0], config)
    if path is not None:
        save_class_statistics(path, stats)
    return stats


# --------------------------------------------------------------------------------------------- groups
def group_seed(seed: int, class_index: int) -> int:
    """Seed of a class's candidate generator in a run seeded with `seed` (a SplitMix64 hash).

    Args:
        seed: the run seed.
        class_index: the class.

    Returns:
        The seed.
    """
    return image_seed(seed, class_index, 0)


def select_group(
    stats: ClassStatistics,
    ipc: int,
    n_candidates: int = D3HR_CANDIDATES,
    *,
    generator: torch.Generator | None = None,
    weights: tuple[float, float, float] = D3HR_WEIGHTS,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The lowest-score group of ipc latents among n_candidates drawn from the class Gaussian.

    Groups drawn from N(mean, variance) by `fastdd.ops.group_sampling` on the flattened Gaussian, GROUP_SLICE
    candidates per call from the same generator; the first lowest score across calls is kept (strict <, as the
    authors' loop over its batches).

    Args:
        stats: the class Gaussian (mean, variance [C, H, W]).
        ipc: group size.
        n_candidates: groups drawn.
        generator: generator of the draws, on the statistics' device.
        weights: (w_mean, w_std, w_skew) of the score.
        backend: the group_sampling backend.
        progress: a bar over the calls when there is more than one.

    Returns:
        (group [ipc, C, H, W], score 0-dim).

    Raises:
        ValueError: if ipc or n_candidates is not a positive int, ipc exceeds the number of class images (a
            distilled class larger than the real one), or mean / variance is not finite or the variance negative.
    """
    check_positive_int("ipc", ipc)
    check_positive_int("n_candidates", n_candidates)
    if ipc > stats.count:
        raise ValueError(f"ipc={ipc} is larger than the class ({stats.count} images)")
    if not (torch.isfinite(stats.mean).all() and torch.isfinite(stats.variance).all()):
        raise ValueError("stats: mean or variance contains NaN or Inf")
    if (stats.variance < 0).any():
        raise ValueError("stats: variance has negative entries")
    mean, std = stats.mean.flatten(), stats.variance.flatten().sqrt()
    best_group, best_score = None, None
    slices = range(0, n_candidates, GROUP_SLICE)
    bar = progress_bar(slices, desc="d3hr groups", unit="slice", disable=not progress or len(slices) == 1)
    for start in bar:
        count = min(GROUP_SLICE, n_candidates - start)
        group, score = ops.group_sampling(mean, std, ipc, count, generator=generator, weights=weights, backend=backend)
        if best_score is None or bool(score < best_score):
            best_group, best_score = group, score
    return best_group.view(ipc, *stats.mean.shape), best_score


def _model_device(sampler: GuidedSampler) -> torch.device:
    parameter = next(iter(sampler.model.parameters()), None) if isinstance(sampler.model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def generate_from_group(
    sampler: GuidedSampler,
    group: Tensor,
    class_index: int,
    start_index: int = D3HR_TARGET_INDEX,
    *,
    progress: bool = True,
) -> Tensor:
    """DDIM (η = 0) of every group latent from start_index to the end with label class_index.

    Build the sampler with compat=False and cfg_channels=None (D3HR's diffusers pipeline guides all 4 eps
    channels); its guidances, if any, run too.

    Args:
        sampler: the sampler.
        group: [ipc, C, H, W] latents at start_index.
        class_index: the label.
        start_index: the respaced start index.
        progress: show a progress bar.

    Returns:
        [ipc, C, H, W] final latents.
    """
    labels = [class_index] * group.shape[0]
    return sampler.ddim_sample(labels, start_index=start_index, x_start=group, progress=progress)


def class_group(
    sampler: GuidedSampler,
    latents: Tensor | None,
    class_index: int,
    ipc: int,
    *,
    target_index: int = D3HR_TARGET_INDEX,
    n_candidates: int = D3HR_CANDIDATES,
    seed: int = 0,
    stats_dir: str | Path | None = None,
    batch_size: int = 64,
    weights: tuple[float, float, float] = D3HR_WEIGHTS,
    backend: str = "auto",
    inputs: dict | None = None,
    progress: bool = True,
    class_name: str | None = None,
) -> Tensor:
    """D3HR's representative group of one class.

    Statistics (reused from stats_dir if present) -> the best of n_candidates groups. Candidates come from a
    generator on the model's device (latents' device when given) seeded with group_seed(seed, class_index).

    Args:
        sampler: the sampler (model, diffusion, CFG settings).
        latents: the class's clean VAE latents [N, C, H, W] (encoder samples, see
            `fastdd.data.latents.encode_latents` with sample=True), or None when stats_dir holds the class's
            statistics.
        class_index: the class.
        ipc: group size.
        target_index: the respaced inversion index.
        n_candidates: groups drawn.
        seed: the run seed.
        stats_dir: the statistics folder.
        batch_size: images per inversion call.
        weights: (w_mean, w_std, w_skew) of the score.
        backend: the group_sampling backend.
        inputs: what else the statistics depend on (see `statistics_config`).
        progress: show a progress bar.
        class_name: the class's name in the progress bar (default: its label).

    Returns:
        [ipc, C, H, W] latents at target_index, on the model's device (latents' device when given).

    Raises:
        ValueError: if ipc is not a positive int, latents is empty, or statistics or group selection fail (see
            `inverted_class_statistics`, `select_group`).
    """
    check_positive_int("ipc", ipc)
    if latents is not None and latents.dim() == 4 and latents.shape[0] == 0:
        raise ValueError(f"latents: class {class_index} is empty")
    stats = inverted_class_statistics(
        sampler,
        latents,
        class_index,
        target_index,
        stats_dir=stats_dir,
        batch_size=batch_size,
        inputs=inputs,
        progress=progress,
        class_name=class_name,
    )
    device = latents.device if latents is not None else _model_device(sampler)
    stats = ClassStatistics(stats.mean.to(device), stats.variance.to(device), stats.count, stats.config)
    generator = torch.Generator(device=device).manual_seed(group_seed(seed, class_index))
    group, _ = select_group(
        stats, ipc, n_candidates, generator=generator, weights=weights, backend=backend, progress=progress
    )
    return group


def distill_class(
    sampler: GuidedSampler,
    latents: Tensor | None,
    class_index: int,
    ipc: int,
    *,
    target_index: int = D3HR_TARGET_INDEX,
    start_index: int | None = None,
    progress: bool = True,
    **group_options,
) -> Tensor:
    """D3HR for one class: `class_group` -> DDIM from start_index.

    Args:
        sampler: the sampler.
        latents: [N, C, H, W] clean latents of the class, or None (see `class_group`).
        class_index: the class.
        ipc: images to distill.
        target_index: the respaced inversion index.
        start_index: the respaced DDIM start index (default: target_index).
        progress: show progress bars.
        **group_options: n_candidates, seed, stats_dir, batch_size, weights, backend, inputs (see `class_group`).

    Returns:
        [ipc, C, H, W] final latents.

    Raises:
        ValueError: as `class_group`.
    """
    group = class_group(
        sampler, latents, class_index, ipc, target_index=target_index, progress=progress, **group_options
    )
    start = target_index if start_index is None else start_index
    return generate_from_group(sampler, group, class_index, start, progress=progress)
