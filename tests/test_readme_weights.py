"""The README's "Bring your own weights and data" commands, run as written (offline) on tiny random models saved in the
real formats under the real names: `facebook/DiT-XL-2-256` and `stabilityai/sd-vae-ft-mse` in a Hugging Face cache
the test builds, the official `DiT-XL-2-256x256.pt` layout, a Minimax training checkpoint, an ImageNette-shaped
ImageFolder. Only the run length changes: `--ipc 10` -> `--ipc 1 --steps 4`."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_dit import save_tiny_dit_pipeline, tiny_vae

from fastdd.data.classes import IMAGENETTE

ROOT = Path(__file__).resolve().parent.parent
REVISION = "fedcba9876543210fedcba9876543210fedcba98"


def readme_commands() -> str:
    """The bash block of the README section that runs `fastdd distill`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bring your own weights and data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return next(block for block in blocks if "fastdd distill" in block)


def cached(home: Path, repo_id: str) -> Path:
    """The snapshot folder of repo_id in the hub cache layout under HF_HOME, with refs/main."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return repo / "snapshots" / REVISION


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def workplace(tmp_path_factory) -> tuple[Path, dict]:
    """A folder holding what the README's commands name, and the environment they run in."""
    from PIL import Image

    from fastdd.models.dit import DiT

    work = tmp_path_factory.mktemp("work")
    home = work / "hf_home"
    save_tiny_dit_pipeline(cached(home, "facebook/DiT-XL-2-256"), num_classes=1000)
    tiny_vae().save_pretrained(cached(home, "stabilityai/sd-vae-ft-mse"))
    small = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_classes=1000)  # DiT-S width
    torch.save(randomised(DiT(**small, num_heads=6), 1).state_dict(), work / "DiT-XL-2-256x256.pt")
    minimax = randomised(DiT(**{**small, "depth": 2}, num_heads=6, diffit=True), 2).state_dict()
    (work / "minimax").mkdir()
    torch.save({"model": minimax, "ema": minimax, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XL/2", epochs=8)}, work / "minimax" / "0012000.pt")  # fmt: skip
    rng = np.random.default_rng(0)
    for root, classes in (("imagenette2/train", IMAGENETTE), ("my_folder", ["n02096294", "n02093754"])):
        for name in classes:
            (work / root / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)  # odd sizes: resized and cropped
                Image.fromarray(pixels).save(work / root / name / f"{i}.JPEG")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "fastdd").write_text(f'#!/bin/sh\nexec {sys.executable} -m fastdd "$@"\n')
    (bin_dir / "fastdd").chmod(0o755)
    env = {**os.environ, "HF_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return work, env


def test_the_readme_commands_run_offline_on_models_in_the_real_formats(workplace):
    work, env = workplace
    script = readme_commands().replace("--ipc 10", "--ipc 1 --steps 4 --quiet --device cpu")
    assert script.count("fastdd distill") == 4
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs, params = {}, {}
    for out in re.findall(r"--out (\S+)", script):
        manifest = json.loads((work / out / "manifest.json").read_text())
        assert manifest["complete"] and len(manifest["images"]) == len(manifest["config"]["classes"]), out
        runs[out], params[out] = manifest["config"], manifest["method_params"]
    nette, hub, minimax, mine = runs.values()
    assert nette["numerics"] == "official" and nette["vae"] == "mse" and nette["model_sha256"]
    assert hub["model"] == "facebook/DiT-XL-2-256" and hub["vae"].endswith(REVISION) and hub["numerics"] == "official"
    assert minimax["method_args"]["igd_gamma"] == 100.0
    assert mine["classes"] == ["n02096294", "n02093754"] and mine["class_labels"] == [193, 182]
    assert (mine["numerics"], mine["spacing"], mine["cfg_channels"], mine["shadow_rows"]) == (
        "diffusers",
        "leading",
        None,
        False,
    )
    for out in list(params)[:3]:  # igd: K <= 4 surrogate checkpoints computed on the fly
        assert 1 <= len(params[out]["surrogate_epochs_kept"]) <= 4 and params[out]["gamma"] in (50.0, 100.0)
