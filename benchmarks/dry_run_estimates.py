"""`fastdd distill --dry-run`'s time estimate against the real run, per method, on the digits default (IPC 2, default
options) and on a small --data folder (4 classes of 20 JPEGs, a tiny diffusers pipeline in the real format, IPC 2;
igds: --igds-eta 2), each repeated; optionally with the machine loaded by other work (--load N: N background
processes running single-threaded matmuls, as a shared 2-core machine). Writes
benchmarks/results/dry_run_estimates_<device>[_load<N>].json/.md: every repeat's estimate / real ratio, and per case
the lowest and highest ratio (the spread).

    python benchmarks/dry_run_estimates.py [--repeats 3] [--load 1] [--device cpu|cuda] [--allow-reference]

Like every benchmark it refuses (exit 2, one line) when an op would run on its PyTorch reference for lack of
fastdd._C, unless --allow-reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastdd  # noqa: E402
from benchmarks.common import require_compiled  # noqa: E402
from benchmarks.tiny_assets import image_folder, tiny_pipeline  # noqa: E402
from fastdd.bench.common import device_name, markdown_table, write_report  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402

METHODS = ("dit", "igd", "dap", "mgd3", "d3hr", "sam", "igds")
HOG = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def measure(method: str, out: Path, device: str, settings: dict) -> tuple[float, float]:
    """(dry-run estimate, real seconds) of one run in a fresh folder."""
    options = fastdd.IGDSOptions(eta=2.0) if method == "igds" and "data" in settings else None
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        fastdd.distill(method, 2, out, options, quiet=True, device=device, dry_run=True, **settings)
    estimate = float(re.search(r"estimate\s+~([\d.]+) s", report.getvalue()).group(1))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fastdd.distill(method, 2, out, options, quiet=True, device=device, **settings)
    return estimate, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=0, help="background single-threaded processes (default 0)")
    parser.add_argument("--allow-reference", action="store_true", help="time ops that would run on their reference")
    args = parser.parse_args()
    require_compiled(sorted(OP_BACKENDS), torch.device(args.device), args.allow_reference)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.load)]
    records, summary = [], []
    try:
        with tempfile.TemporaryDirectory() as root:
            root = Path(root)
            tiny_pipeline(root / "pipe", 4)
            image_folder(root / "data", 4, 20)
            cases = {"digits": {}, "folder": {"data": str(root / "data"), "model": str(root / "pipe")}}
            for case, settings in cases.items():
                for method in METHODS:
                    ratios = []
                    for repeat in range(args.repeats):
                        estimate, real = measure(method, root / f"{case}_{method}_{repeat}", args.device, settings)
                        ratios.append(estimate / real)
                        records.append({"case": case, "method": method, "repeat": repeat, "estimate_s": estimate,
                                        "real_s": round(real, 2), "ratio": round(estimate / real, 2),
                                        "load_processes": args.load, "device": device_name(args.device)})  # fmt: skip
                        print(records[-1], flush=True)
                    summary.append({"case": case, "method": method, "repeats": args.repeats,
                                    "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                                    "within_0.5_2": all(0.5 <= r <= 2 for r in ratios),
                                    "load_processes": args.load, "device": device_name(args.device)})  # fmt: skip
    finally:
        for hog in hogs:
            hog.kill()
    name = f"dry_run_estimates_{torch.device(args.device).type}" + (f"_load{args.load}" if args.load else "")
    write_report(records, name)
    out = Path("benchmarks/results") / f"{name}.md"
    out.write_text(markdown_table(summary) + "\n\nEvery repeat:\n\n" + out.read_text())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
