"""Timing and reporting helpers of the benchmarks (`fastdd bench` and the scripts in benchmarks/)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {platform.machine()}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    *,
    do_bench: bool = True,
) -> float:
    """Median time of fn() in seconds over `repeats` runs after `warmup` runs (warm-up: compilation, caches).

    Wall clock with the device synchronised around every run. On CUDA with do_bench (short calls such as one op)
    triton.testing.do_bench times it instead (CUDA events, L2 flushed, its own warm-up and repeat count) when
    Triton is there; pass do_bench=False for long calls (a whole sampling run).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    if device.type == "cuda" and do_bench:
        try:
            from triton.testing import do_bench as triton_do_bench

            return triton_do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(records: list[dict]) -> str:
    """Records as a markdown table (columns = union of keys, floats to 4 significant digits)."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = [f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(records: list[dict], name: str, out_dir: str | Path = "benchmarks/results") -> Path:
    """Write records as <out_dir>/<name>.json and a markdown table <name>.md (printed too); returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(records, indent=2))
    table = markdown_table(records)
    (out_dir / f"{name}.md").write_text(table + "\n")
    print(table)
    return json_path
