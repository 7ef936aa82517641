"""Benchmark of D3HR group sampling against the way the D3HR code does it.

- group_sampling (draw n_candidates groups of IPC = 10 latents of D = 4096, score, keep the best):
  every fastdd backend here vs "D3HR batched": one torch.normal of [n_candidates, ipc, D] and vectorised
  torch scoring (mean / std over members, skewness per member), then argmin.
  CPU: n_candidates = 1000; CUDA: 10,000 (the D3HR batch).
- group_score alone (scoring given candidates, no drawing): fastdd backends vs the vectorised torch score.
Records carry the time per candidate too. Inputs are checked once up front (value_checks(False) while timing).

Run: PYTHONPATH=. python -m benchmarks.ops.bench_group_sampling [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import torch

from benchmarks.common import device_name, run_op_benchmark, timeit
from fastdd.ops import group_sampling, value_checks
from fastdd.ops._backend import OP_BACKENDS, backend_usable
from fastdd.ops.group_sampling import group_score

IPC, DIM = 10, 4096
CANDIDATES = {"cpu": 1000, "cuda": 10_000}


def _backends(op: str, device: torch.device) -> list[str]:
    names = OP_BACKENDS[op].get(device.type, ("reference",))
    return [b for b in names if backend_usable(b, device, op)]


def _record(op, backend, n_candidates, seconds, device):
    return {
        "op": op,
        "backend": backend,
        "shape": f"ipc={IPC} D={DIM} candidates={n_candidates}",
        "median_ms": seconds * 1e3,
        "us_per_candidate": seconds * 1e6 / n_candidates,
        "device": device_name(device),
    }


def d3hr_score(groups: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The plain vectorised torch score over [G, ipc, D] candidates -> [G]."""
    n = groups.shape[-1]
    member_mean = groups.mean(-1, keepdim=True)
    member_std = groups.std(-1, keepdim=True)
    skew = (((groups - member_mean) / member_std) ** 3).sum(-1) * n / ((n - 1) * (n - 2))
    mean_term = torch.linalg.vector_norm(groups.mean(1) - mean, dim=-1)
    std_term = torch.linalg.vector_norm(groups.std(1) - std, dim=-1)
    return mean_term + std_term + 0.1 * torch.linalg.vector_norm(skew, dim=-1)


def d3hr_batched(mean: torch.Tensor, std: torch.Tensor, n_candidates: int, generator: torch.Generator):
    """One batched torch.normal of all candidates, vectorised scoring, argmin: (group [ipc, D], score)."""
    shape = (n_candidates, IPC, mean.shape[0])
    groups = torch.normal(mean.expand(shape), std.expand(shape), generator=generator)
    scores = d3hr_score(groups, mean, std)
    best = scores.argmin()
    return groups[best], scores[best]


def run(device: torch.device | str = "cpu", repeats: int = 5) -> list[dict]:
    device = torch.device(device)
    n_candidates = CANDIDATES.get(device.type, CANDIDATES["cpu"])
    g = torch.Generator(device=device).manual_seed(0)
    mean = torch.randn(DIM, device=device, generator=g)
    std = 0.5 + torch.rand(DIM, device=device, generator=g)
    records = []
    with value_checks(False):
        for backend in _backends("group_sampling", device):
            fn = lambda b=backend: group_sampling(mean, std, IPC, n_candidates, generator=g, backend=b)  # noqa: E731
            records.append(_record("group_sampling", backend, n_candidates, timeit(fn, device, repeats), device))
        baseline = lambda: d3hr_batched(mean, std, n_candidates, g)  # noqa: E731
        seconds = timeit(baseline, device, repeats)
        records.append(_record("group_sampling", "D3HR batched torch.normal", n_candidates, seconds, device))

        scored = min(n_candidates, 1000)
        groups = torch.randn(scored, IPC, DIM, device=device, generator=g) * std + mean
        for backend in _backends("group_score", device):
            fn = lambda b=backend: group_score(groups, mean, std, backend=b)  # noqa: E731
            records.append(_record("group_score", backend, scored, timeit(fn, device, repeats), device))
        vectorised = lambda: d3hr_score(groups, mean, std)  # noqa: E731
        records.append(_record("group_score", "vectorised torch", scored, timeit(vectorised, device, repeats), device))
    return records


def main() -> None:
    run_op_benchmark(run, "group_sampling", __doc__.splitlines()[0], repeats=5)


if __name__ == "__main__":
    main()
