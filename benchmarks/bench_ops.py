"""Run every op benchmark (benchmarks/ops/bench_*.py) and write one summary: fastdd (auto) against the strongest
baseline at every swept shape, with the fraction of the machine's peak.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--only grad_cosine,mercer_distance]
        [--allow-reference] [--out benchmarks/results]

Each benchmark runs as its own process (it times the INSTALLED fastdd and refuses, exit 2, when an op would run on
its PyTorch reference) and writes <op>_<device>.json/.md/.png; this script then writes ops_<device>.md and .json
(the README's table) from their summaries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def summary_table(summaries: list[dict]) -> str:
    """Markdown: one row per (op, shape), fastdd vs the strongest baseline (a device column when the rows were measured
    on more than one device)."""
    several = len({r.get("device") for r in summaries}) > 1
    lines = [
        "| op | shape | fastdd (auto) | strongest baseline | speed-up | fastdd % of roofline (bound) | peak MiB fastdd / baseline |"
        + (" device |" if several else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if several else ""),
    ]
    for r in summaries:
        auto = r["fastdd (auto)"].removeprefix("fastdd ")
        roof = f"{r['fastdd_pct_of_roofline']:.0f}% ({r['fastdd_bound']})" if "fastdd_pct_of_roofline" in r else ""
        if r.get("fastdd_conv_time_pct") is not None:
            roof += f"; {r['fastdd_conv_time_pct']:.0f}% of time in convs"
        memory = ""
        if r.get("fastdd_peak_mib") is not None and r.get("baseline_peak_mib") is not None:
            memory = f"{_mib(r['fastdd_peak_mib'])} / {_mib(r['baseline_peak_mib'])}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {auto}: {_ms(r['fastdd_ms'])} | {r['strongest baseline']}: "
            f"{_ms(r['baseline_ms'])} | {r['speedup']:.2f}× | {roof} | {memory} |"
            + (f" {r['device']} |" if several else "")
        )
    return "\n".join(lines)


def _mib(value: float) -> str:
    if value < 0.01:
        return "< 0.01"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.3g} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated op benchmark names (default: all)")
    parser.add_argument("--allow-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--summary-only", action="store_true", help="write the summary from the existing JSON files")
    args = parser.parse_args()
    wanted = {name for name in args.only.split(",") if name}
    names = sorted(p.stem.removeprefix("bench_") for p in (HERE / "ops").glob("bench_*.py"))
    suffix = "_quick" if args.quick else ""
    summaries, peaks = [], {}
    for name in names:
        if wanted and name not in wanted:
            continue
        command = [
            sys.executable,
            str(HERE / "ops" / f"bench_{name}.py"),
            "--device",
            args.device,
            "--out",
            str(args.out),
        ]
        command += ["--quick"] * args.quick + ["--allow-reference"] * args.allow_reference
        print(f"== {name}", flush=True)
        code = 0 if args.summary_only else subprocess.call(command)
        if code:
            raise SystemExit(code)
        result = json.loads((args.out / f"{name}_{torch.device(args.device).type}{suffix}.json").read_text())
        summaries += [{**r, "device": result["machine_peak"]["device"]} for r in result["summary"]]
        peaks = result["machine_peak"]
    name = f"ops_{torch.device(args.device).type}{suffix}"
    (args.out / f"{name}.json").write_text(json.dumps({"machine_peak": peaks, "summary": summaries}, indent=2))
    table = summary_table(summaries)
    devices = sorted({r["device"] for r in summaries})
    header = (
        f"Device: {'; '.join(devices)}; peak measured by each benchmark (last: {peaks['peak_gflops']:.0f} GFLOP/s "
        f"fp32, the faster of matmul {peaks['matmul_gflops']:.0f} and 3×3 convolution {peaks['conv_gflops']:.0f}; "
        f"{peaks['copy_gbps']:.1f} GB/s copy).\n\n"
    )
    (args.out / f"{name}.md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
