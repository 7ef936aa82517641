"""mercer_distance on every backend available here against the PyTorch reference (fastdd.ops.reference).

Values and x-gradients for the linear, rbf and poly kernels, float32 / bfloat16 / float64, zero-distance rows,
feature-block and tile boundaries; gradcheck; torch.compile(fullgraph=True); bad inputs. Triton runs in its CPU
interpreter here and is compiled ahead of time for sm_80 / sm_90 in a subprocess.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from backends import cpu_backend_params  # noqa: E402

from fastdd import ops  # noqa: E402
from fastdd.ops import mercer, reference  # noqa: E402
from fastdd.ops._backend import compiled_kernel  # noqa: E402

KERNELS = ("linear", "rbf", "poly")


BACKENDS = cpu_backend_params(("mercer_distance", "mercer_distance_backward"), "mercer_distance", "mercer_distance")
FAST_BACKENDS = [p for p in BACKENDS if p.values[0] != "reference"]
# (B, N, D): ragged against the C++ groups (4 rows) and feature blocks (16 here) and the Triton tiles
# (16-64 x rows, 32 y rows, 32 features, split over D into several partial sums)
SHAPES = [(3, 37, 50), (1, 5, 16), (17, 70, 129), (70, 9, 40)]
PARAMS = {"linear": {}, "rbf": {"sigma": 4.0}, "poly": {"degree": 3, "coef0": 0.5}}


@pytest.fixture(autouse=True)
def small_cpp_blocks(monkeypatch):
    """The C++ backend walks the features in blocks of 16 here, so every shape crosses block boundaries."""
    monkeypatch.setattr(mercer, "CPP_FEATURE_BLOCK", 16)


def _inputs(batch, rows, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    y = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _value_and_grad(fn, x, seed=1):
    """(fn(x), ∂ Σ_b w_b fn(x)_b / ∂x) with fixed random weights w (so every row's grad_out differs)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


def _assert_grad_close(grad, expected, rtol):
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_with_gradients(backend, kernel, shape):
    x, y = _inputs(*shape)
    params = PARAMS[kernel]
    out, grad = _value_and_grad(lambda v: ops.mercer_distance(v, y, kernel, backend=backend, **params), x)
    ref, ref_grad = _value_and_grad(lambda v: reference.mercer_distance(v, y, kernel, **params), x)
    assert out.shape == (shape[0],) and out.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    _assert_grad_close(grad, ref_grad, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_float64_matches_reference_tightly(backend, kernel):
    x, y = _inputs(4, 35, 40, dtype=torch.float64, seed=2)
    out, grad = _value_and_grad(lambda v: ops.mercer_distance(v, y, kernel, backend=backend, **PARAMS[kernel]), x)
    ref, ref_grad = _value_and_grad(lambda v: reference.mercer_distance(v, y, kernel, **PARAMS[kernel]), x)
    assert out.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    _assert_grad_close(grad, ref_grad, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_y_accumulates_in_float32(backend, kernel):
    """A bfloat16 y (float32 or bfloat16 x) gives the float32 result on the same (rounded) values."""
    x, y = _inputs(5, 40, 70, seed=3)
    y16 = y.bfloat16()
    for x_in in (x, x.bfloat16()):
        out, grad = _value_and_grad(
            lambda v: ops.mercer_distance(v, y16, kernel, backend=backend, **PARAMS[kernel]), x_in
        )
        exact = lambda v: reference.mercer_distance(v.float(), y16.float(), kernel, **PARAMS[kernel])  # noqa: E731
        ref, ref_grad = _value_and_grad(exact, x_in)
        assert out.dtype == torch.float32 and grad.dtype == x_in.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        if x_in.dtype == torch.bfloat16:  # both gradients are rounded to bfloat16 at the end
            _assert_grad_close(grad.float(), ref_grad.float(), rtol=1e-2)
        else:
            _assert_grad_close(grad, ref_grad, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_distance_rows_have_finite_gradients(backend, kernel):
    """x rows equal to rows of y: the gradient stays finite (eps inside the sqrt) and matches the reference."""
    x, y = _inputs(4, 20, 24, dtype=torch.float64, seed=4)
    x[0], x[2] = y[3], y[17]
    fn = lambda v: ops.mercer_distance(v, y, kernel, backend=backend, **PARAMS[kernel])  # noqa: E731
    out, grad = _value_and_grad(fn, x)
    ref, ref_grad = _value_and_grad(lambda v: reference.mercer_distance(v, y, kernel, **PARAMS[kernel]), x)
    # at zero distance the sqrt turns the rounding δ of ‖x‖² + ‖y‖² − 2x·y (which depends on the summation
    # order) into √δ: ≈ 1e-7 per pair in float64, ≈ 1e-3 in float32
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-8)
    _assert_grad_close(grad, ref_grad, rtol=1e-8)
    out32, grad32 = _value_and_grad(
        lambda v: ops.mercer_distance(v, y.float(), kernel, backend=backend, **PARAMS[kernel]), x.float()
    )
    assert torch.isfinite(grad32).all() and torch.isfinite(out32).all()
    torch.testing.assert_close(out32, ref.float(), rtol=1e-4, atol=1e-3)
    _assert_grad_close(grad32[[1, 3]], ref_grad.float()[[1, 3]], rtol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_y_sqnorm_is_a_cache(backend):
    x, y = _inputs(3, 21, 33, seed=5)
    y16 = y.bfloat16()
    y_sqnorm = (y16.float() ** 2).sum(1)
    for kernel in KERNELS:
        with_cache = ops.mercer_distance(x, y16, kernel, y_sqnorm=y_sqnorm, backend=backend)
        torch.testing.assert_close(
            with_cache, ops.mercer_distance(x, y16, kernel, backend=backend), rtol=1e-6, atol=1e-6
        )
    # the fast backends read it instead of recomputing ‖y_n‖² (so a wrong cache shows)
    shifted = ops.mercer_distance(x, y16, "linear", y_sqnorm=y_sqnorm + 10, backend=backend)
    assert (shifted > ops.mercer_distance(x, y16, "linear", backend=backend)).all()


def test_default_sigma_and_linear_is_euclidean():
    x, y = _inputs(3, 6, 10, dtype=torch.float64, seed=6)
    torch.testing.assert_close(ops.mercer_distance(x, y, "linear", eps=1e-30), torch.cdist(x, y).mean(1))
    torch.testing.assert_close(
        ops.mercer_distance(x, y, "rbf"), ops.mercer_distance(x, y, "rbf", sigma=reference.default_sigma(10))
    )


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("kernel", KERNELS)
def test_reference_gradcheck_float64(kernel):
    x, y = _inputs(3, 5, 6, dtype=torch.float64, seed=7)
    x.requires_grad_(True)
    params = {"linear": {}, "rbf": {"sigma": 2.0}, "poly": {"degree": 3, "coef0": 0.5}}[kernel]
    assert torch.autograd.gradcheck(lambda v: reference.mercer_distance(v, y, kernel, **params), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_gradcheck_float64_and_second_order_through_the_reference(backend):
    x, y = _inputs(2, 5, 6, dtype=torch.float64, seed=8)
    x.requires_grad_(True)
    for kernel in KERNELS:
        fn = lambda v, k=kernel: ops.mercer_distance(v, y, k, backend=backend, **PARAMS[k])  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
    fn = lambda v: ops.mercer_distance(v, y, "rbf", sigma=2.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))


# --------------------------------------------------------------------------- custom ops, compile and validation
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck_and_agree_on_the_coefficients(backend):
    """Schema and fake kernels of both ops; every implementation returns the reference's backward coefficients."""
    from fastdd.ops._backend import forced_backend

    x, y = _inputs(3, 7, 10, seed=10)
    checks = ("test_schema", "test_faketensor")
    for kernel, params in PARAMS.items():
        args = (x, y, None, kernel, params.get("sigma", 1.0), params.get("degree", 2), params.get("coef0", 1.0), 1e-12)
        with forced_backend("mercer_distance", backend):
            torch.library.opcheck(mercer._mercer_distance_op, args, test_utils=checks)
            _, coef, alpha = mercer._mercer_distance_op(*args)
            backward_args = (torch.rand(3), x, y, coef, alpha)
            torch.library.opcheck(mercer._mercer_distance_backward_op, backward_args, test_utils=checks)
        ref_coef, ref_alpha = reference.mercer_coefficients(x, y, kernel, **params)
        torch.testing.assert_close(coef, ref_coef, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_forward_and_backward():
    backend = "cpp" if compiled_kernel("mercer_distance", "CPU") else "reference"
    x, y = _inputs(3, 40, 20, seed=9)
    y16 = y.bfloat16()

    def energy(v):
        return (
            ops.mercer_distance(v, y16, "rbf", backend=backend).sum()
            + ops.mercer_distance(v, y16, backend=backend).sum()
        )

    compiled = torch.compile(energy, fullgraph=True)
    out, grad = _value_and_grad(compiled, x)
    ref, ref_grad = _value_and_grad(energy, x)
    torch.testing.assert_close(out, ref)
    _assert_grad_close(grad, ref_grad, rtol=1e-5)


def test_bad_inputs_name_the_argument():
    x, y = _inputs(2, 4, 6)
    cases = [
        ("x", lambda: ops.mercer_distance(x[0], y)),
        ("y", lambda: ops.mercer_distance(x, y[0])),
        ("x", lambda: ops.mercer_distance(x.int(), y)),
        ("features", lambda: ops.mercer_distance(x[:, :5], y)),
        ("y", lambda: ops.mercer_distance(x, y[:0])),
        ("x", lambda: ops.mercer_distance(x[:0], y)),
        ("x", lambda: ops.mercer_distance(torch.full_like(x, float("nan")), y)),
        ("y", lambda: ops.mercer_distance(x, torch.full_like(y, float("inf")))),
        ("kernel", lambda: ops.mercer_distance(x, y, "laplace")),
        ("sigma", lambda: ops.mercer_distance(x, y, "rbf", sigma=0.0)),
        ("sigma", lambda: ops.mercer_distance(x, y, "rbf", sigma=-1.0)),
        ("degree", lambda: ops.mercer_distance(x, y, "poly", degree=0)),
        ("degree", lambda: ops.mercer_distance(x, y, "poly", degree=2.5)),
        ("eps", lambda: ops.mercer_distance(x, y, eps=-1e-3)),
        ("y_sqnorm", lambda: ops.mercer_distance(x, y, y_sqnorm=torch.ones(5))),
        ("y_sqnorm", lambda: ops.mercer_distance(x, y, y_sqnorm=torch.ones(4, 1))),
        ("y", lambda: ops.mercer_distance(x, y.requires_grad_(True))),
        ("y", lambda: ops.mercer_distance(x, y.to("meta"))),
        ("backend", lambda: ops.mercer_distance(x, y, backend="cuda")),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()
        y.requires_grad_(False)


def test_triton_kernels_compile_for_sm80_and_sm90_without_spills():
    """The largest tiles (64 rows of x) of every dtype combination, and the epilogue of every kernel."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import warnings
        warnings.filterwarnings("ignore")
        from triton_aot import ARCHS, assert_fits, compile_for_gpu
        from fastdd.ops.triton import mercer_distance as K

        ints = {n: "i32" for n in ("batch", "rows", "dim", "x_stride", "y_stride")}
        for arch in ARCHS:
            # x dtype, y dtype, tensor-core inputs as loaded (16-bit x and y), float64
            for xt, yt, native, fp64 in (("fp32", "bf16", False, False), ("fp32", "fp32", False, False),
                                         ("bf16", "bf16", True, False), ("fp64", "fp64", False, True)):
                acc = "fp64" if fp64 else "fp32"
                tiles = {"USE_FP64": fp64, "PRECISION": "ieee" if fp64 else "tf32x3", "BLOCK_B": 16 if fp64 else 64,
                         "BLOCK_N": K.BLOCK_N, "BLOCK_D": K.BLOCK_D}
                dots = compile_for_gpu(
                    K.partial_dots_kernel,
                    {"x_ptr": f"*{xt}", "y_ptr": f"*{yt}", "dots_ptr": f"*{acc}", "x_sq_ptr": f"*{acc}",
                     "y_sq_ptr": f"*{acc}", **ints, "split_size": "i32"},
                    {**tiles, "COMPUTE_Y_SQ": True, "NATIVE_DOT": native}, arch, num_warps=K.NUM_WARPS)
                grad = compile_for_gpu(
                    K.grad_kernel,
                    {"grad_out_ptr": f"*{acc}", "x_ptr": f"*{xt}", "y_ptr": f"*{yt}", "coef_ptr": f"*{acc}",
                     "alpha_ptr": f"*{acc}", "grad_x_ptr": f"*{xt}", **ints},
                    tiles, arch, num_warps=K.NUM_WARPS)
                for res in (dots, grad):
                    assert_fits(res)
                    print(xt, yt, res)
            for kernel, fp64 in ((0, False), (1, False), (2, False), (2, True)):
                acc = "fp64" if fp64 else "fp32"
                block_b = 16 if fp64 else 64
                pointers = ("dots", "x_sq", "y_sq", "params", "out_partial", "alpha_partial", "coef")
                res = compile_for_gpu(
                    K.epilogue_kernel,
                    {**{f"{p}_ptr": f"*{acc}" for p in pointers},
                     **{n: "i32" for n in ("batch", "rows", "dim", "splits", "y_sq_splits", "degree")}},
                    {"KERNEL": kernel, "USE_FP64": fp64, "BLOCK_B": block_b, "BLOCK_N": K.EPILOGUE_TILE // block_b},
                    arch, num_warps=K.NUM_WARPS)
                assert_fits(res)
                print("epilogue", kernel, res)
        """
    )
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("KernelResources") == 2 * (4 * 2 + 4)
