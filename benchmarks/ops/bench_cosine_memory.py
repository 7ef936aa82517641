"""Benchmark of the cosine-memory ops (IGD / SAM memories) against what a user writes with torch, written well.

- max_cosine(query [B, D], memory [M, D]) -> (max cosine, argmax) per query. Baselines:
  F.cosine_similarity over the broadcast [B, M, D] + max, and F.normalize of both + one matmul + max (the strong one).
- most_similar_index(memory [M, D]) -> argmax_i Σ_j cos(m_i, m_j) (SAM's pop rule). Baselines: the M×M cosine
  matrix (normalise, matmul, row sums, argmax) and the O(M·D) form a careful user writes: normalise, U @ U.sum(0),
  argmax.
Every baseline is checked against fastdd (values to 1e-5, same indices) before it is timed. Work by formula:
max_cosine 2·B·M·D FLOPs and one read of memory + queries; most_similar_index 4·M·D FLOPs and one read of memory
(two for any method that normalises first: the floor is one). Sweep over B, M and D (D = 4096: an SD latent).
Timed with fastdd.ops.value_checks(False) (as in a sampling loop): the baselines check nothing either.

Run: python benchmarks/ops/bench_cosine_memory.py [--device cuda] [--repeats 20] [--quick] [--allow-reference]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: fastdd as installed, then this repository's benchmarks/ first
    with contextlib.suppress(ImportError):  # (a pip package may ship a top-level "benchmarks" too)
        import fastdd  # noqa: F401
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import auto_backend, op_benchmark_main, time_methods  # noqa: E402
from fastdd.ops import max_cosine, most_similar_index, value_checks  # noqa: E402
from fastdd.ops.cosine_memory import CPU_MATMUL_QUERIES  # noqa: E402
from fastdd.ops.reference import COS_EPS  # noqa: E402

OPS = ["max_cosine", "most_similar_index"]
MAX_COSINE_SHAPES = [(1, 64, 4096), (16, 64, 4096), (16, 1024, 4096), (128, 1024, 4096), (16, 4096, 4096)]
MOST_SIMILAR_SHAPES = [(64, 4096), (1024, 4096), (4096, 4096)]
QUICK = {"max_cosine": [(2, 8, 32)], "most_similar_index": [(8, 32)]}


def max_cosine_methods(query, memory) -> dict:
    count = torch.tensor(memory.shape[0], device=memory.device)
    auto = auto_backend("max_cosine", memory.device)
    if memory.device.type == "cpu" and query.shape[0] > CPU_MATMUL_QUERIES:
        auto = "reference"  # one matmul for many queries (fastdd.ops.cosine_memory.CPU_MATMUL_QUERIES)
    found = {
        f"fastdd max_cosine (auto: {auto})": (
            "fastdd",
            lambda: max_cosine(query, memory, count),
        ),
        "F.cosine_similarity [B,M,D] + max": (
            "baseline",
            lambda: F.cosine_similarity(query[:, None], memory[None], dim=-1, eps=COS_EPS).max(dim=1),
        ),
        "normalize + matmul + max": (
            "baseline",
            lambda: (F.normalize(query, dim=1, eps=COS_EPS) @ F.normalize(memory, dim=1, eps=COS_EPS).T).max(dim=1),
        ),
    }
    if query.shape[0] * memory.shape[0] > 20_000:  # the [B, M, D] broadcast takes seconds there: 70-100x slower
        del found["F.cosine_similarity [B,M,D] + max"]
    return found


def most_similar_methods(memory) -> dict:
    count = torch.tensor(memory.shape[0], device=memory.device)

    def matrix():
        unit = F.normalize(memory, dim=1, eps=COS_EPS)
        return (unit @ unit.T).sum(1).argmax()

    def linear():
        unit = F.normalize(memory, dim=1, eps=COS_EPS)
        return (unit @ unit.sum(0)).argmax()

    return {
        f"fastdd most_similar_index (auto: {auto_backend('most_similar_index', memory.device)})": (
            "fastdd",
            lambda: most_similar_index(memory, count),
        ),
        "M×M cosine matrix + argmax": ("baseline", matrix),
        "normalize, U @ U.sum(0), argmax": ("baseline", linear),
    }


def check(methods: dict) -> None:
    """Every method gives fastdd's result (values to 1e-5 and the same indices)."""
    expected = methods[next(iter(methods))][1]()
    for name, (_, fn) in methods.items():
        got = fn()
        if isinstance(expected, tuple):
            assert torch.allclose(got[0], expected[0], atol=1e-5), f"{name}: values differ"
            assert torch.equal(got[1], expected[1]), f"{name}: indices differ"
        else:
            assert int(got) == int(expected), f"{name}: index {int(got)} != {int(expected)}"


def cases(quick: bool, device: torch.device | str = "cpu"):
    """(op, shape label, methods, flops, bytes) per swept shape."""
    torch.manual_seed(0)
    for batch, rows, dim in QUICK["max_cosine"] if quick else MAX_COSINE_SHAPES:
        query, memory = torch.randn(batch, dim, device=device), torch.randn(rows, dim, device=device)
        yield (
            "max_cosine",
            f"B={batch} M={rows} D={dim}",
            max_cosine_methods(query, memory),
            2.0 * batch * rows * dim,
            4.0 * (rows + batch) * dim,
        )
    for rows, dim in QUICK["most_similar_index"] if quick else MOST_SIMILAR_SHAPES:
        memory = torch.randn(rows, dim, device=device)
        yield (
            "most_similar_index",
            f"M={rows} D={dim}",
            most_similar_methods(memory),
            4.0 * rows * dim,
            4.0 * rows * dim,
        )


def run(device: torch.device, repeats: int, quick: bool) -> tuple[list[dict], str]:
    records = []
    with value_checks(False):  # the NaN/Inf input checks read every element and sync; hot loops switch them off
        for op, shape, methods, flops, bytes_moved in cases(quick, device):
            check(methods)
            records += time_methods(op, shape, methods, device, max(repeats, 10), flops, bytes_moved)
    return records, NOTES


NOTES = """
Both ops are memory-bound at these sizes (a few FLOPs per byte): % of roofline is against the copy bandwidth
measured in the same run. CosineMemory.add is made of these ops and is not timed separately.
"""


def main() -> None:
    op_benchmark_main(run, "cosine_memory", __doc__, OPS)


if __name__ == "__main__":
    main()
