"""`fastdd bench` (fastdd.bench.sampler) on the tiny config: files, one record per (method, path), derived columns
consistent with the measured times, and bad options refused with exit code 2 naming the option."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_dit import relative_error

from fastdd.bench.sampler import METHODS, BenchModels, authors_call, default_out, fastdd_call
from fastdd.cli.bench import main as script_main
from fastdd.cli.main import main

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 2


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--config",
        "tiny",
        "--device",
        "cpu",
        "--steps",
        "4",
        "--repeats",
        "1",
        "--batch",
        str(BATCH),
        "--no-compile",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def test_writes_json_markdown_and_chart_with_one_record_per_method_and_path(bench_run):
    names = sorted(p.name for p in bench_run.iterdir())
    assert names == ["sampler_tiny_cpu.json", "sampler_tiny_cpu.md", "sampler_tiny_cpu.png"]
    records = json.loads((bench_run / "sampler_tiny_cpu.json").read_text())
    keys = [(r["method"], r["path"]) for r in records]
    expected = {(m, p) for m in METHODS for p in ("authors", "eager")}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    table = (bench_run / "sampler_tiny_cpu.md").read_text().splitlines()
    assert len(table) == 2 + len(records) and "speedup_vs_reference" in table[0]
    with Image.open(bench_run / "sampler_tiny_cpu.png") as chart:
        assert chart.format == "PNG" and chart.height > 30 * len(records)
    for r in records:
        assert r["config"] == "tiny" and r["steps"] == 4 and r["device"].startswith("CPU")
        assert r["batch"] == (1 if r["path"] == "authors" else BATCH)


def test_derived_columns_agree_with_the_times(bench_run):
    records = json.loads((bench_run / "sampler_tiny_cpu.json").read_text())
    seconds = {(r["method"], r["path"]): r["seconds_per_image"] for r in records}
    for r in records:
        method, path, own = r["method"], r["path"], r["seconds_per_image"]
        assert own > 0 and r["images_per_second"] == pytest.approx(1 / own)
        assert r["guided_over_plain"] == pytest.approx(own / seconds[("dit", path)])
        reference = seconds[(method, "authors")]
        best = seconds[(method, "eager")]  # the only fp32 fastdd path without compile
        assert r["speedup_vs_reference"] == pytest.approx(reference / (best if path == "authors" else own))
    ratios = {r["method"]: r["cost_model_ratio"] for r in records}
    assert ratios["dit"] == 1.0 and ratios["sam"] == pytest.approx(1.0)
    assert ratios["igd"] > 1 and ratios["dap"] > 1 and ratios["igds"] > 1
    assert ratios["d3hr"] < 1  # DDIM from index 2 of 4: 3 of the 4 steps


def test_d3hr_authors_and_fastdd_calls_run_the_same_ddim_stage():
    models = BenchModels("tiny", torch.device("cpu"), 4)
    call, images = authors_call("d3hr", models)
    fastdd_image = fastdd_call("d3hr", models, 1)()[0]
    assert images == 1 and relative_error(call(), fastdd_image) <= 1e-4


def test_a_subset_of_methods_runs_dit_too_and_names_its_files(tmp_path):
    argv = [
        "bench",
        "--device",
        "cpu",
        "--methods",
        "igds",
        "--steps",
        "3",
        "--repeats",
        "1",
        "--batch",
        "1",
        "--no-compile",
        "--bf16",
        "--fast",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    records = json.loads((tmp_path / "sampler_tiny_cpu_dit-igds.json").read_text())
    keys = [(r["method"], r["path"]) for r in records]
    assert keys == [(m, p) for m in ("dit", "igds") for p in ("authors", "eager", "bf16", "fast")]
    igds = {r["path"]: r for r in records if r["method"] == "igds"}
    # the approximate paths are not fastdd's best path: the authors' record compares with eager
    assert igds["authors"]["speedup_vs_reference"] == pytest.approx(
        igds["authors"]["seconds_per_image"] / igds["eager"]["seconds_per_image"]
    )


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "options, named",
    [
        (["--methods", "igd,nope"], "--methods"),
        (["--repeats", "0"], "--repeats"),
        (["--config", "dit-b"], "--config"),
        (["--batch", "0"], "--batch"),
        (["--steps", "1"], "--steps"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_exit_2_naming_the_option(options, named, capsys, tmp_path):
    code, err = run_cli(["bench", "--out", str(tmp_path), *options], capsys)
    assert code == 2 and named in err, err
    assert not any(tmp_path.iterdir())


def test_script_entry_point_refuses_bad_options_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        script_main(["--repeats", "0"])
    assert exit_.value.code == 2 and "--repeats" in capsys.readouterr().err


def test_default_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(default_out()) == "fastdd-bench"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "fastdd").mkdir()
    assert str(default_out()) == "benchmarks/results"
