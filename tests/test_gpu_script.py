"""benchmarks/gpu/run_all.sh, the one-shot GPU check, cannot rot on CPU-only CI: its --dry-run runs every step's
command (the same scripts, modules, flags and test node ids) on CPU at tiny sizes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_all.sh"
STEPS = ("env", "wheels", "build", "check", "tests", "bench_ops", "bench_igd", "bench_more")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_dry_run_passes_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md"]  # few files for the device tool
    summary = (out / "summary.md").read_text()
    rows = dict(re.findall(r"^\| (\w+) \| ([^|]+) \|", summary, re.MULTILINE))
    assert {step: rows.get(step) for step in STEPS} == dict.fromkeys(STEPS, "ok"), summary
    with tarfile.open(out / "results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {f"logs/{step}.log" for step in STEPS} <= names
    assert {"results/ops_cpu_quick.json", "results/sampler_tiny_cpu_dit-igd.json"} <= names


def test_gpu_script_refuses_bad_usage(tmp_path):
    for args in ([], ["--dry-run"], [str(tmp_path / "a"), str(tmp_path / "b")], ["--bogus"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)
