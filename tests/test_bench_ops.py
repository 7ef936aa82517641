"""The op benchmarks' correctness checks on tiny shapes (so the benchmarks cannot rot), what the benchmarks say
about Opacus and BackPACK, and the refusal to time the PyTorch reference by accident (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    conv_time_share,
    finish_records,
    peak_memory_bytes,
    reference_fallbacks,
    summary,
)
from benchmarks.ops import (  # noqa: E402
    bench_cosine_memory,
    bench_grad_cosine,
    bench_group_sampling,
    bench_mercer_distance,
)
from fastdd.ops import value_checks  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("variant", ["input grad", "cosines only", "no norm"])
def test_grad_cosine_methods_agree(variant):
    pytest.importorskip("opacus")
    pytest.importorskip("backpack")
    shape = bench_grad_cosine.QUICK_SHAPES[0]
    args = bench_grad_cosine.make_case(shape, "cpu", variant != "no norm")
    with value_checks(False):
        bench_grad_cosine.check(shape, variant)
    assert bench_grad_cosine.work_flops(*args, input_grad=variant == "input grad") > 0


def test_opacus_and_backpack_cannot_give_the_input_gradient():
    """Opacus' per-sample gradients are detached from x; BackPACK's stay in the graph but give a wrong x-gradient
    (and it skips GroupNorm): why the benchmark compares them on the cosines alone."""
    pytest.importorskip("opacus")
    pytest.importorskip("backpack")
    args = bench_grad_cosine.make_case(bench_grad_cosine.QUICK_SHAPES[0], "cpu", norm=False)
    expected = bench_grad_cosine.torch_func_method(True)(*args)[1]
    got = bench_grad_cosine.BackpackCosines(args[0], input_grad=True)(*args)[1]
    assert (got - expected).abs().max() > 0.1 * expected.abs().max()
    opacus = bench_grad_cosine.OpacusCosines(args[0])
    x = args[2].detach().requires_grad_(True)
    opacus.module(x).sum().backward()
    assert all(not p.grad_sample.requires_grad for p in opacus.module.parameters())


@pytest.mark.parametrize(
    "module", [bench_cosine_memory, bench_mercer_distance], ids=["cosine_memory", "mercer_distance"]
)
def test_op_benchmark_baselines_agree(module):
    with value_checks(False):
        for case in module.cases(quick=True):
            module.check(case[2])


def test_group_sampling_baselines_agree():
    with value_checks(False):
        for op, _, methods, mean, std, _ in bench_group_sampling.cases(quick=True):
            bench_group_sampling.check(op, methods, mean, std)


def test_records_name_the_strongest_baseline_and_the_fraction_of_peak():
    records = [
        {"op": "o", "shape": "s", "method": "fast", "kind": "fastdd", "median_ms": 2.0, "flops": 4e9, "bytes": 1e6},
        {"op": "o", "shape": "s", "method": "a", "kind": "baseline", "median_ms": 3.0},
        {"op": "o", "shape": "s", "method": "b", "kind": "baseline", "median_ms": 5.0},
        {"op": "o", "shape": "s", "method": "floor", "kind": "floor", "median_ms": 1.0},
    ]
    finish_records(records, {"peak_gflops": 100.0, "copy_gbps": 10.0})
    assert records[0]["pct_of_roofline"] == pytest.approx(100 * 0.04 / 2e-3) and records[0]["bound"] == "compute"
    assert records[1]["fastdd_speedup"] == pytest.approx(1.5)
    (row,) = summary(records)
    assert row["strongest baseline"] == "a" and row["speedup"] == pytest.approx(1.5)


def test_benchmarks_refuse_the_reference_unless_allowed(tmp_path):
    """Without fastdd._C the cpp ops would run on their reference: exit 2 and one line; --allow-reference runs."""
    env = {**os.environ, "FASTDD_NO_EXT": "1", "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(ROOT / "benchmarks" / "ops" / "bench_mercer_distance.py"), "--quick"]
    out = subprocess.run(script + ["--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("refusing")]
    assert len(lines) == 1 and "mercer_distance" in lines[0] and "--allow-reference" in lines[0]
    out = subprocess.run(
        script + ["--allow-reference", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "mercer_distance_cpu_quick.json").read_text())
    assert (
        result["device"].startswith("CPU")
        and result["summary"]
        and result["machine_peak"]["peak_gflops"] >= result["machine_peak"]["conv_gflops"] > 0
    )
    assert {p.name for p in tmp_path.iterdir()} == {f"mercer_distance_cpu_quick.{e}" for e in ("json", "md", "png")}


def test_reference_fallbacks_lists_only_ops_with_a_faster_backend():
    cpu = torch.device("cpu")
    assert reference_fallbacks(["grad_cosine"], cpu) == []  # fused / func: made of torch ops, no extension needed


@pytest.mark.parametrize("script", ["bench_sampler.py", "dry_run_estimates.py", "quality_digits.py"])
def test_every_timing_script_refuses_the_reference(script):
    env = {**os.environ, "FASTDD_NO_EXT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and out.stderr.startswith("refusing to benchmark") and "--allow-reference" in out.stderr


def test_conv_time_share_counts_only_convolutions():
    x, weight = torch.randn(4, 16, 16, 16), torch.randn(16, 16, 3, 3)
    assert conv_time_share(lambda: torch.nn.functional.conv2d(x, weight, padding=1), torch.device("cpu")) > 50
    assert conv_time_share(lambda: (x * 2).exp().sum(), torch.device("cpu")) == 0
    assert conv_time_share(lambda: None, torch.device("cuda")) is None


def test_cpu_peak_memory_is_the_allocators_high_water_mark():
    """Two 4 MiB tensors alive together peak at 8 MiB; allocated and freed one after the other, at 4 MiB."""
    mib4 = 1 << 20  # floats

    def together():
        a = torch.ones(mib4)
        b = a * 2
        return float(b[0])

    def one_by_one():
        for _ in range(3):
            float(torch.ones(mib4)[0])

    # (+ a few bytes: the 0-dim tensors of the indexing)
    assert peak_memory_bytes(together, torch.device("cpu")) == pytest.approx(8 << 20, abs=1024)
    assert peak_memory_bytes(one_by_one, torch.device("cpu")) == pytest.approx(4 << 20, abs=1024)
