"""Benchmark of mercer_distance (DAP energy) against what a user would otherwise write.

Forward: every fastdd backend usable here vs `torch.cdist(x, y).mean(1)` (linear kernel = Euclidean
distance) and vs ONE x·yᵀ matmul of the same shape (the issue's target: within 1.3× of it); the fast
backend also with a cached y_sqnorm (DAP's real features are fixed, so ‖y_n‖² can be computed once) and
with the rbf and poly kernels. Forward + x-gradient: fastdd vs cdist + autograd. y in float32 and bfloat16 (for
bfloat16 y, cdist and the matmul get y widened to float32 beforehand, i.e. not timed; the matmul is also
timed in bfloat16 as is).
CPU: B = 8, N = 512, D = 16384. CUDA: B = 16, N = 2048, D = 256·1152 (a DiT-XL/2 block output).
Timed with fastdd.ops.value_checks(False) (as in a sampling loop): the baselines check nothing either.

Run: PYTHONPATH=. python -m benchmarks.ops.bench_mercer_distance [--device cuda] [--repeats 10]
"""

from __future__ import annotations

import torch

from benchmarks.common import device_name, run_op_benchmark, timeit
from fastdd.ops import mercer_distance, value_checks
from fastdd.ops._backend import OP_BACKENDS, backend_usable

SHAPES = {"cpu": (8, 512, 16384), "cuda": (16, 2048, 256 * 1152)}


def _backends(device: torch.device) -> list[str]:
    names = OP_BACKENDS["mercer_distance"].get(device.type, ("reference",))
    return [b for b in names if backend_usable(b, device, "mercer_distance")]


def _forward_backward(fn, x: torch.Tensor):
    def step():
        leaf = x.detach().requires_grad_(True)
        torch.autograd.grad(fn(leaf).sum(), leaf)

    return step


def _bench_dtype(device: torch.device, y_dtype: torch.dtype, repeats: int) -> list[dict]:
    batch, rows, dim = SHAPES[device.type]
    x = torch.randn(batch, dim, device=device)
    y = torch.randn(rows, dim, device=device).to(y_dtype)
    y_wide = y.float()
    shape = f"B={batch} N={rows} D={dim} y={str(y_dtype).removeprefix('torch.')}"
    records = []

    def record(what, backend, fn):
        seconds = timeit(fn, device, repeats)
        records.append(
            {
                "op": f"mercer_distance {what}",
                "backend": backend,
                "shape": shape,
                "median_ms": seconds * 1e3,
                "device": device_name(device),
            }
        )

    record("matmul baseline", "x @ y.T (float32)", lambda: x @ y_wide.T)
    if y_dtype != torch.float32:
        x_low = x.to(y_dtype)
        record("matmul baseline", f"x @ y.T ({str(y_dtype).removeprefix('torch.')})", lambda: x_low @ y.T)
    record("linear", "torch.cdist(x, y).mean(1)", lambda: torch.cdist(x, y_wide).mean(1))
    backends = _backends(device)
    for backend in backends:
        record("linear", backend, lambda b=backend: mercer_distance(x, y, backend=b))
    y_sqnorm = (y_wide**2).sum(1)
    record(
        "linear, y_sqnorm cached", backends[0], lambda: mercer_distance(x, y, y_sqnorm=y_sqnorm, backend=backends[0])
    )
    for kernel in ("rbf", "poly"):
        record(kernel, backends[0], lambda k=kernel: mercer_distance(x, y, k, backend=backends[0]))
    record("linear fwd+grad", "torch.cdist + autograd", _forward_backward(lambda v: torch.cdist(v, y_wide).mean(1), x))
    for backend in backends:
        record("linear fwd+grad", backend, _forward_backward(lambda v, b=backend: mercer_distance(v, y, backend=b), x))

    matmul_ms = records[0]["median_ms"]
    for r in records:
        r["vs_fp32_matmul"] = r["median_ms"] / matmul_ms
    return records


def run(device: torch.device | str = "cpu", repeats: int = 10) -> list[dict]:
    device = torch.device(device)
    torch.manual_seed(0)
    with value_checks(False):
        return _bench_dtype(device, torch.float32, repeats) + _bench_dtype(device, torch.bfloat16, repeats)


def main() -> None:
    run_op_benchmark(run, "mercer_distance", __doc__.splitlines()[0], repeats=10)


if __name__ == "__main__":
    main()
