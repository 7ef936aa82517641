"""Mercer-kernel distance of a batch to a set (DAP's representativeness energy), memory-bounded.

mercer_distance(x [B, D], y [N, D])[b] = (1/N) Σ_n √(max(K(x_b,x_b) + K(y_n,y_n) − 2K(x_b,y_n), 0) + eps)
for the linear, rbf and poly kernels of `fastdd.ops.reference.mercer_kernel`.

Every kernel is a function of three Gram terms only: dot_bn = x_b·y_n, ‖x_b‖² and ‖y_n‖². So the fast
backends make one pass over y for the dots (a [B, N] matmul, fp32 accumulation, y read in blocks or tiles
and widened on load, never a [B, N, D] tensor) and apply the kernel, sqrt and mean over n in a fused
epilogue. The same epilogue stores the backward coefficients

    coef[b, n] = −(1/g_b) ∂L/∂dot_bn,   alpha[b] = (2/g_b) ∂L/∂‖x_b‖²     (g_b = ∂L/∂out_b)

so the x-gradient is one more pass over y:  ∂L/∂x_b = g_b · (alpha_b · x_b − Σ_n coef_bn · y_n).
Every implementation of the op returns these coefficients (the reference: `reference.mercer_coefficients`),
so the op's shapes do not depend on which one runs. The reference itself is differentiated by autograd, as
are second-order gradients (create_graph=True).
y is a constant: no gradient flows to y (pass y.detach(); a y that requires grad is refused).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from ._backend import current_backend, dispatch, extension, register_kernels, register_op
from ._checks import check_nonempty, check_same_device, check_tensor

KERNELS = ("linear", "rbf", "poly")
register_op("mercer_distance", cpu=("cpp", "reference"), cuda=("triton", "reference"))

# cpp backend: features per block; B rows of x (fp32: B · 4 KiB) stay in L2 while every y row passes
CPP_FEATURE_BLOCK = 1024


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _reference(x, y, kernel, sigma, degree, coef0, eps) -> Tensor:
    return reference.mercer_distance(x, y, kernel, sigma=sigma, degree=degree, coef0=coef0, eps=eps)


def _reference_forward(x, y, y_sqnorm, kernel, sigma, degree, coef0, eps):
    coef, alpha = reference.mercer_coefficients(x, y, kernel, sigma=sigma, degree=degree, coef0=coef0, eps=eps)
    return _reference(x, y, kernel, sigma, degree, coef0, eps), coef, alpha


def _cpp_forward(x, y, y_sqnorm, kernel, sigma, degree, coef0, eps):
    extension()
    return torch.ops.fastdd_C.mercer_distance(
        x, y, y_sqnorm, KERNELS.index(kernel), sigma, degree, coef0, eps, CPP_FEATURE_BLOCK
    )


def _triton_forward(x, y, y_sqnorm, kernel, sigma, degree, coef0, eps):
    from .triton.mercer_distance import mercer_distance_triton

    return mercer_distance_triton(x, y, y_sqnorm, KERNELS.index(kernel), sigma, degree, coef0, eps)


def _reference_backward(grad_out, x, y, coef, alpha):
    acc = coef.dtype
    return (grad_out[:, None] * (alpha[:, None] * x.to(acc) - coef @ y.to(acc))).to(x.dtype)


def _cpp_backward(grad_out, x, y, coef, alpha):
    extension()
    return torch.ops.fastdd_C.mercer_distance_backward(grad_out, x, y, coef, alpha, CPP_FEATURE_BLOCK)


def _triton_backward(grad_out, x, y, coef, alpha):
    from .triton.mercer_distance import mercer_distance_backward_triton

    return mercer_distance_backward_triton(grad_out, x, y, coef, alpha)


_FORWARD = {"reference": _reference_forward, "cpp": _cpp_forward, "triton": _triton_forward}
_BACKWARD = {"reference": _reference_backward, "cpp": _cpp_backward, "triton": _triton_backward}


@torch.library.custom_op("fastdd::mercer_distance", mutates_args=())
def _mercer_distance_op(
    x: Tensor, y: Tensor, y_sqnorm: Tensor | None, kernel: str, sigma: float, degree: int, coef0: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out [B], coef [B, N], alpha [B]) in float32 (float64 for float64 x), whichever implementation runs;
    coef / alpha are the backward coefficients (reference.mercer_coefficients). CPU / CUDA kernels below, this
    reference on other devices."""
    return _reference_forward(x, y, y_sqnorm, kernel, sigma, degree, coef0, eps)


@_mercer_distance_op.register_fake
def _(x, y, y_sqnorm, kernel, sigma, degree, coef0, eps):
    acc = _accumulation_dtype(x)
    batch, rows = x.shape[0], y.shape[0]
    return x.new_empty(batch, dtype=acc), x.new_empty(batch, rows, dtype=acc), x.new_empty(batch, dtype=acc)


@torch.library.custom_op("fastdd::mercer_distance_backward", mutates_args=())
def _mercer_distance_backward_op(grad_out: Tensor, x: Tensor, y: Tensor, coef: Tensor, alpha: Tensor) -> Tensor:
    """∂L/∂x [B, D] (x's dtype) = grad_out_b · (alpha_b · x_b − Σ_n coef_bn · y_n). CPU / CUDA kernels below,
    this reference elsewhere."""
    return _reference_backward(grad_out, x, y, coef, alpha)


@_mercer_distance_backward_op.register_fake
def _(grad_out, x, y, coef, alpha):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, y, y_sqnorm, kernel, sigma, degree, coef0, eps = inputs
    _, coef, alpha = output
    ctx.save_for_backward(x, y, coef, alpha)
    ctx.params = (kernel, sigma, degree, coef0, eps)
    ctx.backend = current_backend("mercer_distance", x.device)  # the backward runs the forward's implementation
    ctx.mark_non_differentiable(coef, alpha)


def _backward(ctx, grad_out, grad_coef, grad_alpha):
    x, y, coef, alpha = ctx.saved_tensors
    if ctx.backend == "reference" or torch.is_grad_enabled():
        # the reference's autograd (the backward op's reference kernel serves graphs traced where a fused
        # implementation ran); with create_graph=True this also gives the second-order terms
        with torch.enable_grad():
            x_leaf = x if x.requires_grad else x.detach().requires_grad_(True)
            out = _reference(x_leaf, y.detach(), *ctx.params)
            (grad_x,) = torch.autograd.grad(out, x_leaf, grad_out, create_graph=torch.is_grad_enabled())
    else:
        args = (grad_out.contiguous(), x, y, coef, alpha)
        grad_x = dispatch(_mercer_distance_backward_op, "mercer_distance", ctx.backend, x.device, *args)
    return grad_x, None, None, None, None, None, None, None


_mercer_distance_op.register_autograd(_backward, setup_context=_setup_context)
register_kernels(_mercer_distance_op, "mercer_distance", _FORWARD)
register_kernels(_mercer_distance_backward_op, "mercer_distance", _BACKWARD)


def _check_inputs(x, y, kernel, sigma, degree, coef0, y_sqnorm, eps) -> None:
    """Metadata first; the NaN/Inf checks (a host sync, skipped under capture) last."""
    check_tensor("x", x, ndim=2, finite=False)
    check_tensor("y", y, ndim=2, finite=False)
    if y_sqnorm is not None:
        check_tensor("y_sqnorm", y_sqnorm, ndim=1, finite=False)
    check_same_device(x=x, y=y, y_sqnorm=y_sqnorm)
    check_nonempty("x", x)
    check_nonempty("y", y)
    if x.shape[1] == 0:
        raise ValueError(f"x has no features (shape {tuple(x.shape)})")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} features but y has D={y.shape[1]}")
    if y_sqnorm is not None and y_sqnorm.shape[0] != y.shape[0]:
        raise ValueError(f"y_sqnorm must have shape [{y.shape[0]}] (‖y_n‖² per row of y), got {tuple(y_sqnorm.shape)}")
    if y.requires_grad and torch.is_grad_enabled():
        raise ValueError("y requires grad, but mercer_distance treats y as a constant: pass y.detach()")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if sigma is not None and (
        isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf
    ):
        raise ValueError(f"sigma must be a positive finite number or None, got {sigma!r}")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree!r}")
    if isinstance(coef0, bool) or not isinstance(coef0, (int, float)) or not math.isfinite(coef0):
        raise ValueError(f"coef0 must be a finite number, got {coef0!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(
            f"eps must be a positive finite number (it keeps the gradient finite at zero distance), got {eps!r}"
        )
    for name, t in (("x", x), ("y", y), ("y_sqnorm", y_sqnorm)):
        if t is not None:
            check_tensor(name, t)


def mercer_distance(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    sigma: float | None = None,
    degree: int = 2,
    coef0: float = 1.0,
    y_sqnorm: Tensor | None = None,
    eps: float = 1e-12,
    backend: str = "auto",
) -> Tensor:
    """Mean kernel distance of every x_b to the set y (DAP energy).

    out_b = (1/N) Σ_n √(max(K(x_b,x_b) + K(y_n,y_n) − 2K(x_b,y_n), 0) + eps). Everything accumulates in
    float32 (float64 for float64 x). Differentiable w.r.t. x (finite at zero distance thanks to eps); y is a
    constant.

    Args:
        x: [B, D].
        y: [N, D], on x's device, not requiring grad; may be bfloat16 / float16 (widened on load).
        kernel: "linear" (x·y: the Euclidean distance), "rbf" (exp(−‖x−y‖²/2σ²)) or "poly"
            ((x·y/D + coef0)^degree).
        sigma: rbf σ > 0 (default √D).
        degree: poly degree, an int >= 1.
        coef0: poly coef0, finite.
        y_sqnorm: [N] = ‖y_n‖² (float32), may be passed to save the fast backends a pass; it is trusted, not
            checked against y.
        eps: > 0, added under the square root.
        backend: "auto" (OP_BACKENDS) or an implementation to force.

    Returns:
        [B] distances in the accumulation dtype.

    Raises:
        ValueError: if x, y or y_sqnorm have bad shapes, dtypes, devices or NaN/Inf values, y requires grad, or
            kernel, sigma, degree, coef0 or eps is invalid.
    """
    _check_inputs(x, y, kernel, sigma, degree, coef0, y_sqnorm, eps)
    sigma = reference.default_sigma(x.shape[1]) if sigma is None else float(sigma)
    args = (x, y, y_sqnorm, kernel, sigma, degree, float(coef0), float(eps))
    out, _, _ = dispatch(_mercer_distance_op, "mercer_distance", backend, x.device, *args)
    return out
