"""Benchmark of the cosine-memory ops and CosineMemory against what a user would otherwise write.

- max_cosine (IGD: B = 1 noisy latent, SAM: B = 16; memory M = 64 rows of D = 4096) vs
  F.cosine_similarity over [B, M] + max.
- most_similar_index (M = 64, D = 4096) vs the full M×M cosine matrix (normalise, matmul) + row-sum argmax.
- one add to a full memory: CosineMemory (FIFO, most_similar with its running sum) vs a Python list
  that appends, stacks and, for SAM, recomputes the M×M matrix to pop.
Ops are timed with fastdd.ops.value_checks(False) (as in a sampling loop): the baselines check nothing either.

Run: PYTHONPATH=. python -m benchmarks.ops.bench_cosine_memory [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, run_op_benchmark, timeit
from fastdd.ops import CosineMemory, max_cosine, most_similar_index, value_checks
from fastdd.ops._backend import OP_BACKENDS, backend_usable
from fastdd.ops.reference import COS_EPS

MEMORY_ROWS, DIM = 64, 4096


def _fast_backends(op: str, device: torch.device) -> list[str]:
    names = OP_BACKENDS[op][device.type] if device.type in OP_BACKENDS[op] else ("reference",)
    return [b for b in names if backend_usable(b, device, op)]


def _record(op, backend, shape, seconds, device):
    return {"op": op, "backend": backend, "shape": shape, "median_ms": seconds * 1e3, "device": device_name(device)}


def _bench_max_cosine(device, repeats):
    records = []
    for batch in (1, 16):
        query = torch.randn(batch, DIM, device=device)
        memory = torch.randn(MEMORY_ROWS, DIM, device=device)
        count = torch.tensor(MEMORY_ROWS, device=device)
        shape = f"B={batch} M={MEMORY_ROWS} D={DIM}"
        for backend in _fast_backends("max_cosine", device):
            fn = lambda b=backend, q=query, m=memory, n=count: max_cosine(q, m, n, backend=b)  # noqa: E731
            records.append(_record("max_cosine", backend, shape, timeit(fn, device, repeats), device))
        baseline = lambda q=query, m=memory: F.cosine_similarity(q[:, None], m[None], dim=-1, eps=COS_EPS).max(dim=1)  # noqa: E731
        records.append(
            _record("max_cosine", "F.cosine_similarity+max", shape, timeit(baseline, device, repeats), device)
        )
    return records


def _bench_most_similar_index(device, repeats):
    records = []
    memory = torch.randn(MEMORY_ROWS, DIM, device=device)
    count = torch.tensor(MEMORY_ROWS, device=device)
    shape = f"M={MEMORY_ROWS} D={DIM}"
    for backend in _fast_backends("most_similar_index", device):
        fn = lambda b=backend: most_similar_index(memory, count, backend=b)  # noqa: E731
        records.append(_record("most_similar_index", backend, shape, timeit(fn, device, repeats), device))
    matrix = lambda: _cosine_matrix(memory).sum(1).argmax()  # noqa: E731
    records.append(_record("most_similar_index", "M×M cosine matrix", shape, timeit(matrix, device, repeats), device))
    return records


def _cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """[M, M] cosine similarities the plain way (normalise, matmul): O(M²·D)."""
    unit = F.normalize(rows, dim=1, eps=COS_EPS)
    return unit @ unit.T


def _list_memory_add(rows: list, z: torch.Tensor, policy: str) -> None:
    """What the authors' code does: a list of rows, stacked to decide which one to pop."""
    rows.append(z)
    while len(rows) > MEMORY_ROWS:
        if policy == "fifo":
            rows.pop(0)
        else:
            rows.pop(int(_cosine_matrix(torch.stack(rows)).sum(1).argmax()))
    torch.stack(rows)  # the memory is used as a tensor afterwards


def _bench_add(device, repeats):
    records = []
    shape = f"capacity={MEMORY_ROWS} D={DIM}"
    new_rows = torch.randn(MEMORY_ROWS, DIM, device=device)
    for policy in ("fifo", "most_similar"):
        memory = CosineMemory(MEMORY_ROWS, DIM, policy=policy, device=device)
        memory.add(torch.randn(MEMORY_ROWS, DIM, device=device))
        rows = list(torch.randn(MEMORY_ROWS, DIM, device=device).unbind(0))
        step = iter(range(10**9))
        add = lambda m=memory, s=step: m.add(new_rows[next(s) % MEMORY_ROWS])  # noqa: E731
        list_add = lambda r=rows, s=step, p=policy: _list_memory_add(r, new_rows[next(s) % MEMORY_ROWS], p)  # noqa: E731
        records.append(_record(f"add ({policy}, full)", "CosineMemory", shape, timeit(add, device, repeats), device))
        records.append(
            _record(f"add ({policy}, full)", "Python list", shape, timeit(list_add, device, repeats), device)
        )
    return records


def run(device: torch.device | str = "cpu", repeats: int = 20) -> list[dict]:
    device = torch.device(device)
    torch.manual_seed(0)
    # the NaN/Inf input checks read every element and sync with the host; hot loops switch them off
    with value_checks(False):
        return (
            _bench_max_cosine(device, repeats)
            + _bench_most_similar_index(device, repeats)
            + _bench_add(device, repeats)
        )


def main() -> None:
    run_op_benchmark(run, "cosine_memory", __doc__.splitlines()[0], repeats=20)


if __name__ == "__main__":
    main()
