"""The run's sampling settings from the command line: timestep spacing for every sampler, DPM-Solver++, the
combination that reproduces diffusers' DiTPipeline, and --compat's per-method authors' settings in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_dit import save_tiny_dit_pipeline

import fastdd
from fastdd.methods import METHODS
from fastdd.sampling.diffusion import diffusers_timesteps, space_timesteps

STEPS = 10


def visited_timesteps(tmp_path: Path, sampler: str, spacing: str | None) -> list[int]:
    """The timesteps at which the digits prior is called while `fastdd distill --method dit` samples one image."""
    run = fastdd.prepare(
        fastdd.RunSpec(
            method="dit", ipc=1, out=str(tmp_path / f"{sampler}-{spacing}"), steps=STEPS, sampler=sampler,
            spacing=spacing, class_batch=1, device="cpu", quiet=True,
        )
    )  # fmt: skip
    seen: list[int] = []
    hook = run.models.prior.register_forward_pre_hook(lambda _, args: seen.append(int(args[1][0])))
    try:
        run.sample_batch(run.plan[0])
    finally:
        hook.remove()
    return list(dict.fromkeys(seen))  # the CFG pair calls the model once per step; keep the order


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_every_sampler_takes_every_spacing(tmp_path, sampler):
    expected = {
        "iddpm": sorted(space_timesteps(1000, str(STEPS)), reverse=True),
        "leading": sorted(diffusers_timesteps(1000, STEPS, "leading"), reverse=True),
        "trailing": sorted(diffusers_timesteps(1000, STEPS, "trailing"), reverse=True),
    }
    assert expected["leading"][:2] == [900, 800] and expected["trailing"][:2] == [999, 899]
    for spacing, timesteps in expected.items():
        assert visited_timesteps(tmp_path, sampler, spacing) == timesteps, spacing
    assert visited_timesteps(tmp_path, sampler, None) == expected["iddpm"]  # the default of every method but d3hr


def test_dpm_solver_refuses_guided_methods(tmp_path):
    with pytest.raises(ValueError, match="dpm-solver\\+\\+ runs no guidance.*igd"):
        fastdd.prepare(fastdd.RunSpec(method="igd", ipc=1, out=str(tmp_path / "x"), sampler="dpm-solver++"))
    assert not (tmp_path / "x").exists()


def test_ddim_with_leading_spacing_reproduces_dit_pipeline(tmp_path):
    """`--sampler ddim --spacing leading` on a diffusers pipeline (diffusers numerics, the format's default; CFG on all
    eps channels, one row per image: no --compat) gives DiTPipeline's images from the same initial noise."""
    from diffusers import DiTPipeline

    # DiTPipeline hard-codes the null class 1000: a 1000-class model
    folder = save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=1000, num_layers=2, randomise=True)
    labels, scale = [3, 7], 4.0
    expected = DiTPipeline.from_pretrained(folder)(
        labels, guidance_scale=scale, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
        output_type="pt",
    ).images  # fmt: skip
    initial = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # DiTPipeline's randn_tensor draw
    (tmp_path / "classes.txt").write_text("a 3\nb 7\n")
    run = fastdd.prepare(
        fastdd.RunSpec(
            method="dit", ipc=1, out=str(tmp_path / "run"), model=str(folder), classes=str(tmp_path / "classes.txt"),
            steps=STEPS, sampler="ddim", spacing="leading", cfg_scale=scale, device="cpu", quiet=True,
        )
    )  # fmt: skip
    assert run.models.description["numerics"] == "diffusers" and run.sampler.cfg_channels is None
    latents = run.sampler.ddim_sample(labels, x_start=initial, progress=False)
    images = (run.models.codec.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert expected.std() > 0.01
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    iddpm = run.sampler.replace(diffusion=type(run.models.diffusion)(STEPS, timestep_spacing="iddpm"))
    other = (run.models.codec.decode(iddpm.ddim_sample(labels, x_start=initial, progress=False)) / 2 + 0.5).clamp(0, 1)
    assert (other - expected).abs().max() > 1e-3  # the spacing matters: the default (iddpm) is not DiTPipeline's


AUTHORS = {  # method -> (numerics, spacing, CFG channels, shadow rows) of its authors' code
    "d3hr": ("diffusers", "leading", None, False),  # diffusers' DiTPipeline
    **{name: ("official", "iddpm", 3, True) for name in ("dit", "igd", "dap", "mgd3", "sam", "igds")},  # DiT's code
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compat_takes_each_methods_authors_settings_and_records_them(tmp_path, method):
    def recorded(**settings) -> tuple:
        run = fastdd.prepare(
            fastdd.RunSpec(method=method, ipc=1, out=str(tmp_path / "x"), dry_run=True, device="cpu", **settings)
        )
        config = run.directory.run_config
        return config["numerics"], config["spacing"], config["cfg_channels"], config["shadow_rows"]

    numerics, spacing, channels, rows = AUTHORS[method]
    assert recorded(compat=True) == (numerics, spacing, channels and 1, rows)  # the digits prior has 1 channel
    assert recorded() == ("official", "leading" if method == "d3hr" else "iddpm", None, False)
    assert recorded(compat=True, spacing="trailing", numerics="official")[:2] == ("official", "trailing")


def test_manifest_records_the_sampling_settings(tmp_path):
    out = tmp_path / "run"
    fastdd.distill("dit", 1, str(out), steps=3, sampler="ddim", spacing="trailing", compat=True, quiet=True)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["sampler"], config["spacing"], config["compat"], config["shadow_rows"]) == (
        "ddim",
        "trailing",
        True,
        True,
    )
    assert (config["numerics"], config["cfg_channels"]) == ("official", 1)  # CFG on eps[:, :3] of a 1-channel prior
