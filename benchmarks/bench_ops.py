"""Benchmark every fastdd op and backend against what a user would write otherwise.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--repeats 10] [--only grad_cosine,mercer] [--out DIR]

Each benchmarks/ops/bench_<op>.py exposes run(device, repeats) -> list of records; this script runs them,
prints one table and writes <out>/ops_<device>.json / .md (median of repeats, device named; default out:
benchmarks/results).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ops as op_benchmarks  # noqa: E402
from benchmarks.common import write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated op benchmark names (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    args = parser.parse_args()
    wanted = {name for name in args.only.split(",") if name}
    records = []
    for module_info in sorted(pkgutil.iter_modules(op_benchmarks.__path__), key=lambda m: m.name):
        name = module_info.name.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        module = importlib.import_module(f"benchmarks.ops.{module_info.name}")
        print(f"== {name}", flush=True)
        records += module.run(torch.device(args.device), args.repeats)
    write_report(records, f"ops_{torch.device(args.device).type}", args.out)


if __name__ == "__main__":
    main()
