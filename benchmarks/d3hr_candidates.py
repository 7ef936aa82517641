"""D3HR: what more candidate groups buy. The best D3HR score (the authors' evaluate_distribution_batch) among N groups
of IPC latents drawn from a class Gaussian, and the time `fastdd.ops.group_sampling` takes, for N = 10² ... 10⁵, and
the time extrapolated to the authors' 10⁸ per class. Median of 3 seeds per N (the best score is a random quantity).

    python benchmarks/d3hr_candidates.py [--max-candidates 100000] [--out benchmarks/results]

Writes d3hr_candidates_<device>.json and .md. The Gaussian: mean ~ N(0, 1), std ~ U(0.5, 1.5) per feature (an SD
latent: D = 4096; the digits pixel prior: D = 256).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    with contextlib.suppress(ImportError):
        import fastdd  # noqa: F401
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdd import ops  # noqa: E402
from fastdd.bench.common import device_name, write_report  # noqa: E402
from fastdd.guidance.d3hr import D3HR_AUTHORS_CANDIDATES  # noqa: E402

IPC = 10
DIMS = (256, 4096)
SEEDS = (0, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-candidates", type=int, default=100_000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    counts = [n for n in (100, 1_000, 10_000, 100_000, 1_000_000) if n <= args.max_candidates]
    records = []
    for dim in DIMS:
        generator = torch.Generator().manual_seed(0)
        mean = torch.randn(dim, generator=generator)
        std = 0.5 + torch.rand(dim, generator=generator)
        for n in counts:
            scores, times = [], []
            for seed in SEEDS:
                start = time.perf_counter()
                _, score = ops.group_sampling(mean, std, IPC, n, generator=torch.Generator().manual_seed(seed))
                times.append(time.perf_counter() - start)
                scores.append(float(score))
            seconds = statistics.median(times)
            records.append(
                {
                    "D": dim,
                    "ipc": IPC,
                    "candidates": n,
                    "best_score_median": round(statistics.median(scores), 4),
                    "best_score_spread": round(max(scores) - min(scores), 4),
                    "seconds": round(seconds, 4),
                    "seconds_at_1e8_extrapolated": round(seconds * D3HR_AUTHORS_CANDIDATES / n, 1),
                    "device": device_name("cpu"),
                }
            )
            print(records[-1], flush=True)
    print(f"wrote {write_report(records, 'd3hr_candidates_cpu', args.out)}")


if __name__ == "__main__":
    main()
