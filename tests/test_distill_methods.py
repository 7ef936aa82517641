"""`fastdd distill --method {dap,mgd3,d3hr,sam,igds}` through the real CLI on the offline digits default (the
shipped prior, ipc 2, 5 steps, small method settings): images + manifest with the method's parameters, images
differ from the unguided prior with the same seed, caches make a resumed run skip the expensive step, bad
options exit 2 naming the option."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdd.methods.igds as igds_wiring
import fastdd.methods.sam as sam_wiring
from fastdd.cli.main import main
from fastdd.data.digits import load_digits_split
from fastdd.models.loading import DIGITS_PRIOR_PATH

IPC = 2
SMALL = {
    "dap": ["--dap-gamma", "0.1"],
    "mgd3": [],
    "d3hr": ["--d3hr-candidates", "50"],
    "sam": ["--sam-epochs", "1", "--sam-batch", "16"],
    "igds": ["--igds-epochs", "1", "--igds-classifier-epochs", "3"],
}
EXPECTED_PARAMS = {
    "dap": {"gamma": 0.1, "kernel": "linear", "block": 2, "t_mode": "zero", "guided_range": [0, 4]},
    "mgd3": {"lambda": 0.1, "stop_index": 2, "kmeans_seed": 0},
    "d3hr": {"n_candidates": 50, "target_index": 3},
    "sam": {
        "epochs": 1,
        "batch_size": 16,
        "lambda_real": 0.002,
        "lambda_gen": 0.008,
        "ema_decay": 0.99,
        "policy": "most_similar",
    },
    "igds": {"eta": 2.0, "beta": pytest.approx(0.5 * np.log(2) / np.log(50))},
}


def no_training(*args, **kwargs):
    raise AssertionError("trained where the run must not train (cache hit, dry run)")


def distill(out: Path, method: str, *extra: str, ipc: int = IPC) -> list[str]:
    return [
        "distill",
        "--method",
        method,
        "--ipc",
        str(ipc),
        "--out",
        str(out),
        "--steps",
        "5",
        "--quiet",
        "--device",
        "cpu",
        *extra,
    ]


def images(out: Path, classes: int | Sequence[str] = 10, ipc: int = IPC) -> np.ndarray:
    """The PNGs of the class folders (0..classes-1, or the named folders), [classes·ipc, H, W] float64."""
    folders = [str(c) for c in range(classes)] if isinstance(classes, int) else classes
    return np.stack(
        [np.asarray(Image.open(out / c / f"{i}.png"), dtype=np.float64) for c in folders for i in range(ipc)]
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit") / "run"
    assert main(distill(out, "dit")) == 0
    return out


@pytest.mark.parametrize("method", sorted(SMALL))
def test_method_writes_a_set_with_its_parameters_that_differs_from_the_prior(tmp_path, plain, method):
    out = tmp_path / "run"
    assert main(distill(out, method, *SMALL[method])) == 0
    assert len(list(out.glob("*/*.png"))) == 10 * IPC and (out / "preview.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["method"] == method
    params = manifest["method_params"]
    for key, value in EXPECTED_PARAMS[method].items():
        assert params[key] == value, (key, params)
    guided, unguided = images(out), images(plain)
    difference = np.abs(guided - unguided).mean(axis=(1, 2))
    # every method moves the samples: each image of the run differs from the prior's image with the same seed
    # (d3hr starts from inverted real latents, sam samples fine-tuned weights, the others add guidance deltas)
    assert (difference > 0).mean() >= 0.9, difference
    assert difference.mean() > 0.3, difference
    assert not list(out.rglob("*.tmp"))


def test_dap_and_mgd3_on_a_class_subset_use_the_model_labels(tmp_path):
    """--data with digit classes 3 and 7 only: local classes 0, 1 map to the prior's labels 3, 7."""
    data = tmp_path / "data"
    pixels, labels = load_digits_split("train")
    for digit in (3, 7):
        (data / str(digit)).mkdir(parents=True)
        for i, image in enumerate(pixels[labels == digit][:12]):
            Image.fromarray(((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()).save(
                data / str(digit) / f"{i}.png"
            )
    prior = DIGITS_PRIOR_PATH
    runs = {}
    for method, extra in (("dit", []), ("dap", SMALL["dap"]), ("mgd3", [])):
        out = tmp_path / method
        assert main(distill(out, method, "--data", str(data), "--model", str(prior), *extra)) == 0
        assert json.loads((out / "manifest.json").read_text())["config"]["class_labels"] == [3, 7]
        runs[method] = images(out, classes=("3", "7"))
    for method in ("dap", "mgd3"):
        assert np.abs(runs[method] - runs["dit"]).mean() > 0.3
    # the IPC cannot exceed the 12 real images of a class for mgd3 (k-means clusters)
    assert main(distill(tmp_path / "big", "mgd3", "--data", str(data), "--model", str(prior), ipc=13)) == 2


@pytest.mark.parametrize(
    "method,module,function",
    [("sam", sam_wiring, "finetune_sam"), ("igds", igds_wiring, "train_information_estimator")],
)
def test_cached_state_is_reused_by_a_new_run(tmp_path, monkeypatch, method, module, function):
    """The fine-tuned SAM weights / the IGDS estimator are cached in DIR/.fastdd; a run that finds the cache
    does not train again and makes the same images."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(distill(first, method, *SMALL[method])) == 0
    (cached,) = (first / ".fastdd").glob(f"{'sam_difffit' if method == 'sam' else 'igds_estimator'}_*.safetensors")
    (second / ".fastdd").mkdir(parents=True)
    shutil.copy(cached, second / ".fastdd" / cached.name)

    monkeypatch.setattr(module, function, no_training)
    assert main(distill(second, method, *SMALL[method])) == 0
    assert np.array_equal(images(first), images(second))


@pytest.mark.parametrize(
    "method,extra,option",
    [
        ("dap", ["--dap-gamma", "-1"], "--dap-gamma"),
        ("dap", ["--dap-block", "9"], "--dap-block"),
        ("dap", ["--dap-range", "40,10"], "--dap-range"),
        ("mgd3", ["--mgd3-lambda", "-0.1"], "--mgd3-lambda"),
        ("mgd3", ["--mgd3-stop", "50"], "--mgd3-stop"),
        ("mgd3", ["--ipc", "100000"], "--ipc"),
        ("d3hr", ["--d3hr-candidates", "0"], "--d3hr-candidates"),
        ("d3hr", ["--d3hr-target", "60"], "--d3hr-target"),
        ("d3hr", ["--ipc", "100000"], "--ipc"),
        ("igd", ["--sampler", "dpm-solver++"], "--sampler dpm-solver++"),
        ("sam", ["--sam-epochs", "0"], "--sam-epochs"),
        ("sam", ["--sam-lambda-gen", "-1"], "--sam-lambda-gen"),
        ("sam", ["--sam-ema-decay", "1.5"], "--sam-ema-decay"),
        ("igds", ["--igds-eta", "-1"], "--igds-eta"),
        ("igds", ["--igds-beta", "nan"], "--igds-beta"),
        ("igds", ["--igds-range", "3"], "--igds-range"),
        ("igd", ["--igd-range", "40,10"], "--igd-range"),
        ("igd", ["--igd-range", "a,b"], "--igd-range"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, method, extra, option):
    out = tmp_path / "run"
    assert main(distill(out, method, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
    assert not out.exists()


def test_igds_needs_an_explicit_step_size_off_digits(tmp_path, capsys):
    """No η is published: off the digits default --igds-eta is required (one clear error)."""
    data = tmp_path / "data"
    for name in "ab":
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)).save(
                data / name / f"{i}.png"
            )
    prior = tmp_path / "prior.safetensors"
    from fastdd.models.dit import DiT
    from fastdd.prior import save_prior

    save_prior(
        DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2),
        prior,
        {"dataset": "custom", "classes": ["a", "b"], "image_size": 16, "channels": 1},
    )
    assert main(distill(tmp_path / "run", "igds", "--data", str(data), "--model", str(prior), ipc=1)) == 2
    assert "--igds-eta" in capsys.readouterr().err


def test_dap_noised_projected_and_rbf_variants_run_and_differ(tmp_path):
    """Real features noised to the current step vs at t = 0 (both JL-projected to 64 dimensions); RBF kernel.
    Guided on the last 2 of 5 steps only (noised features are recomputed per class and step)."""
    runs = {}
    for name, extra in (("zero", []), ("noised", ["--dap-t-mode", "noised"]), ("rbf", ["--dap-kernel", "rbf"])):
        runs[name] = tmp_path / name
        assert (
            main(
                distill(runs[name], "dap", "--dap-gamma", "0.3", "--dap-proj-dim", "64", "--dap-range", "40,49", *extra)
            )
            == 0
        )
    params = json.loads((runs["noised"] / "manifest.json").read_text())["method_params"]
    assert params["t_mode"] == "noised" and params["projection_dim"] == 64
    assert json.loads((runs["rbf"] / "manifest.json").read_text())["method_params"]["kernel"] == "rbf"
    assert np.abs(images(runs["zero"]) - images(runs["noised"])).mean() > 0.1
    assert np.abs(images(runs["zero"]) - images(runs["rbf"])).mean() > 0


@pytest.mark.parametrize(
    "method,module,function",
    [("sam", sam_wiring, "finetune_sam"), ("igds", igds_wiring, "train_information_estimator")],
)
def test_dry_run_prints_the_parameters_without_training(tmp_path, capsys, monkeypatch, method, module, function):
    monkeypatch.setattr(module, function, no_training)
    out = tmp_path / "run"
    assert main(distill(out, method, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "method args" in printed and ("ema_decay" in printed if method == "sam" else '"eta": 2.0' in printed)
    assert not out.exists()


def test_d3hr_statistics_shared_across_runs(tmp_path):
    """--d3hr-stats: the per-class inverted statistics of one run are reused by a run of another IPC."""
    stats = tmp_path / "stats"
    extra = ["--d3hr-candidates", "50", "--d3hr-stats", str(stats)]
    assert main(distill(tmp_path / "ipc2", "d3hr", *extra)) == 0
    files = sorted(stats.glob("class_*.safetensors"))
    assert len(files) == 10
    stamps = [f.stat().st_mtime_ns for f in files]
    assert main(distill(tmp_path / "ipc1", "d3hr", *extra, ipc=1)) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not recomputed
    assert len(list((tmp_path / "ipc1").glob("*/*.png"))) == 10
