"""Triton kernel of D3HR group sampling: candidate groups are drawn inside the kernel and never stored.

Candidate g, member i, feature d is mean[d] + std[d] · n where n is a standard normal from Triton's
Philox (`tl.rand4x` + Box–Muller) keyed by a 64-bit seed read from a device tensor. Each program owns one candidate
and streams over the features in blocks of 4·BLOCK_Q (one Philox call gives 4 normals: 4 sub-blocks of
BLOCK_Q features). Every statistic of the score is per feature over the members (the whole [ipc, BLOCK_Q] tile is
there), so it keeps in registers only Σ_d (mean_d − mean[d])², Σ_d (std_d − std[d])² and, per member, Σ_d z³ with
z the feature standardised over the members (the authors' skewness_batch).
The same kernel in "materialise" mode writes the members of chosen candidates (by index, read from a
device tensor) with the same stream, so the returned group is the one that was scored. This is a different
random stream from the reference's torch.randn: backends agree on the scoring, not on the candidates.
All arithmetic is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_IPC = 64  # members of a group kept in registers
TILE_ELEMENTS = 1024  # BLOCK_I · BLOCK_Q: four such float32 tiles of normals live at once
MAX_BLOCK_Q = 64


def block_sizes(ipc: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_Q) for a group of ipc members. The Philox stream depends on them (through the
    counter layout), so scoring and materialising always use the same pair for the same ipc."""
    block_i = triton.next_power_of_2(ipc)
    return block_i, max(16, min(MAX_BLOCK_Q, TILE_ELEMENTS // block_i))


def num_warps(ipc: int) -> int:
    """4 warps; 8 for 32+ members, whose per-member state (and tile at BLOCK_Q = 16) spills with 4 on sm_80."""
    return 8 if ipc > 16 else 4


@triton.jit
def _cos_sin_two_pi(u):
    """(cos 2πu, sin 2πu) for u in [0, 1): a quarter turn q plus b in [−π/4, π/4], Taylor polynomials in b
    (truncation error < 3e-9). libdevice's cosf / sinf would keep a local-memory slow path (Payne–Hanek
    reduction for huge arguments) that 2πu never needs."""
    quarter_turns = tl.floor(u * 4.0 + 0.5)
    b = (u - quarter_turns * 0.25) * 6.283185307179586
    b2 = b * b
    # Taylor series in Horner form: sin to b⁹/9!, cos to b¹⁰/10!
    sin_b = -1.984126984126984e-04 + b2 * 2.755731922398589e-06
    sin_b = b * (1.0 + b2 * (-0.16666666666666666 + b2 * (0.008333333333333333 + b2 * sin_b)))
    cos_b = 2.48015873015873e-05 - b2 * 2.755731922398589e-07
    cos_b = 1.0 + b2 * (-0.5 + b2 * (0.041666666666666664 + b2 * (-1.388888888888889e-03 + b2 * cos_b)))
    q = quarter_turns.to(tl.int32) % 4
    cos = tl.where(q == 0, cos_b, tl.where(q == 1, -sin_b, tl.where(q == 2, -cos_b, sin_b)))
    sin = tl.where(q == 0, sin_b, tl.where(q == 1, cos_b, tl.where(q == 2, -sin_b, -cos_b)))
    return cos, sin


@triton.jit
def _standard_normals(seed, counters):
    """Four blocks of N(0, 1) from one Philox call on `counters` (Triton's rand4x uniforms, Box–Muller)."""
    u1, u2, u3, u4 = tl.rand4x(seed, counters)
    radius_a = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    radius_b = tl.sqrt(-2.0 * tl.log(tl.maximum(u3, 1.0e-7)))
    cos_a, sin_a = _cos_sin_two_pi(u2)
    cos_b, sin_b = _cos_sin_two_pi(u4)
    return radius_a * cos_a, radius_a * sin_a, radius_b * cos_b, radius_b * sin_b


@triton.jit
def _consume_tile(
    noise,
    features,
    dim,
    mean_ptr,
    std_ptr,
    groups_ptr,
    group_rows,
    member_valid,
    member_cubes,
    mean_error,
    std_error,
    IPC: tl.constexpr,
    MATERIALISE: tl.constexpr,
):
    """Fold one [BLOCK_I, BLOCK_Q] tile of normals (features `features`) into the running sums."""
    feature_valid = features < dim
    valid = member_valid[:, None] & feature_valid[None, :]
    mu = tl.load(mean_ptr + features, mask=feature_valid, other=0.0)
    sigma = tl.load(std_ptr + features, mask=feature_valid, other=0.0)
    x = tl.where(valid, noise * sigma[None, :] + mu[None, :], 0.0)  # [BLOCK_I, BLOCK_Q]
    if MATERIALISE:
        tl.store(groups_ptr + group_rows[:, None] * dim + features[None, :], x, mask=valid)

    # over members, per feature
    feature_mean = tl.sum(x, axis=0) * (1.0 / IPC)
    mean_error += tl.where(feature_valid, (feature_mean - mu) * (feature_mean - mu), 0.0)
    if IPC > 1:
        spread = tl.where(valid, x - feature_mean[None, :], 0.0)
        feature_std = tl.sqrt(tl.sum(spread * spread, axis=0) * (1.0 / (IPC - 1)))
        std_error += tl.where(feature_valid, (feature_std - sigma) * (feature_std - sigma), 0.0)
        inverse_std = 1.0 / tl.where(feature_valid, feature_std, 1.0)
        z = spread * inverse_std[None, :]
        member_cubes += tl.sum(z * z * z, axis=1)
    return member_cubes, mean_error, std_error


@triton.jit
def group_candidates_kernel(
    mean_ptr,
    std_ptr,
    seed_ptr,
    index_ptr,
    scores_ptr,
    groups_ptr,
    dim,
    w_mean,
    w_std,
    w_skew,
    IPC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    INDEXED: tl.constexpr,
    SCORE: tl.constexpr,
    MATERIALISE: tl.constexpr,
):
    """Program p handles candidate c = index[p] (INDEXED) or p: scores[p] = its D3HR score (SCORE) and
    groups[p] = its members [IPC, dim] (MATERIALISE). mean, std: [dim] float32; seed: 0-dim int64."""
    program = tl.program_id(0)
    if INDEXED:
        candidate = tl.load(index_ptr + program).to(tl.int64)
    else:
        candidate = program.to(tl.int64)
    seed = tl.load(seed_ptr)
    members = tl.arange(0, BLOCK_I)
    member_valid = members < IPC
    lanes = tl.arange(0, BLOCK_Q)
    # Philox counters: member (c, i) owns blocks_per_member · BLOCK_Q consecutive counters (64-bit)
    blocks_per_member = tl.cdiv(dim, 4 * BLOCK_Q)
    counter_base = (candidate * IPC + members.to(tl.int64)) * blocks_per_member * BLOCK_Q
    group_rows = program.to(tl.int64) * IPC + members.to(tl.int64)

    member_cubes = tl.zeros([BLOCK_I], dtype=tl.float32)
    mean_error = tl.zeros([BLOCK_Q], dtype=tl.float32)
    std_error = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for block in range(0, blocks_per_member):
        counters = counter_base[:, None] + (block * BLOCK_Q + lanes)[None, :]
        n0, n1, n2, n3 = _standard_normals(seed, counters)
        d0 = block * 4 * BLOCK_Q
        member_cubes, mean_error, std_error = _consume_tile(
            n0,
            d0 + lanes,
            dim,
            mean_ptr,
            std_ptr,
            groups_ptr,
            group_rows,
            member_valid,
            member_cubes,
            mean_error,
            std_error,
            IPC,
            MATERIALISE,
        )
        member_cubes, mean_error, std_error = _consume_tile(
            n1,
            d0 + BLOCK_Q + lanes,
            dim,
            mean_ptr,
            std_ptr,
            groups_ptr,
            group_rows,
            member_valid,
            member_cubes,
            mean_error,
            std_error,
            IPC,
            MATERIALISE,
        )
        member_cubes, mean_error, std_error = _consume_tile(
            n2,
            d0 + 2 * BLOCK_Q + lanes,
            dim,
            mean_ptr,
            std_ptr,
            groups_ptr,
            group_rows,
            member_valid,
            member_cubes,
            mean_error,
            std_error,
            IPC,
            MATERIALISE,
        )
        member_cubes, mean_error, std_error = _consume_tile(
            n3,
            d0 + 3 * BLOCK_Q + lanes,
            dim,
            mean_ptr,
            std_ptr,
            groups_ptr,
            group_rows,
            member_valid,
            member_cubes,
            mean_error,
            std_error,
            IPC,
            MATERIALISE,
        )

    if SCORE:
        score = w_mean * tl.sqrt(tl.sum(mean_error, axis=0))
        if IPC > 1:  # the skew per member: Σ_d z³ · n / ((n − 1)(n − 2)) with n = D (the authors' skewness_batch)
            n = dim.to(tl.float32)
            skew = tl.where(member_valid, member_cubes * (n / (n - 1.0) / (n - 2.0)), 0.0)
            score += w_std * tl.sqrt(tl.sum(std_error, axis=0)) + w_skew * tl.sqrt(tl.sum(skew * skew, axis=0))
        tl.store(scores_ptr + program, score)


def _launch(mean, std, seed, ipc, grid, index, scores, groups, weights, *, indexed, score, materialise):
    block_i, block_q = block_sizes(ipc)
    group_candidates_kernel[(grid,)](
        mean,
        std,
        seed,
        index,
        scores,
        groups,
        mean.shape[0],
        float(weights[0]),
        float(weights[1]),
        float(weights[2]),
        IPC=ipc,
        BLOCK_I=block_i,
        BLOCK_Q=block_q,
        INDEXED=indexed,
        SCORE=score,
        MATERIALISE=materialise,
        num_warps=num_warps(ipc),
    )


def _prepare(mean: Tensor, std: Tensor, seed: Tensor):
    return (
        mean.detach().float().contiguous(),
        std.detach().float().contiguous(),
        seed.to(device=mean.device, dtype=torch.int64).reshape(()),
    )


def group_sampling_triton(mean: Tensor, std: Tensor, seed: Tensor, ipc: int, n_candidates: int, weights):
    """mean, std: [D]; seed: 0-dim int64 -> (best group [ipc, D] float32, its score 0-dim float32).

    Scores all candidates without storing them, takes the first minimum on the device and regenerates
    that candidate from the same stream: no host sync."""
    mean, std, seed = _prepare(mean, std, seed)
    scores = torch.empty(n_candidates, device=mean.device, dtype=torch.float32)
    _launch(
        mean, std, seed, ipc, n_candidates, seed, scores, scores, weights, indexed=False, score=True, materialise=False
    )
    best = scores.nan_to_num(nan=float("inf")).argmin().view(1)  # a NaN score (no skewness) is never chosen
    group = torch.empty(ipc, mean.shape[0], device=mean.device, dtype=torch.float32)
    _launch(mean, std, seed, ipc, 1, best, scores, group, weights, indexed=True, score=False, materialise=True)
    return group, scores.index_select(0, best).view(())


def group_candidates_triton(mean: Tensor, std: Tensor, seed: Tensor, ipc: int, n_candidates: int, weights):
    """Every candidate and its fused score: (groups [n_candidates, ipc, D], scores [n_candidates]), float32.

    Materialises what group_sampling_triton only streams (for tests and small sizes)."""
    mean, std, seed = _prepare(mean, std, seed)
    scores = torch.empty(n_candidates, device=mean.device, dtype=torch.float32)
    groups = torch.empty(n_candidates, ipc, mean.shape[0], device=mean.device, dtype=torch.float32)
    _launch(
        mean, std, seed, ipc, n_candidates, seed, scores, groups, weights, indexed=False, score=True, materialise=True
    )
    return groups, scores
