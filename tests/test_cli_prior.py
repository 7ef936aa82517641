"""`fastdd prior train` at tiny settings, and the prior shipped for the offline digits default."""

from __future__ import annotations

import torch

from fastdd.cli.main import main
from fastdd.data.digits import DIGITS_CLASSES
from fastdd.prior import hybrid_loss, load_prior
from fastdd.sampling.diffusion import GaussianDiffusion

TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--batch-size", "16", "--quiet", "--device", "cpu"]


def test_prior_train_writes_a_loadable_digits_prior_that_learned(tmp_path):
    out = tmp_path / "prior.safetensors"
    assert (
        main(["prior", "train", "--out", str(out), "--steps", "40", "--lr", "3e-3", "--ema-decay", "0.5", *TINY]) == 0
    )
    model, extra = load_prior(out)
    assert extra["dataset"] == "digits" and extra["classes"] == DIGITS_CLASSES and extra["training"]["steps"] == 40
    assert model.config()["hidden_size"] == 32 and model.in_channels == 1 and model.input_size == 16
    assert not list(tmp_path.glob(".*.tmp"))
    # the trained prior predicts the noise better than a fresh one of the same shape
    from fastdd.data.digits import load_digits_split
    from fastdd.models.dit import DiT

    images, labels = load_digits_split("test")
    diffusion = GaussianDiffusion(1000, 1000, learn_sigma=True)
    fresh = DiT(**{k: v for k, v in model.config().items()}).eval()
    with torch.no_grad():
        losses = [
            hybrid_loss(m, diffusion, images[:256], labels[:256], torch.Generator().manual_seed(0))
            for m in (model, fresh)
        ]
    assert losses[0] < 0.8 * losses[1], losses


def test_prior_train_rejects_bad_options(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["prior", "train", "--out", str(out), "--steps", "0", *TINY]) == 2
    assert "--steps must be > 0" in capsys.readouterr().err
    tiny_but_heads = TINY[2:4] + TINY[6:]  # depth 1 and the rest; hidden 36 passes DiT's multiple-of-4 check
    assert (
        main(
            [
                "prior",
                "train",
                "--out",
                str(out),
                "--steps",
                "1",
                "--hidden-size",
                "36",
                "--num-heads",
                "8",
                *tiny_but_heads,
            ]
        )
        == 2
    )
    assert "num_heads: 8 does not divide hidden_size 36" in capsys.readouterr().err
    assert not out.exists()
    assert main(["prior", "train", "--out", str(out), "--data", str(tmp_path / "none"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_shipped_digits_prior_is_small_and_loads():
    from fastdd.cli.prior import DIGITS_PRIOR_DEFAULTS
    from fastdd.models.loading import DIGITS_PRIOR_PATH

    assert DIGITS_PRIOR_PATH.is_file() and DIGITS_PRIOR_PATH.stat().st_size <= 10 * 2**20
    model, extra = load_prior(DIGITS_PRIOR_PATH)
    assert extra["dataset"] == "digits" and extra["classes"] == DIGITS_CLASSES
    training = extra["training"]
    assert {k: training[k] for k in DIGITS_PRIOR_DEFAULTS} == DIGITS_PRIOR_DEFAULTS  # made by the documented command
    assert model.hidden_size == DIGITS_PRIOR_DEFAULTS["hidden_size"] and model.depth == DIGITS_PRIOR_DEFAULTS["depth"]


def test_a_latent_prior_trains_on_its_vae_and_samples_through_it(tmp_path):
    """`fastdd prior vae` (a diffusers AutoencoderKL) then `fastdd prior train --vae`: the prior records its VAE and
    `--model PRIOR` decodes through it with diffusers' real loading code."""
    import json

    import fastdd

    vae = tmp_path / "assets" / "vae"
    assert main(["prior", "vae", "--out", str(vae), "--image-size", "16", "--channels", "8,8", "--steps", "3",
                 "--batch-size", "8", "--quiet", "--device", "cpu"]) == 0  # fmt: skip
    assert (vae / "config.json").is_file() and json.loads((vae / "config.json").read_text())["scaling_factor"] > 0
    prior = tmp_path / "assets" / "latent_prior.safetensors"
    assert main(["prior", "train", "--vae", str(vae), "--out", str(prior), "--steps", "3", "--image-size", "16",
                 "--patch-size", "2", *TINY]) == 0  # fmt: skip
    model, extra = load_prior(prior)
    assert extra["latent"] == "vae" and extra["vae"] == "vae" and model.in_channels == 4 and model.input_size == 8
    run = fastdd.distill("dit", 1, tmp_path / "run", model=str(prior), steps=2, quiet=True, device="cpu")
    manifest = json.loads((run.out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["image_size"] == 16
    assert main(["prior", "vae", "--out", str(vae), "--image-size", "15", "--quiet"]) == 2
