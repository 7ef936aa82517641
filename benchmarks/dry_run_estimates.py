"""`fastdd distill --dry-run`'s time estimate against the real run, per method, on the digits default (IPC 2, default
options): writes benchmarks/results/dry_run_estimates_<device>.json/.md. One run each (a real run is the quantity
being estimated, not a repeated timing); the same check, asserted within 2×, is tests/test_api.py's byte-identity test.

    python benchmarks/dry_run_estimates.py [--device cpu|cuda] [--allow-reference]

Like every benchmark it refuses (exit 2, one line) when an op would run on its PyTorch reference for lack of
fastdd._C, unless --allow-reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastdd  # noqa: E402
from benchmarks.common import require_compiled  # noqa: E402
from fastdd.bench.common import device_name, write_report  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402

METHODS = ("dit", "igd", "dap", "mgd3", "d3hr", "sam", "igds")


def measure(method: str, out: Path, device: str) -> dict:
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        fastdd.distill(method, 2, out, quiet=True, device=device, dry_run=True)
    estimate = float(re.search(r"estimate\s+~([\d.]+) s", report.getvalue()).group(1))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        fastdd.distill(method, 2, out, quiet=True, device=device)
    real = time.perf_counter() - start
    return {"method": method, "estimate_s": estimate, "real_s": round(real, 2), "ratio": round(estimate / real, 2),
            "device": device_name(device)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allow-reference", action="store_true", help="time ops that would run on their reference")
    args = parser.parse_args()
    require_compiled(sorted(OP_BACKENDS), torch.device(args.device), args.allow_reference)
    with tempfile.TemporaryDirectory() as root:
        records = [measure(m, Path(root) / m, args.device) for m in METHODS]
    write_report(records, f"dry_run_estimates_{torch.device(args.device).type}")


if __name__ == "__main__":
    main()
