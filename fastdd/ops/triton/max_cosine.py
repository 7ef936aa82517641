"""Triton kernels of the cosine-memory ops: max_cosine and most_similar_index.

cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)), accumulated in float32 (float64 when an input is
float64); bfloat16 / float16 inputs are widened on load. The number of valid memory rows is read from
a device tensor inside the kernels, so launching never syncs with the host. Ties go to the lowest index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import COS_EPS

# max_cosine tiles: tl.dot needs at least 16 per side; larger tiles spill registers on sm_80 (bf16, fp64)
QUERY_TILE = 16
MEMORY_TILE = 16
FEATURE_TILE = 32
# most_similar_index tiles
ROW_BLOCK = 32
FEATURE_BLOCK = 64
NUM_WARPS = 4


@triton.jit
def _valid_rows(count_ptr, rows):
    """min(max(count, 0), rows) read from the device."""
    return tl.minimum(tl.maximum(tl.load(count_ptr).to(tl.int32), 0), rows)


@triton.jit
def _inverse_norm(squared_norm, EPS: tl.constexpr):
    """1 / max(sqrt(squared_norm), eps). On GPUs float32 sqrt and division are the fast ones (a few ulp):
    the correctly rounded sqrt_rn / div_rn need a stack frame (local memory) on sm_80."""
    return 1.0 / tl.maximum(tl.sqrt(squared_norm), EPS)


@triton.jit
def max_cosine_kernel(
    query_ptr,
    memory_ptr,
    count_ptr,
    values_ptr,
    indices_ptr,
    batch,
    rows,
    dim,
    query_stride,
    memory_stride,
    EPS: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per block of BLOCK_B queries: running max / argmax of cos over the valid memory rows.

    query: [batch, dim], memory: [rows, dim] (unit stride along dim); values: [batch]; indices: [batch] int64.
    """
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    queries = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    query_mask = queries < batch
    features = tl.arange(0, BLOCK_D)
    n_valid = _valid_rows(count_ptr, rows)

    query_sq = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for d0 in range(0, dim, BLOCK_D):
        mask = query_mask[:, None] & (d0 + features < dim)[None, :]
        q = tl.load(query_ptr + queries[:, None] * query_stride + (d0 + features)[None, :], mask=mask, other=0.0)
        q = q.to(acc_dtype)
        query_sq += tl.sum(q * q, axis=1)
    query_inv_norm = _inverse_norm(query_sq, EPS)

    best = tl.full([BLOCK_B], float("-inf"), dtype=acc_dtype)
    best_index = tl.zeros([BLOCK_B], dtype=tl.int32)
    for m0 in range(0, n_valid, BLOCK_M):
        memory_rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = memory_rows < n_valid
        dots = tl.zeros([BLOCK_B, BLOCK_M], dtype=acc_dtype)
        row_sq = tl.zeros([BLOCK_M], dtype=acc_dtype)
        for d0 in range(0, dim, BLOCK_D):
            feature_mask = (d0 + features < dim)[None, :]
            q = tl.load(
                query_ptr + queries[:, None] * query_stride + (d0 + features)[None, :],
                mask=query_mask[:, None] & feature_mask,
                other=0.0,
            ).to(acc_dtype)
            m = tl.load(
                memory_ptr + memory_rows[:, None] * memory_stride + (d0 + features)[None, :],
                mask=row_mask[:, None] & feature_mask,
                other=0.0,
            ).to(acc_dtype)
            dots += tl.dot(q, tl.trans(m), input_precision="ieee", out_dtype=acc_dtype)
            row_sq += tl.sum(m * m, axis=1)
        cos = dots * query_inv_norm[:, None] * _inverse_norm(row_sq, EPS)[None, :]
        cos = tl.where(row_mask[None, :], cos, float("-inf"))
        tile_best = tl.max(cos, axis=1)
        tile_index = tl.min(tl.where(cos == tile_best[:, None], memory_rows[None, :], rows), axis=1)
        better = tile_best > best  # strict: an earlier tile keeps ties
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)

    best = tl.where(n_valid > 0, best, 0.0)
    tl.store(values_ptr + queries, best, mask=query_mask)
    tl.store(indices_ptr + queries, best_index.to(tl.int64), mask=query_mask)


@triton.jit
def row_inverse_norms_kernel(
    memory_ptr,
    count_ptr,
    inv_norm_ptr,
    rows,
    dim,
    memory_stride,
    EPS: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """inv_norm[j] = 1 / max(‖memory_j‖, eps) for valid rows, 0 for the others. inv_norm: [rows]."""
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    memory_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = memory_rows < _valid_rows(count_ptr, rows)
    features = tl.arange(0, BLOCK_D)
    row_sq = tl.zeros([BLOCK_M], dtype=acc_dtype)
    for d0 in range(0, dim, BLOCK_D):
        mask = valid[:, None] & (d0 + features < dim)[None, :]
        m = tl.load(memory_ptr + memory_rows[:, None] * memory_stride + (d0 + features)[None, :], mask=mask, other=0.0)
        m = m.to(acc_dtype)
        row_sq += tl.sum(m * m, axis=1)
    inv_norm = tl.where(valid, _inverse_norm(row_sq, EPS), 0.0)
    tl.store(inv_norm_ptr + memory_rows, inv_norm, mask=memory_rows < rows)


@triton.jit
def unit_sum_kernel(
    memory_ptr,
    count_ptr,
    inv_norm_ptr,
    unit_sum_ptr,
    rows,
    dim,
    memory_stride,
    USE_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """unit_sum[d] = Σ_{valid j} memory[j, d] · inv_norm[j]: one program per block of features. unit_sum: [dim]."""
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    features = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    feature_mask = features < dim
    n_valid = _valid_rows(count_ptr, rows)
    total = tl.zeros([BLOCK_D], dtype=acc_dtype)
    for m0 in range(0, n_valid, BLOCK_M):
        memory_rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = memory_rows < n_valid
        m = tl.load(
            memory_ptr + memory_rows[:, None] * memory_stride + features[None, :],
            mask=row_mask[:, None] & feature_mask[None, :],
            other=0.0,
        ).to(acc_dtype)
        inv_norm = tl.load(inv_norm_ptr + memory_rows, mask=row_mask, other=0.0)
        total += tl.sum(m * inv_norm[:, None], axis=0)
    tl.store(unit_sum_ptr + features, total, mask=feature_mask)


@triton.jit
def row_scores_kernel(
    memory_ptr,
    count_ptr,
    inv_norm_ptr,
    unit_sum_ptr,
    scores_ptr,
    rows,
    dim,
    memory_stride,
    USE_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """scores[i] = inv_norm[i] · (memory_i · unit_sum) = Σ_j cos(memory_i, memory_j); -inf for invalid rows."""
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    memory_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = memory_rows < _valid_rows(count_ptr, rows)
    features = tl.arange(0, BLOCK_D)
    dots = tl.zeros([BLOCK_M], dtype=acc_dtype)
    for d0 in range(0, dim, BLOCK_D):
        feature_mask = d0 + features < dim
        m = tl.load(
            memory_ptr + memory_rows[:, None] * memory_stride + (d0 + features)[None, :],
            mask=valid[:, None] & feature_mask[None, :],
            other=0.0,
        ).to(acc_dtype)
        s = tl.load(unit_sum_ptr + d0 + features, mask=feature_mask, other=0.0)
        dots += tl.sum(m * s[None, :], axis=1)
    inv_norm = tl.load(inv_norm_ptr + memory_rows, mask=valid, other=0.0)
    scores = tl.where(valid, dots * inv_norm, float("-inf"))
    tl.store(scores_ptr + memory_rows, scores, mask=memory_rows < rows)


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit_stride_rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def max_cosine_triton(query: Tensor, memory: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """query: [B, D], memory: [M, D], count: 0-dim int64 on the same device -> (values [B] float32/64, indices [B] int64)."""
    query, memory = _unit_stride_rows(query), _unit_stride_rows(memory)
    batch, dim = query.shape
    acc = _accumulation_dtype(query, memory)
    values = torch.empty(batch, device=query.device, dtype=acc)
    indices = torch.empty(batch, device=query.device, dtype=torch.int64)
    grid = (triton.cdiv(batch, QUERY_TILE),)
    max_cosine_kernel[grid](
        query,
        memory,
        count,
        values,
        indices,
        batch,
        memory.shape[0],
        dim,
        query.stride(0),
        memory.stride(0),
        EPS=COS_EPS,
        USE_FP64=acc == torch.float64,
        BLOCK_B=QUERY_TILE,
        BLOCK_M=MEMORY_TILE,
        BLOCK_D=FEATURE_TILE,
        num_warps=NUM_WARPS,
    )
    return values, indices


def most_similar_index_triton(memory: Tensor, count: Tensor) -> Tensor:
    """memory: [M, D], count: 0-dim int64 -> 0-dim int64 index of the valid row with the largest summed cosine."""
    memory = _unit_stride_rows(memory)
    rows, dim = memory.shape
    acc = _accumulation_dtype(memory)
    use_fp64 = acc == torch.float64
    inv_norm = torch.empty(rows, device=memory.device, dtype=acc)
    unit_sum = torch.empty(dim, device=memory.device, dtype=acc)
    scores = torch.empty(rows, device=memory.device, dtype=acc)
    row_grid = (triton.cdiv(rows, ROW_BLOCK),)
    row_inverse_norms_kernel[row_grid](
        memory,
        count,
        inv_norm,
        rows,
        dim,
        memory.stride(0),
        EPS=COS_EPS,
        USE_FP64=use_fp64,
        BLOCK_M=ROW_BLOCK,
        BLOCK_D=FEATURE_BLOCK,
        num_warps=NUM_WARPS,
    )
    unit_sum_kernel[(triton.cdiv(dim, FEATURE_BLOCK),)](
        memory,
        count,
        inv_norm,
        unit_sum,
        rows,
        dim,
        memory.stride(0),
        USE_FP64=use_fp64,
        BLOCK_M=ROW_BLOCK,
        BLOCK_D=FEATURE_BLOCK,
        num_warps=NUM_WARPS,
    )
    row_scores_kernel[row_grid](
        memory,
        count,
        inv_norm,
        unit_sum,
        scores,
        rows,
        dim,
        memory.stride(0),
        USE_FP64=use_fp64,
        BLOCK_M=ROW_BLOCK,
        BLOCK_D=FEATURE_BLOCK,
        num_warps=NUM_WARPS,
    )
    return scores.argmax()  # first of equal maxima; 0 when no row is valid (all -inf)
