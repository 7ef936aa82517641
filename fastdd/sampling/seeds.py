"""Deterministic per-image randomness.

Every image is identified by (seed, class_index, image_index). Its 63-bit seed is a SplitMix64 hash of
the three numbers (stable across Python versions and processes, unlike ``hash()``), and all of its noise
comes from its own CPU ``torch.Generator``, drawn in a fixed order. So an image is identical whether it
is generated alone, in a batch with other images (in any order), or after a restart, and the sampling loop
needs no RNG calls (hence no host syncs) once its trajectory noise is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(state: int) -> int:
    """One SplitMix64 output for a 64-bit state (Steele, Lea & Flood 2014; Vigna's reference code):
    z = state + 0x9E3779B97F4A7C15, then the two xor-shift-multiply rounds and a final xor-shift."""
    z = (state + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def image_seed(seed: int, class_index: int, image_index: int) -> int:
    """The 63-bit seed of image `image_index` of class `class_index` in a run seeded with `seed`:
    h = splitmix64(seed); h = splitmix64(h ^ class_index); h = splitmix64(h ^ image_index); return h >> 1
    (all arithmetic mod 2**64)."""
    h = splitmix64(_check_non_negative("seed", seed) & _MASK64)
    h = splitmix64(h ^ (_check_non_negative("class_index", class_index) & _MASK64))
    h = splitmix64(h ^ (_check_non_negative("image_index", image_index) & _MASK64))
    return h >> 1


def image_generator(seed: int, class_index: int, image_index: int) -> torch.Generator:
    """A fresh CPU generator seeded with `image_seed(seed, class_index, image_index)`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(image_seed(seed, class_index, image_index))
    return generator


class TrajectoryNoise(NamedTuple):
    """All the Gaussian noise of one sampling trajectory.

    initial: [C, H, W] the starting latent x_T; steps: [num_steps, rows, C, H, W], steps[i] = the noise
    added at respaced index i (num_steps - 1 = noisiest), one row per sampler row of the image.
    """

    initial: Tensor
    steps: Tensor


def trajectory_noise(
    seed: int,
    class_index: int,
    image_index: int,
    shape: Sequence[int],
    num_steps: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rows: int = 1,
) -> TrajectoryNoise:
    """The noise image (class_index, image_index) of a run seeded with `seed` needs, from its own generator.

    shape: the latent shape (C, H, W). Drawn in float32 on the CPU, in this order: the initial latent
    (one call), then for each row r = 0..rows-1 one call of [num_steps, C, H, W] holding the per-step noise
    in loop order (index num_steps - 1 first). Hence the initial latent does not depend on num_steps or rows,
    and row 0 does not depend on rows: a compat run (rows=2: the conditional row and its shadow row) uses
    the same initial latent and conditional-row noise as a clean run (rows=1). Then cast to `dtype` and
    moved to `device` (the values do not depend on either).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    if num_steps <= 0:
        raise ValueError(f"num_steps must be > 0, got {num_steps}")
    if rows <= 0:
        raise ValueError(f"rows must be > 0, got {rows}")
    generator = image_generator(seed, class_index, image_index)
    initial = torch.randn(shape, generator=generator, dtype=torch.float32)
    per_row = [torch.randn((num_steps, *shape), generator=generator, dtype=torch.float32) for _ in range(rows)]
    # draw order is loop order (noisiest first); flip so that steps[i] belongs to respaced index i
    steps = torch.stack(per_row, dim=1).flip(0)
    return TrajectoryNoise(initial.to(device=device, dtype=dtype), steps.to(device=device, dtype=dtype))


def batch_trajectory_noise(
    image_ids: Sequence[tuple[int, int, int]],
    shape: Sequence[int],
    num_steps: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rows: int = 1,
) -> TrajectoryNoise:
    """`trajectory_noise` of a batch of images laid out as the sampler's rows.

    image_ids: [(class_index, image_index, seed)] for B images. Returns initial: [B, C, H, W] and
    steps: [num_steps, rows·B, C, H, W] with row r·B + b = row r of image b (compat: [cond rows; shadow rows]).
    One host-to-device copy per tensor.
    """
    if len(image_ids) == 0:
        raise ValueError("image_ids must not be empty")
    noises = [trajectory_noise(seed, c, i, shape, num_steps, "cpu", torch.float32, rows) for c, i, seed in image_ids]
    initial = torch.stack([n.initial for n in noises])
    steps = torch.stack([n.steps for n in noises], dim=2)  # [N, rows, B, C, H, W]
    steps = steps.reshape(num_steps, rows * len(image_ids), *steps.shape[3:])
    return TrajectoryNoise(initial.to(device=device, dtype=dtype), steps.to(device=device, dtype=dtype))
