"""Benchmark of mercer_distance (DAP's energy: mean distance of each x to the set y) against what a user writes with
torch, written well.

Linear kernel (Euclidean distance), out_b = mean_n ‖x_b − y_n‖. Baselines: torch.cdist(x, y).mean(1) (it uses the
matmul expansion for these sizes) and the expansion by hand, (‖x‖² + ‖y‖² − 2·x·yᵀ).clamp(0).sqrt().mean(1), both
forward and forward + x-gradient (autograd). One x @ y.T of the same shape is timed too (kind "floor": the matmul
any method must do; not a baseline). y in float32, and in bfloat16 at one shape (the baselines get y widened to
float32 beforehand, not timed). Every baseline is checked against fastdd (relative 1e-4) before it is timed. Work
by formula: 2·B·N·D FLOPs (forward; ×2 with the x-gradient) and one read of y (+ x).
Timed with fastdd.ops.value_checks(False) (as in a sampling loop): the baselines check nothing either.

Run: python benchmarks/ops/bench_mercer_distance.py [--device cuda] [--repeats 10] [--quick] [--allow-reference]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: fastdd as installed, then this repository's benchmarks/ first
    with contextlib.suppress(ImportError):  # (a pip package may ship a top-level "benchmarks" too)
        import fastdd  # noqa: F401
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import auto_backend, op_benchmark_main, time_methods  # noqa: E402
from fastdd.ops import mercer_distance, value_checks  # noqa: E402

OPS = ["mercer_distance"]
# (B, N, D, y dtype)
SHAPES = [
    (8, 512, 4096, torch.float32),
    (8, 512, 16384, torch.float32),
    (8, 512, 16384, torch.bfloat16),
    (16, 2048, 16384, torch.float32),
]
QUICK_SHAPES = [(3, 16, 64, torch.float32), (3, 16, 64, torch.bfloat16)]


def expansion(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_n ‖x_b − y_n‖ by the matmul expansion, written by hand."""
    sq = (x.square().sum(1, keepdim=True) + y.square().sum(1) - 2 * x @ y.T).clamp_min(0)
    return sq.sqrt().mean(1)


def _with_grad(fn, x: torch.Tensor):
    def step():
        leaf = x.detach().requires_grad_(True)
        out = fn(leaf)
        return out.detach(), torch.autograd.grad(out.sum(), leaf)[0]

    return step


def methods_for(x: torch.Tensor, y: torch.Tensor, with_grad: bool) -> dict:
    y_wide = y.float()
    auto = f"fastdd mercer_distance (auto: {auto_backend('mercer_distance', x.device)})"
    found = {
        auto: ("fastdd", lambda v: mercer_distance(v, y)),
        "torch.cdist(x, y).mean(1)": ("baseline", lambda v: torch.cdist(v, y_wide).mean(1)),
        "(‖x‖²+‖y‖²−2x·yᵀ).sqrt().mean(1)": ("baseline", lambda v: expansion(v, y_wide)),
    }
    if with_grad:
        return {name: (kind, _with_grad(fn, x)) for name, (kind, fn) in found.items()}
    found = {name: (kind, lambda f=fn: f(x)) for name, (kind, fn) in found.items()}
    found["x @ y.T alone (fp32)"] = ("floor", lambda: x @ y_wide.T)
    return found


def check(methods: dict) -> None:
    """Every baseline gives fastdd's distances (and x-gradient) to a relative 1e-4."""
    expected = methods[next(iter(methods))][1]()
    for name, (kind, fn) in methods.items():
        if kind == "floor":
            continue
        got = fn()
        for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(got, tuple) else (expected,)):
            error = (a - b).abs().max()
            assert error <= 1e-4 * b.abs().max(), f"{name}: differs by {error:.3g}"


def cases(quick: bool, device: torch.device | str = "cpu"):
    torch.manual_seed(0)
    for batch, rows, dim, dtype in QUICK_SHAPES if quick else SHAPES:
        x = torch.randn(batch, dim, device=device)
        y = torch.randn(rows, dim, device=device).to(dtype)
        shape = f"B={batch} N={rows} D={dim} y={str(dtype).removeprefix('torch.')}"
        flops, bytes_moved = 2.0 * batch * rows * dim, (rows * y.element_size() + batch * 4) * dim
        yield "mercer_distance (forward)", shape, methods_for(x, y, False), flops, bytes_moved
        yield "mercer_distance + x-gradient", shape, methods_for(x, y, True), 2 * flops, bytes_moved * 2


def run(device: torch.device, repeats: int, quick: bool) -> tuple[list[dict], str]:
    records = []
    with value_checks(False):
        for op, shape, methods, flops, bytes_moved in cases(quick, device):
            check(methods)
            records += time_methods(op, shape, methods, device, repeats, flops, bytes_moved)
    return records, NOTES


NOTES = """
At these sizes the op is one matmul-shaped pass over y: % of roofline is against the larger of the matmul-peak and
copy-bandwidth times. "floor" rows (one x @ y.T) show what the matmul alone costs; fastdd's ratio to it is in the
full table (fastdd_speedup < 1 means fastdd takes longer than the bare matmul).
"""


def main() -> None:
    op_benchmark_main(run, "mercer_distance", __doc__, OPS)


if __name__ == "__main__":
    main()
