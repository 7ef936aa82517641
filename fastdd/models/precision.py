"""Mixed precision for the networks of a sampling run (DiT, VAE decoder): bf16 autocast in, fp32 out, so every
guidance reduction downstream (gradient cosines, Mercer distances, memories) stays fp32."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def mixed_precision(fn: Callable[..., Tensor], precision: str = "fp32") -> Callable[..., Tensor]:
    """fn(x, *args) under bf16 autocast (precision="bf16") with its result cast back to x's dtype; fn itself
    for "fp32". Autocast's weight cache is off so the wrapped call can be captured in a CUDA graph."""
    if check_precision(precision) == "fp32":
        return fn

    @functools.wraps(fn)
    def autocast_fn(x: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            out = fn(x, *args, **kwargs)
        return out.to(x.dtype)

    return autocast_fn
