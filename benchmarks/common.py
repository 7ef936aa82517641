"""Helpers shared by the benchmark scripts (never used by tests). Timing and reports live in fastdd.bench.common,
which `fastdd bench` uses too."""

from __future__ import annotations

import torch

from fastdd.bench.common import device_name, timeit, write_report

__all__ = ["device_name", "timeit", "write_report", "run_op_benchmark"]


def run_op_benchmark(run, name: str, description: str, repeats: int) -> None:
    """Command line of one benchmarks/ops/bench_<name>.py: --device, --repeats; writes <name>_<device>.json/.md."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    write_report(run(args.device, args.repeats), f"{name}_{torch.device(args.device).type}")
