"""Input validation shared by the ops: clear ValueErrors that name the argument.

Shape, dtype and device checks read only metadata. Value checks (NaN/Inf) need a host sync, so they
run only in eager mode outside CUDA-graph capture and torch.compile, and can be switched off for hot
loops with `fastdd.ops.value_checks(False)`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

_value_checks = True


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Context manager turning the NaN/Inf input checks on or off."""
    global _value_checks
    previous, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = previous


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(name: str, t, *, ndim: int | None = None, floating: bool = True, finite: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if finite and floating and _value_checks and not _capturing() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_same_device(**tensors: Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_positive_int(name: str, value) -> int:
    """value must be an int >= 1 (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_nonempty(name: str, t: Tensor, dim: int = 0) -> None:
    if t.shape[dim] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_count(count, capacity: int, device: torch.device):
    """count: None, an int in [0, capacity], or a 0-dim integer tensor on `device` -> None or int64 tensor."""
    if count is None:
        return None
    if isinstance(count, Tensor):
        if count.dim() != 0 or count.is_floating_point():
            raise ValueError(f"count must be a 0-dim integer tensor, got {count.dtype} of shape {tuple(count.shape)}")
        if count.device != device:
            raise ValueError(f"count is on {count.device} but memory is on {device}")
        return count.to(torch.int64)
    if not isinstance(count, int) or not 0 <= count <= capacity:
        raise ValueError(f"count must be an int in [0, {capacity}], got {count!r}")
    return torch.full((), count, device=device, dtype=torch.int64)
