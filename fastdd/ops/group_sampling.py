"""D3HR group sampling: the most representative of many random groups of latents from a class Gaussian.

`group_sampling(mean, std, ipc, n_candidates)` draws n_candidates groups of ipc latents from
N(mean, diag(std²)) and keeps the one with the lowest D3HR score (`reference.group_score`):
w0·‖mean over members − mean‖ + w1·‖unbiased std over members − std‖ + w2·‖skew per member‖.

Backends:
- reference: `reference.group_sampling` (torch.randn from `generator`, in chunks of `chunk` groups).
- cpp (CPU): `torch.ops.fastdd_C.group_sampling`, the same draws in the same order (at::randn on the same
  generator), scored by one fused C++ pass per group (`torch.ops.fastdd_C.group_score`, float64
  accumulation); it picks the reference's group up to float rounding of the scores.
- triton (CUDA): candidates are drawn inside the kernel with Triton's Philox, seeded by one 64-bit seed
  per call (from `generator`, or `seed=`), scored while streaming over D and never stored; the winner is
  regenerated from the same stream. This is a different random stream from torch.randn: triton results
  match the reference's SCORING of its own candidates, not the reference's candidates.
The selection is not differentiable (nothing flows back to mean / std).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks, reference
from ._backend import dispatch, extension, register_kernels, register_op, resolve_backend
from ._checks import check_positive_int, check_same_device, check_tensor

register_op("group_score", cpu=("cpp", "reference"), cuda=("reference",))
register_op("group_sampling", cpu=("cpp", "reference"), cuda=("triton", "reference"))

DEFAULT_WEIGHTS = (1.0, 1.0, 0.1)
SEED_HIGH = 2**63 - 1  # seeds are drawn in [0, 2**63 - 1)


# --------------------------------------------------------------------------- scoring
def _reference_group_score(groups, mean, std, w_mean, w_std, w_skew):
    return reference.group_score(groups, mean, std, (w_mean, w_std, w_skew))


def _cpp_group_score(groups, mean, std, w_mean, w_std, w_skew):
    extension()
    return torch.ops.fastdd_C.group_score(groups, mean, std, w_mean, w_std, w_skew).to(groups.dtype)


_GROUP_SCORE = {"reference": _reference_group_score, "cpp": _cpp_group_score}


@torch.library.custom_op("fastdd::group_score", mutates_args=())
def _group_score_op(groups: Tensor, mean: Tensor, std: Tensor, w_mean: float, w_std: float, w_skew: float) -> Tensor:
    """groups [G, ipc, D], mean / std [D] -> scores [G]; CPU / CUDA kernels below, this reference elsewhere."""
    return _reference_group_score(groups, mean, std, w_mean, w_std, w_skew)


@_group_score_op.register_fake
def _(groups, mean, std, w_mean, w_std, w_skew):
    return groups.new_empty(groups.shape[0])


register_kernels(_group_score_op, "group_score", _GROUP_SCORE)


def group_score(groups: Tensor, mean: Tensor, std: Tensor, weights=DEFAULT_WEIGHTS, *, backend: str = "auto") -> Tensor:
    """D3HR score of each candidate group (lower is better).

    Args:
        groups: [G, ipc, D].
        mean: [D] (D >= 3), on groups' device.
        std: [D], non-negative, mean's dtype.
        weights: (w_mean, w_std, w_skew), non-negative and finite.
        backend: "cpp" (CPU) is one fused pass per group (float64 accumulation); "reference" is
            reference.group_score; "auto": OP_BACKENDS.

    Returns:
        [G] scores.

    Raises:
        ValueError: if the shapes, dtypes, devices or weights are invalid or std has negative entries.
    """
    check_tensor("groups", groups, ndim=3)
    _check_distribution(mean, std, groups.device)
    if groups.shape[2] != mean.shape[0]:
        raise ValueError(f"groups has D={groups.shape[2]} features but mean has D={mean.shape[0]}")
    return dispatch(_group_score_op, "group_score", backend, groups.device, groups, mean, std, *_check_weights(weights))


# --------------------------------------------------------------------------- sampling
def _reference_group_sampling(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk):
    weights = (w_mean, w_std, w_skew)
    return reference.group_sampling(mean, std, ipc, n_candidates, generator=generator, weights=weights, chunk=chunk)


def _cpp_group_sampling(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk):
    extension()
    return torch.ops.fastdd_C.group_sampling(mean, std, ipc, n_candidates, generator, w_mean, w_std, w_skew, chunk)


def _triton_group_sampling(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk):
    from .triton.group_sampling import group_sampling_triton

    seed = _draw_seed(generator, mean.device) if seed is None else seed
    group, score = group_sampling_triton(mean, std, seed, ipc, n_candidates, (w_mean, w_std, w_skew))
    return group.to(mean.dtype), score.to(mean.dtype)


_GROUP_SAMPLING = {"reference": _reference_group_sampling, "cpp": _cpp_group_sampling, "triton": _triton_group_sampling}


@torch.library.custom_op(
    "fastdd::group_sampling",
    mutates_args=(),
    schema="(Tensor mean, Tensor std, Generator? generator, Tensor? seed, int ipc, int n_candidates, float w_mean, "
    "float w_std, float w_skew, int chunk) -> (Tensor, Tensor)",
)
def _group_sampling_op(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk):
    """-> (group [ipc, D], score 0-dim) in mean's dtype. reference / cpp draw from `generator`; triton from
    Philox with `seed` (0-dim int64; None: drawn from `generator`). CPU / CUDA kernels below, this reference
    elsewhere."""
    return _reference_group_sampling(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk)


@_group_sampling_op.register_fake
def _(mean, std, generator, seed, ipc, n_candidates, w_mean, w_std, w_skew, chunk):
    return mean.new_empty(ipc, mean.shape[0]), mean.new_empty(())


register_kernels(_group_sampling_op, "group_sampling", _GROUP_SAMPLING)


def philox_candidates(
    mean: Tensor, std: Tensor, ipc: int, n_candidates: int, *, seed: int | Tensor, weights=DEFAULT_WEIGHTS
):
    """The candidates backend="triton" draws for `seed`, materialised, with their fused scores.

    For tests and small sizes.

    Args:
        mean: [D] (D >= 3).
        std: [D], non-negative.
        ipc: group size.
        n_candidates: number of groups.
        seed: an int in [0, 2**63) or a 0-dim integer tensor.
        weights: (w_mean, w_std, w_skew).

    Returns:
        (groups [n_candidates, ipc, D], scores [n_candidates]), float32.

    Raises:
        ValueError: if mean / std, ipc, n_candidates, weights or seed are invalid.
    """
    from .triton.group_sampling import group_candidates_triton

    _check_sizes(mean, std, ipc, n_candidates)
    weights = _check_weights(weights)
    return group_candidates_triton(mean, std, _seed_tensor(seed, mean.device), ipc, n_candidates, weights)


def group_sampling(
    mean: Tensor,
    std: Tensor,
    ipc: int,
    n_candidates: int,
    *,
    generator: torch.Generator | None = None,
    weights=DEFAULT_WEIGHTS,
    seed: int | Tensor | None = None,
    chunk: int = 1024,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Best of n_candidates groups of ipc latents from N(mean, diag(std²)).

    reference / cpp draw randn(chunk, ipc, D) * std + mean from the generator chunk after chunk and agree with
    each other; triton draws one 64-bit Philox seed from the generator (or uses `seed`) and generates the
    candidates in-kernel: the same scoring, another random stream (see the module docstring); it takes ipc <= 64
    ("auto" falls back to the reference above) and computes in float32 (output in mean's dtype). Not
    differentiable.

    Args:
        mean: [D] (D >= 3: the skewness needs 3 features).
        std: [D], non-negative, mean's dtype.
        ipc: group size.
        n_candidates: number of groups.
        generator: a torch.Generator on mean's device (not with seed; neither: the device's default generator).
        weights: (w_mean, w_std, w_skew) >= 0.
        seed: an int; for triton also a 0-dim integer tensor (with value_checks(False) the call is then free of
            host syncs).
        chunk: candidates drawn and scored at once by reference / cpp (memory: chunk · ipc · D values).
        backend: "auto" (OP_BACKENDS) or an implementation to force.

    Returns:
        (group [ipc, D], score 0-dim), in mean's dtype.

    Raises:
        ValueError: if mean / std, ipc, n_candidates, weights, chunk, generator or seed are invalid, both
            generator and seed are given, or ipc > 64 with backend="triton".
    """
    _check_sizes(mean, std, ipc, n_candidates)
    weights = _check_weights(weights)
    check_positive_int("chunk", chunk)
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != mean.device.type
    ):
        raise ValueError(f"generator must be a torch.Generator on {mean.device.type}, got {generator!r}")
    chosen = _resolve(backend, ipc, mean.device)
    if seed is not None and chosen != "triton":
        if isinstance(seed, Tensor):
            raise ValueError(f"seed must be an int for backend={chosen!r} (a tensor seed is for triton)")
        generator, seed = torch.Generator(device=mean.device).manual_seed(_check_seed(seed)), None
    seed = None if seed is None else _seed_tensor(seed, mean.device)
    args = (mean, std, generator, seed, ipc, n_candidates, *weights, chunk)
    return dispatch(_group_sampling_op, "group_sampling", chosen, mean.device, *args)


# --------------------------------------------------------------------------- checks
def _resolve(backend: str, ipc: int, device: torch.device) -> str:
    """The backend that runs; "auto" falls back to the reference when ipc is over the Triton kernel's limit."""
    chosen = resolve_backend("group_sampling", backend, device)
    if chosen == "triton":
        from .triton.group_sampling import MAX_IPC

        if ipc > MAX_IPC:
            if backend == "auto":
                return "reference"
            raise ValueError(f"ipc must be <= {MAX_IPC} for backend='triton', got {ipc}")
    return chosen


def _check_distribution(mean: Tensor, std: Tensor, device: torch.device | None = None) -> None:
    check_tensor("mean", mean, ndim=1)
    check_tensor("std", std, ndim=1)
    check_same_device(mean=mean, std=std)
    if device is not None and device != mean.device:
        raise ValueError(f"mean is on {mean.device} but groups is on {device}")
    if std.shape != mean.shape:
        raise ValueError(f"std has shape {tuple(std.shape)} but mean has shape {tuple(mean.shape)}")
    if std.dtype != mean.dtype:
        raise ValueError(f"std is {std.dtype} but mean is {mean.dtype}")
    if mean.shape[0] < 3:
        raise ValueError(f"mean must have at least 3 features (the skewness needs n >= 3), got D={mean.shape[0]}")
    if _checks._value_checks and not _checks._capturing() and bool((std < 0).any()):
        raise ValueError("std has negative entries")


def _check_sizes(mean: Tensor, std: Tensor, ipc, n_candidates) -> None:
    _check_distribution(mean, std)
    for name, value in (("ipc", ipc), ("n_candidates", n_candidates)):
        check_positive_int(name, value)


def _check_weights(weights) -> tuple[float, float, float]:
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be 3 non-negative numbers, got {weights!r}") from None
    if len(values) != 3 or not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"weights must be 3 non-negative finite numbers (mean, std, skew), got {weights!r}")
    return values


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def _seed_tensor(seed: int | Tensor, device: torch.device) -> Tensor:
    """A given seed (an int or a 0-dim integer tensor) as a 0-dim int64 tensor on `device`."""
    if isinstance(seed, Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(
                f"seed must be an int or a 0-dim integer tensor, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        return seed.to(device=device, dtype=torch.int64)
    return torch.tensor(_check_seed(seed), device=device, dtype=torch.int64)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One seed in [0, SEED_HIGH) drawn from `generator` (else the device's default one), 0-dim int64 on `device`."""
    source_device = generator.device if generator is not None else device
    drawn = torch.randint(0, SEED_HIGH, (), generator=generator, device=source_device, dtype=torch.int64)
    return drawn.to(device)
