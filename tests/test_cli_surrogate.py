"""`fastdd surrogate` at tiny settings: trajectory, checkpoint selection, real gradients, one file."""

from __future__ import annotations

import torch

from fastdd.cli.main import main
from fastdd.data.digits import load_digits_split
from fastdd.guidance.igd import DIGITS_SURROGATE, DIGITS_SURROGATE_PATH, SurrogateBundle, class_mean_gradient


def test_surrogate_on_digits_saves_checkpoints_and_real_gradients(tmp_path):
    out = tmp_path / "s.safetensors"
    assert (
        main(["surrogate", "--out", str(out), "--epochs", "2", "--epochs-list", "0,2", "--quiet", "--device", "cpu"])
        == 0
    )
    bundle = SurrogateBundle.load(out)
    assert bundle.config == DIGITS_SURROGATE and bundle.epochs == [0, 2]
    params = sum(p.numel() for p in DIGITS_SURROGATE.build().parameters())
    assert bundle.flat_params.shape == (2, params) and bundle.real_grads.shape == (10, 2, params)
    assert not torch.equal(bundle.flat_params[0], bundle.flat_params[1])  # it trained
    images, labels = load_digits_split("train")
    expected = class_mean_gradient(DIGITS_SURROGATE.build().eval(), bundle.flat_params[1], images[labels == 3], 3)
    torch.testing.assert_close(bundle.real_grads[3, 1], expected)


def test_surrogate_algorithm2_picks_epoch_0_first(tmp_path):
    out = tmp_path / "s.safetensors"
    assert (
        main(["surrogate", "--out", str(out), "--epochs", "2", "--threshold", "0.999", "--quiet", "--device", "cpu"])
        == 0
    )
    epochs = SurrogateBundle.load(out).epochs
    assert epochs[0] == 0 and epochs == sorted(set(epochs)) and max(epochs) <= 2


def test_surrogate_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["surrogate", "--out", str(out), "--epochs", "1", "--epochs-list", "0,5", "--quiet"]) == 2
    assert "--epochs-list asks for epoch 5" in capsys.readouterr().err
    assert main(["surrogate", "--out", str(out), "--epochs", "0", "--quiet"]) == 2
    assert (
        main(["surrogate", "--out", str(out), "--replay-buffer", str(tmp_path / "none.pt"), "--epochs-list", "0"]) == 2
    )
    assert not out.exists()


def test_the_shipped_digits_surrogate_loads():
    bundle = SurrogateBundle.load(DIGITS_SURROGATE_PATH)
    assert bundle.config == DIGITS_SURROGATE and bundle.epochs[0] == 0 and bundle.real_grads.shape[0] == 10
