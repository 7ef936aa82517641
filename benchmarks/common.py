"""Timing and reporting helpers shared by the benchmark scripts (never used by tests)."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs.

    On CUDA uses triton.testing.do_bench (CUDA events, L2 flushed) when Triton is there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_report(records: list[dict], name: str, out_dir: str | Path = "benchmarks/results") -> Path:
    """Write records as JSON and a markdown table (columns = union of keys); returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(records, indent=2))
    columns = list(dict.fromkeys(k for r in records for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out_dir / f"{name}.md").write_text(table + "\n")
    print(table)
    return json_path


def run_op_benchmark(run, name: str, description: str, repeats: int) -> None:
    """Command line of one benchmarks/ops/bench_<name>.py: --device, --repeats; writes <name>_<device>.json/.md."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    args = parser.parse_args()
    write_report(run(args.device, args.repeats), f"{name}_{torch.device(args.device).type}")
