"""Triton kernels of mercer_distance (fastdd/ops/mercer.py): split-K dots, a fused epilogue, the x-gradient.

Forward, two passes with a deterministic reduction (no atomics):
1. `partial_dots_kernel`, grid (N tiles, D splits, B tiles): each program multiplies a [BLOCK_B, D-split]
   tile of x with a [BLOCK_N, D-split] tile of y (tl.dot, float32 accumulation; y widened on load, or fed
   to the tensor cores as is when x has y's 16-bit dtype: those products are exact in float32) and stores
   the partial dots [splits, B, N], and on the first N/B tile the partial ‖x_b‖² / ‖y_n‖². Splitting D
   keeps every SM busy for the skinny B ≪ N ≪ D shapes of DAP (B ≤ 64, N ~ 10³, D ~ 3·10⁵).
2. `epilogue_kernel`, grid (N tiles, B tiles): sums the splits, applies the kernel, sqrt(max(·, 0) + eps),
   stores per-tile partial sums of the distances / N (summed by the host in a fixed order) and the backward
   coefficients coef [B, N], alpha (see fastdd/ops/mercer.py).
Backward: `grad_kernel`, grid (D tiles, B tiles): grad_x = g · (alpha · x − coef @ y), one pass over y.

float32 x with a float32 / widened y uses input_precision "tf32x3" (three TF32 tensor-core products: about
float32 accuracy); float64 x uses float64 ("ieee").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_interpreted

# tiles; the AOT test (tests/test_mercer_distance.py) checks them for register spills on sm_80 / sm_90
# (BLOCK_B up to 64 rows of x, so y is read once for B <= 64; larger N / D tiles spill with tf32x3)
BLOCK_N = 32
BLOCK_D = 32
EPILOGUE_TILE = 2048  # pairs per epilogue program: BLOCK_B × (EPILOGUE_TILE // BLOCK_B)
NUM_WARPS = 4
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4  # CPU interpreter: a few D splits, so the tests cover the split-K reduction


@triton.jit
def partial_dots_kernel(
    x_ptr,
    y_ptr,
    dots_ptr,
    x_sq_ptr,
    y_sq_ptr,
    batch,
    rows,
    dim,
    x_stride,
    y_stride,
    split_size,
    COMPUTE_Y_SQ: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    USE_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dots[s, b, n] = Σ_{d in split s} x[b, d]·y[n, d]; x_sq[s, b] = Σ x[b, d]²; y_sq[s, n] = Σ y[n, d]².

    x: [batch, dim], y: [rows, dim] (unit stride along dim); split s covers [s·split_size, (s+1)·split_size).
    """
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    pid_n, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x_rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    y_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_mask, y_mask = x_rows < batch, y_rows < rows
    x_base = x_ptr + x_rows.to(tl.int64)[:, None] * x_stride
    y_base = y_ptr + y_rows.to(tl.int64)[:, None] * y_stride
    features = tl.arange(0, BLOCK_D)

    dots = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_dtype)
    x_sq = tl.zeros([BLOCK_B], dtype=acc_dtype)
    y_sq = tl.zeros([BLOCK_N], dtype=acc_dtype)
    d_start = pid_s * split_size
    d_end = tl.minimum(d_start + split_size, dim)
    for d0 in range(d_start, d_end, BLOCK_D):
        feature_mask = (d0 + features < d_end)[None, :]
        xt = tl.load(x_base + (d0 + features)[None, :], mask=x_mask[:, None] & feature_mask, other=0.0)
        yt = tl.load(y_base + (d0 + features)[None, :], mask=y_mask[:, None] & feature_mask, other=0.0)
        if NATIVE_DOT:
            dots += tl.dot(xt, tl.trans(yt), out_dtype=acc_dtype)
        else:
            dots += tl.dot(xt.to(acc_dtype), tl.trans(yt.to(acc_dtype)), input_precision=PRECISION, out_dtype=acc_dtype)
        if pid_n == 0:
            xw = xt.to(acc_dtype)
            x_sq += tl.sum(xw * xw, axis=1)
        if COMPUTE_Y_SQ:
            if pid_b == 0:
                yw = yt.to(acc_dtype)
                y_sq += tl.sum(yw * yw, axis=1)

    out_mask = x_mask[:, None] & y_mask[None, :]
    tl.store(dots_ptr + (pid_s * batch + x_rows)[:, None] * rows + y_rows[None, :], dots, mask=out_mask)
    if pid_n == 0:
        tl.store(x_sq_ptr + pid_s * batch + x_rows, x_sq, mask=x_mask)
    if COMPUTE_Y_SQ:
        if pid_b == 0:
            tl.store(y_sq_ptr + pid_s * rows + y_rows, y_sq, mask=y_mask)


@triton.jit
def _integer_power(base, exponent):
    """base ** exponent for an integer exponent >= 0 (negative bases allowed)."""
    result = tl.full(base.shape, 1.0, base.dtype)
    for _ in range(exponent):
        result *= base
    return result


@triton.jit
def epilogue_kernel(
    dots_ptr,
    x_sq_ptr,
    y_sq_ptr,
    params_ptr,
    out_partial_ptr,
    alpha_partial_ptr,
    coef_ptr,
    batch,
    rows,
    dim,
    splits,
    y_sq_splits,
    degree,
    KERNEL: tl.constexpr,
    USE_FP64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Kernel, sqrt and backward coefficients of a [BLOCK_B, BLOCK_N] tile of pairs.

    KERNEL: 0 linear, 1 rbf, 2 poly. params: [1/σ², coef0, eps] in the accumulation dtype (a tensor, so
    float64 runs get float64 constants). out_partial, alpha_partial: [N tiles, batch] (already divided by
    N); coef: [batch, rows]. Gradients of clamp_min(0) pass where its input >= 0, like torch's.
    """
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    inv_sigma_sq = tl.load(params_ptr)
    coef0 = tl.load(params_ptr + 1)
    eps = tl.load(params_ptr + 2)
    pid_n, pid_b = tl.program_id(0), tl.program_id(1)
    x_rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    y_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_mask, y_mask = x_rows < batch, y_rows < rows
    mask = x_mask[:, None] & y_mask[None, :]

    dot = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_dtype)
    x_sq = tl.zeros([BLOCK_B], dtype=acc_dtype)
    for s in range(splits):
        dot += tl.load(dots_ptr + (s * batch + x_rows)[:, None] * rows + y_rows[None, :], mask=mask, other=0.0)
        x_sq += tl.load(x_sq_ptr + s * batch + x_rows, mask=x_mask, other=0.0)
    y_sq = tl.zeros([BLOCK_N], dtype=acc_dtype)
    for s in range(y_sq_splits):
        y_sq += tl.load(y_sq_ptr + s * rows + y_rows, mask=y_mask, other=0.0).to(acc_dtype)
    x_sq2, y_sq2 = x_sq[:, None], y_sq[None, :]

    if KERNEL == 0:
        squared = x_sq2 + y_sq2 - 2 * dot
    elif KERNEL == 1:
        sq_dist = x_sq2 + y_sq2 - 2 * dot
        kxy = tl.exp(-tl.maximum(sq_dist, 0.0) * (0.5 * inv_sigma_sq))
        squared = 2.0 - 2 * kxy
    else:
        uxx = x_sq2 / dim + coef0
        uyy = y_sq2 / dim + coef0
        uxy = dot / dim + coef0
        uxx_pow = _integer_power(uxx, degree - 1)
        uxy_pow = _integer_power(uxy, degree - 1)
        squared = uxx_pow * uxx + _integer_power(uyy, degree) - 2 * (uxy_pow * uxy)
    distance = tl.sqrt(tl.maximum(squared, 0.0) + eps)
    inv_distance = tl.where(squared >= 0, 1.0 / distance, 0.0)
    if KERNEL == 0:
        coef = inv_distance
        alpha_term = coef
    elif KERNEL == 1:
        coef = tl.where(sq_dist >= 0, kxy * inv_sigma_sq * inv_distance, 0.0)
        alpha_term = coef
    else:
        scale = inv_distance * degree / dim
        coef = scale * uxy_pow
        alpha_term = scale * uxx_pow

    coef = tl.where(mask, coef / rows, 0.0)
    tl.store(coef_ptr + x_rows[:, None] * rows + y_rows[None, :], coef, mask=mask)
    distance_sum = tl.sum(tl.where(mask, distance, 0.0), axis=1) / rows
    alpha_sum = tl.sum(tl.where(mask, alpha_term, 0.0), axis=1) / rows
    tl.store(out_partial_ptr + pid_n * batch + x_rows, distance_sum, mask=x_mask)
    tl.store(alpha_partial_ptr + pid_n * batch + x_rows, alpha_sum, mask=x_mask)


@triton.jit
def grad_kernel(
    grad_out_ptr,
    x_ptr,
    y_ptr,
    coef_ptr,
    alpha_ptr,
    grad_x_ptr,
    batch,
    rows,
    dim,
    x_stride,
    y_stride,
    USE_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_x[b, d] = g_b · (alpha_b · x[b, d] − Σ_n coef[b, n] · y[n, d]). grad_x: [batch, dim] contiguous."""
    acc_dtype = tl.float64 if USE_FP64 else tl.float32
    pid_d, pid_b = tl.program_id(0), tl.program_id(1)
    x_rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    x_mask = x_rows < batch
    features = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    feature_mask = features < dim
    weighted = tl.zeros([BLOCK_B, BLOCK_D], dtype=acc_dtype)
    for n0 in range(0, rows, BLOCK_N):
        y_rows = n0 + tl.arange(0, BLOCK_N)
        y_mask = y_rows < rows
        c = tl.load(
            coef_ptr + x_rows[:, None] * rows + y_rows[None, :], mask=x_mask[:, None] & y_mask[None, :], other=0.0
        )
        yt = tl.load(
            y_ptr + y_rows.to(tl.int64)[:, None] * y_stride + features[None, :],
            mask=y_mask[:, None] & feature_mask[None, :],
            other=0.0,
        )
        weighted += tl.dot(c.to(acc_dtype), yt.to(acc_dtype), input_precision=PRECISION, out_dtype=acc_dtype)
    g = tl.load(grad_out_ptr + x_rows, mask=x_mask, other=0.0).to(acc_dtype)
    alpha = tl.load(alpha_ptr + x_rows, mask=x_mask, other=0.0).to(acc_dtype)
    io_mask = x_mask[:, None] & feature_mask[None, :]
    xt = tl.load(x_ptr + x_rows.to(tl.int64)[:, None] * x_stride + features[None, :], mask=io_mask, other=0.0)
    grad = g[:, None] * (alpha[:, None] * xt.to(acc_dtype) - weighted)
    out_ptrs = grad_x_ptr + x_rows.to(tl.int64)[:, None] * dim + features[None, :]
    tl.store(out_ptrs, grad.to(grad_x_ptr.dtype.element_ty), mask=io_mask)


def _unit_stride_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def batch_block(batch: int) -> int:
    """Rows of x per tile: tl.dot needs >= 16; up to 64 so y is read once for B <= 64."""
    return min(64, max(16, triton.next_power_of_2(batch)))


def tile_config(x: Tensor, y: Tensor) -> dict:
    """Tiles and dot precision for x, y (also used by the AOT test)."""
    use_fp64 = x.dtype == torch.float64
    return {
        "USE_FP64": use_fp64,
        # (the CPU interpreter's 16-bit tl.dot is wrong: there the tiles are widened, same products)
        "NATIVE_DOT": not use_fp64
        and x.dtype == y.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and not triton_interpreted(),
        "PRECISION": "ieee" if use_fp64 else "tf32x3",
        "BLOCK_B": 16 if use_fp64 else batch_block(x.shape[0]),
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": BLOCK_D,
    }


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def mercer_distance_triton(
    x: Tensor, y: Tensor, y_sqnorm: Tensor | None, kernel: int, sigma: float, degree: int, coef0: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [B, D], y: [N, D] -> (out [B], coef [B, N], alpha [B]) in float32 (float64 for float64 x)."""
    x, y = _unit_stride_rows(x), _unit_stride_rows(y)
    (batch, dim), rows = x.shape, y.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    cfg = tile_config(x, y)
    block_b, block_n, block_d = cfg["BLOCK_B"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    n_tiles, b_tiles, d_tiles = triton.cdiv(rows, block_n), triton.cdiv(batch, block_b), triton.cdiv(dim, block_d)
    splits = max(1, min(d_tiles, triton.cdiv(_target_programs(x.device), n_tiles * b_tiles)))
    split_size = triton.cdiv(d_tiles, splits) * block_d
    splits = triton.cdiv(dim, split_size)

    dots = torch.empty(splits, batch, rows, device=x.device, dtype=acc)
    x_sq = torch.empty(splits, batch, device=x.device, dtype=acc)
    compute_y_sq = y_sqnorm is None
    y_sq = torch.empty(splits, rows, device=x.device, dtype=acc) if compute_y_sq else y_sqnorm.to(acc).contiguous()
    partial_dots_kernel[(n_tiles, splits, b_tiles)](
        x,
        y,
        dots,
        x_sq,
        y_sq,
        batch,
        rows,
        dim,
        x.stride(0),
        y.stride(0),
        split_size,
        COMPUTE_Y_SQ=compute_y_sq,
        num_warps=NUM_WARPS,
        **cfg,
    )
    epilogue_block_n = EPILOGUE_TILE // block_b
    epilogue_tiles = triton.cdiv(rows, epilogue_block_n)
    out_partial = torch.empty(epilogue_tiles, batch, device=x.device, dtype=acc)
    alpha_partial = torch.empty(epilogue_tiles, batch, device=x.device, dtype=acc)
    coef = torch.empty(batch, rows, device=x.device, dtype=acc)
    params = torch.empty(3, device=x.device, dtype=acc)  # fills, not a host copy: CUDA-graph capturable
    for i, value in enumerate((1.0 / sigma**2, coef0, eps)):
        params[i].fill_(value)
    epilogue_kernel[(epilogue_tiles, b_tiles)](
        dots,
        x_sq,
        y_sq,
        params,
        out_partial,
        alpha_partial,
        coef,
        batch,
        rows,
        dim,
        splits,
        splits if compute_y_sq else 1,
        degree,
        KERNEL=kernel,
        USE_FP64=cfg["USE_FP64"],
        BLOCK_B=block_b,
        BLOCK_N=epilogue_block_n,
        num_warps=NUM_WARPS,
    )
    return out_partial.sum(0), coef, alpha_partial.sum(0)


def mercer_distance_backward_triton(grad_out: Tensor, x: Tensor, y: Tensor, coef: Tensor, alpha: Tensor) -> Tensor:
    """grad_out: [B], coef: [B, N], alpha: [B] -> grad_x [B, D] in x's dtype."""
    x, y = _unit_stride_rows(x), _unit_stride_rows(y)
    (batch, dim), rows = x.shape, y.shape[0]
    cfg = tile_config(x, y)
    grad_x = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), triton.cdiv(batch, cfg["BLOCK_B"]))
    grad_kernel[grid](
        grad_out.contiguous(),
        x,
        y,
        coef.contiguous(),
        alpha.contiguous(),
        grad_x,
        batch,
        rows,
        dim,
        x.stride(0),
        y.stride(0),
        USE_FP64=cfg["USE_FP64"],
        PRECISION=cfg["PRECISION"],
        BLOCK_B=cfg["BLOCK_B"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=NUM_WARPS,
    )
    return grad_x
