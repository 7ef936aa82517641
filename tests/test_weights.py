"""Weights the way users bring them: a hub id resolved through a Hugging Face cache layout the test builds
(`models--<org>--<name>/snapshots/<rev>/…` with `refs/main`) under HF_HOME with HF_HUB_OFFLINE=1, a pipeline's own
VAE used by default, and one-line errors naming the option when an id is not cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_dit import save_tiny_dit_pipeline

REVISION = "0123456789abcdef0123456789abcdef01234567"
OLD_REVISION = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME holding tiny/dit-pipe in the hub cache layout, at REVISION with refs/main, and an older snapshot
    OLD_REVISION (other weights) that the tag refs/v0 names."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny--dit-pipe"
    save_tiny_dit_pipeline(repo / "snapshots" / REVISION, num_classes=10)
    save_tiny_dit_pipeline(repo / "snapshots" / OLD_REVISION, num_classes=10, seed=1)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "refs" / "v0").write_text(OLD_REVISION)
    return home


def fastdd_cli(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastdd", *args], env=env, capture_output=True, text=True, timeout=300)


def test_a_hub_id_in_the_cache_loads_offline_with_the_pipeline_vae(tmp_path, hf_home):
    out = tmp_path / "run"
    proc = fastdd_cli(["distill", "--method", "dit", "--ipc", "1", "--steps", "2", "--model", "tiny/dit-pipe",
                       "--out", str(out), "--quiet", "--device", "cpu"], hf_home)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "accelerate" not in proc.stderr
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["model"] == "tiny/dit-pipe" and config["model_sha256"].startswith("folder:")
    assert config["vae"].endswith(f"snapshots/{REVISION}") and config["vae_sha256"].startswith("folder:")
    assert (config["image_size"], config["channels"]) == (16, 3) and len(list(out.glob("*/*.png"))) == 10


def test_an_id_missing_from_the_cache_fails_in_one_line_naming_the_option(tmp_path, hf_home):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(data / "0.png")
    for args, option in (
        (["--data", str(tmp_path / "data")], "--model facebook/DiT-XL-2-256"),  # the default model with --data
        (["--model", "tiny/dit-pipe", "--vae", "stabilityai/sd-vae-ft-ema"], "--vae stabilityai/sd-vae-ft-ema"),
    ):
        out = tmp_path / "out"
        proc = fastdd_cli(["distill", "--method", "dit", "--ipc", "1", "--out", str(out), "--dry-run", *args], hf_home)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"{option}: not in the Hugging Face cache and offline (HF_HUB_OFFLINE=1)" in err, err
        assert f"`hf download {option.split()[1]}`" in err and not out.exists()


@pytest.fixture(scope="module")
def narrow_official(tmp_path_factory) -> Path:
    """An official-format state dict of a 10-class pixel DiT of width 32 (no standard variant: heads unknown)."""
    from tiny_dit import TINY_PIXEL_DIT, bounded_pixel_dit_

    from fastdd.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(**TINY_PIXEL_DIT, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bounded_pixel_dit_(model)
    path = tmp_path_factory.mktemp("official") / "narrow.pt"
    torch.save(model.state_dict(), path)
    return path


def distill_cli(out: Path, model: Path, *extra: str) -> list[str]:
    return ["distill", "--method", "dit", "--ipc", "1", "--steps", "3", "--out", str(out), "--model", str(model),
            "--vae", "none", "--quiet", "--device", "cpu", *extra]  # fmt: skip


def test_num_heads_and_numerics_from_the_command_line(tmp_path, narrow_official, capsys):
    from fastdd.cli.main import main

    assert main(distill_cli(tmp_path / "x", narrow_official)) == 2
    assert "pass --num-heads" in capsys.readouterr().err and not (tmp_path / "x").exists()
    runs = {}
    for numerics in ("official", "diffusers"):
        runs[numerics] = tmp_path / numerics
        assert main(distill_cli(runs[numerics], narrow_official, "--num-heads", "2", "--numerics", numerics)) == 0
        assert json.loads((runs[numerics] / "manifest.json").read_text())["config"]["numerics"] == numerics
    default = tmp_path / "default"
    assert main(distill_cli(default, narrow_official, "--num-heads", "2")) == 0  # an official checkpoint: official
    png = "0/0.png"
    assert (default / png).read_bytes() == (runs["official"] / png).read_bytes()
    assert (runs["diffusers"] / png).read_bytes() != (runs["official"] / png).read_bytes()


def test_a_revision_picks_the_snapshot_and_is_recorded(tmp_path, hf_home):
    fingerprints = {}
    for revision in (None, "v0", OLD_REVISION):
        out = tmp_path / str(revision)
        extra = [] if revision is None else ["--revision", revision]
        proc = fastdd_cli(["distill", "--method", "dit", "--ipc", "1", "--steps", "2", "--model", "tiny/dit-pipe",
                           "--out", str(out), "--quiet", "--device", "cpu", *extra], hf_home)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        config = json.loads((out / "manifest.json").read_text())["config"]
        assert config["revision"] == revision
        assert config["vae"].endswith(f"snapshots/{REVISION if revision is None else OLD_REVISION}")
        fingerprints[revision] = config["model_sha256"]
    assert fingerprints["v0"] == fingerprints[OLD_REVISION] != fingerprints[None]
    for model, revision, message in (
        ("tiny/dit-pipe", "v9", "--model tiny/dit-pipe: not in the Hugging Face cache and offline"),
        (str(tmp_path / "x.pt"), "v0", "is not a hub id"),
    ):
        proc = fastdd_cli(["distill", "--method", "dit", "--ipc", "1", "--model", model, "--revision", revision,
                           "--out", str(tmp_path / "refused"), "--dry-run"], hf_home)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_minimax_training_checkpoint_runs_from_the_command_line(tmp_path, capsys):
    """{"model", "ema", "opt", "args"} with args an argparse Namespace and gammas in Minimax's blocks loads strictly
    (weights-only) and samples; the EMA weights are the ones used."""
    import argparse

    from tiny_dit import TINY_PIXEL_DIT, bounded_pixel_dit_

    from fastdd.cli.main import main
    from fastdd.models.dit import DiT

    torch.manual_seed(0)
    ema = DiT(**{**TINY_PIXEL_DIT, "depth": 2}, num_classes=10, diffit=True)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bounded_pixel_dit_(ema)
    state = ema.state_dict()
    path = tmp_path / "0008000.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": state, "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-XL/2", epochs=8)}, path)  # fmt: skip
    out = tmp_path / "run"
    assert main(distill_cli(out, path, "--num-heads", "2")) == 0, capsys.readouterr().err
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["numerics"] == "official" and config["missing_keys"] is None
    assert len(list(out.glob("*/*.png"))) == 10
