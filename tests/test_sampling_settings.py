"""The run's sampling settings from the command line: timestep spacing for every sampler, DPM-Solver++, the
combination that reproduces diffusers' DiTPipeline, and --compat's per-method authors' settings in the manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
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


@pytest.mark.parametrize(
    "scheduler",
    [{}, {"set_alpha_to_one": False}, {"steps_offset": 1}, {"beta_end": 0.03, "set_alpha_to_one": False}],
    ids=["dit", "set_alpha_to_one_false", "steps_offset_1", "other_betas"],
)
def test_ddim_with_leading_spacing_reproduces_dit_pipeline(tmp_path, scheduler):
    """`--sampler ddim --spacing leading` on a diffusers pipeline (diffusers numerics, the format's default; CFG on all
    eps channels, one row per image: no --compat) gives DiTPipeline's images from the same initial noise, following
    the folder's scheduler config (betas, set_alpha_to_one, steps_offset)."""
    from diffusers import DiTPipeline

    # DiTPipeline hard-codes the null class 1000: a 1000-class model
    folder = save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=1000, num_layers=2, randomise=True, **scheduler)
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
    assert run.directory.run_config["scheduler"]["set_alpha_to_one"] == scheduler.get("set_alpha_to_one", True)
    latents = run.sampler.ddim_sample(labels, x_start=initial, progress=False)
    images = (run.models.codec.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert expected.std() > 0.01
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    iddpm = run.sampler.replace(diffusion=type(run.models.diffusion)(STEPS, timestep_spacing="iddpm"))
    other = (run.models.codec.decode(iddpm.ddim_sample(labels, x_start=initial, progress=False)) / 2 + 0.5).clamp(0, 1)
    assert (other - expected).abs().max() > 1e-3  # the spacing matters: the default (iddpm) is not DiTPipeline's
    if scheduler:  # the config matters: DiT's default schedule misses these pipelines
        plain = run.sampler.replace(diffusion=type(run.models.diffusion)(STEPS, timestep_spacing="leading"))
        images = run.models.codec.decode(plain.ddim_sample(labels, x_start=initial, progress=False)) / 2 + 0.5
        assert (images.clamp(0, 1) - expected).abs().max() > 2e-5  # (twice the parity tolerance; measured ≥ 4e-5)


def test_a_pipelines_spacing_is_the_default_of_a_diffusers_spacing_method(tmp_path):
    """D3HR (DiTPipeline's leading spacing by default) follows a pipeline whose scheduler says "trailing"; an explicit
    --spacing still wins."""
    folder = save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=1000, timestep_spacing="trailing")
    (tmp_path / "classes.txt").write_text("a 3\nb 7\n")
    data = tmp_path / "data"
    spec = dict(method="d3hr", ipc=1, model=str(folder), classes=str(tmp_path / "classes.txt"), data=str(data),
                dry_run=True, device="cpu", quiet=True)  # fmt: skip
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (i * 40, 80, 120)).save(data / name / f"{i}.png")
    assert (
        fastdd.prepare(fastdd.RunSpec(out=str(tmp_path / "r1"), **spec)).models.diffusion.timestep_spacing == "trailing"
    )
    explicit = fastdd.prepare(fastdd.RunSpec(out=str(tmp_path / "r2"), spacing="leading", **spec))
    assert explicit.models.diffusion.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "scheduler, refused",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction'"),
        ({"clip_sample": True}, "clip_sample: true"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2'"),
        ({"timestep_spacing": "linspace"}, 'timestep_spacing "linspace"'),
    ],
)
def test_a_scheduler_config_fastdd_cannot_follow_is_refused_in_one_line(tmp_path, scheduler, refused):
    folder = save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=1000, **scheduler)
    with pytest.raises(ValueError, match=re.escape(refused)) as error:
        fastdd.prepare(fastdd.RunSpec(method="dit", ipc=1, out=str(tmp_path / "run"), model=str(folder), dry_run=True,
                                      device="cpu", quiet=True))  # fmt: skip
    assert "scheduler_config.json: fastdd cannot follow" in str(error.value) and "\n" not in str(error.value)


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
