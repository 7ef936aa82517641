"""ImageNet-scale data paths on small inputs: real images read in bounded batches, per-class state computed when a
batch needs it and stored per class (a kill resumes at the next unfinished class), IGD holding only the current
batch's classes' real gradients with 1,000 classes, preparation split over torchrun ranks without changing the bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_distill import free_port, run_cli
from test_run_integrity import tree
from tiny_dit import TINY_PIXEL_DIT, bounded_pixel_dit_, save_tiny_dit_pipeline

import fastdd
from fastdd.data.classes import IMAGENET1K, IMAGENET_INDEX, resolve_classes
from fastdd.data.latents import ClassCache
from fastdd.data.real import real_data


def wnid_folder(root: Path, classes: list[str], per_class: int, size=(10, 12)) -> Path:
    """An ImageNet-shaped ImageFolder: one folder per wnid, odd-sized RGB JPEGs."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([(37 * c) % 255, (91 * c) % 255, 128], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.JPEG")
    return root


def test_imagenet1k_class_list():
    assert len(IMAGENET1K) == 1000 and IMAGENET1K == sorted(IMAGENET1K) and len(set(IMAGENET1K)) == 1000
    assert IMAGENET_INDEX["n01440764"] == 0 and IMAGENET_INDEX["n15075141"] == 999
    assert IMAGENET_INDEX["n02102040"] == 217  # ImageNette's English springer
    names, labels, dataset = resolve_classes("imagenet1k", None, 1000, {})
    assert names == IMAGENET1K and labels == list(range(1000)) and dataset == "imagenet1k"


def test_real_images_are_read_in_bounded_batches(tmp_path):
    folder = wnid_folder(tmp_path / "data", IMAGENET1K[:3], 5)
    data = real_data(str(folder), "custom", IMAGENET1K[:3], (3, 8, 8), workers=2)
    assert data.class_counts() == [5, 5, 5] and data.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    batches = list(data.batches(torch.arange(15), 4))
    assert [len(b) for b, _ in batches] == [4, 4, 4, 3] and batches[0][0].shape == (4, 3, 8, 8)
    order = torch.tensor([14, 0, 7])
    images, labels = next(data.batches(order, 3))
    assert labels.tolist() == [2, 0, 1]
    torch.testing.assert_close(images[1], data.class_images(0, 1)[0])


def test_class_cache_computes_stores_and_holds_a_few_classes(tmp_path):
    calls = []

    def compute(c):
        calls.append(c)
        return torch.full((2,), float(c))

    cache = ClassCache(range(6), compute, tmp_path / "state", keep=2)
    for c in [0, 1, 0, 2, 3, 1]:
        assert float(cache[c][0]) == c
    assert calls == [0, 1, 2, 3] and cache.resident_peak == 2  # class 1 was dropped, then read back from disk
    memory_only = ClassCache(range(6), compute, None, keep=2)
    calls.clear()
    for c in [0, 1, 0, 2, 3, 1]:
        assert float(memory_only[c][0]) == c
    assert calls == [0, 1, 2, 3, 1]  # without a folder a dropped class is computed again
    again = ClassCache(range(6), compute, tmp_path / "state", keep=2)  # a resumed run: nothing recomputed
    calls.clear()
    assert [float(again[c][0]) for c in range(4)] == [0, 1, 2, 3] and calls == []
    assert again.done(3) and not again.done(4)


def test_a_run_killed_during_preparation_resumes_at_the_next_unfinished_class(tmp_path, monkeypatch):
    """MGD3's per-class modes: killed while computing class 4, the rerun computes classes 4.. only, and ends with the
    bytes of an uninterrupted run."""
    import fastdd.methods.mgd3 as mgd3

    fitted = []
    original = mgd3.class_modes

    def counting(latents, ipc, seed=0):
        fitted.append(len(fitted))
        if len(fitted) == 5 and not kill.get("done"):
            kill["done"] = True
            raise KeyboardInterrupt
        return original(latents, ipc, seed=seed)

    kill = {}
    monkeypatch.setattr(mgd3, "class_modes", counting)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fastdd.distill("mgd3", 1, out, steps=3, class_batch=1, quiet=True, device="cpu")
    stored = sorted(p.name for p in out.glob(".fastdd/mgd3_modes_*/*.safetensors"))
    assert stored == [f"{c}.safetensors" for c in range(4)]
    fitted.clear()
    fastdd.distill("mgd3", 1, out, steps=3, class_batch=1, quiet=True, device="cpu")
    assert len(fitted) == 6  # classes 4..9 only
    fastdd.distill("mgd3", 1, tmp_path / "whole", steps=3, class_batch=1, quiet=True, device="cpu")
    assert {k: v for k, v in tree(out).items() if k.endswith(".png")} == {
        k: v for k, v in tree(tmp_path / "whole").items() if k.endswith(".png")
    }


def test_igd_with_1000_classes_holds_only_the_batchs_real_gradients(tmp_path, monkeypatch):
    """An ImageNet-shaped folder (1,000 wnid classes, 2 JPEGs each), IGD computing its surrogate: the real gradients
    live in a per-class cache holding at most --class-batch classes; no [classes, K, P] tensor exists."""
    from fastdd.prior import save_prior

    data = wnid_folder(tmp_path / "imagenet", IMAGENET1K, 2, size=(9, 11))
    torch.manual_seed(0)
    prior = bounded_pixel_dit_(DiT_1000())
    save_prior(prior, tmp_path / "prior.safetensors",
               {"classes": IMAGENET1K, "dataset": "custom", "image_size": 8, "channels": 3, "latent": "pixel"})  # fmt: skip
    seen = []
    original = ClassCache.__getitem__

    def spy(self, c):
        value = original(self, c)
        seen.append(len(self._held))
        return value

    monkeypatch.setattr(ClassCache, "__getitem__", spy)
    out = tmp_path / "run"
    fastdd.distill(
        "igd", 1, out, fastdd.IGDOptions(surrogate_epochs=1, max_checkpoints=2, gamma=0.0), data=str(data),
        classes="imagenet1k", model=str(tmp_path / "prior.safetensors"), steps=8, class_batch=8, quiet=True,
        device="cpu",
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["images"]) == 1000
    assert seen and max(seen) <= 8
    stored = list(out.glob(".fastdd/surrogate_*_real_grads/*.safetensors"))
    assert len(stored) == 1000  # per class, on disk, for a resume


def DiT_1000():
    from fastdd.models.dit import DiT

    return DiT(**(TINY_PIXEL_DIT | {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32}),
               num_classes=1000)  # fmt: skip


@pytest.mark.parametrize("method", ["mgd3", "d3hr"])
def test_two_gloo_ranks_prepare_and_write_the_bytes_of_one(tmp_path, method):
    """A latent pipeline on a folder: per-class latents, modes and statistics computed by the rank owning each class's
    chunk; the same files as one process, preparation included."""
    pipeline = save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=10)
    data = wnid_folder(tmp_path / "data", IMAGENET1K[:4], 3, size=(18, 20))
    (tmp_path / "classes.txt").write_text("".join(f"{w} {i}\n" for i, w in enumerate(IMAGENET1K[:4])))
    extra = ["--d3hr-candidates", "30"] if method == "d3hr" else []
    args = lambda out: ["distill", "--method", method, "--ipc", "2", "--out", str(out), "--model", str(pipeline),  # noqa: E731
                        "--data", str(data), "--classes", str(tmp_path / "classes.txt"), "--class-batch", "1",
                        "--steps", "4", "--quiet", "--device", "cpu", *extra]  # fmt: skip
    single = run_cli(args(tmp_path / "one"))
    assert single.wait(timeout=300) == 0, single.stderr.read()
    port = free_port()
    ranks = [
        run_cli(args(tmp_path / "two"), env_extra={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(2)
    ]  # fmt: skip
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr.read()
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    states = {p.name for p in (tmp_path / "two" / ".fastdd").iterdir()}
    assert any(s.startswith("latents_") for s in states)


def test_a_surrogate_file_without_real_gradients_gets_them_per_class(tmp_path):
    """`fastdd surrogate` leaves ImageNet-size real gradients out of its file; a run computes each class's when a batch
    needs them (the gradients the shipped digits bundle holds), stored per class."""
    from fastdd.guidance.igd import DIGITS_SURROGATE_PATH, SurrogateBundle

    shipped = SurrogateBundle.load(DIGITS_SURROGATE_PATH)
    SurrogateBundle(shipped.config, shipped.flat_params, None, shipped.epochs).save(
        tmp_path / "checkpoints.safetensors"
    )
    out = tmp_path / "run"
    fastdd.distill("igd", 1, out, fastdd.IGDOptions(surrogate=str(tmp_path / "checkpoints.safetensors")), steps=3,
                   class_batch=5, quiet=True, device="cpu")  # fmt: skip
    stored = sorted(out.glob(".fastdd/surrogate_file_*_real_grads/*.safetensors"))
    assert len(stored) == 10
    from safetensors.torch import load_file

    for c in (0, 7):
        computed = load_file(str(stored[0].parent / f"{c}.safetensors"))["value"]
        torch.testing.assert_close(computed, shipped.real_grads[c], rtol=1e-4, atol=1e-6)


def test_photometric_augmentation():
    from fastdd.data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, color_jitter_lighting

    images = torch.rand(3, 3, 5, 6) * 2 - 1
    same = color_jitter_lighting(images, torch.Generator().manual_seed(0), jitter=0.0, lighting=0.0)
    torch.testing.assert_close(same, images)
    lit = color_jitter_lighting(images, torch.Generator().manual_seed(1), jitter=0.0, lighting=0.1)
    shift = (lit - images).flatten(2)  # one RGB shift per image, in the span of ImageNet's principal components
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift))
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    coefficients = torch.linalg.solve(eigvec, shift[..., 0].T / 2).T / torch.tensor(IMAGENET_EIGVAL)
    assert coefficients.abs().max() < 0.6 and coefficients.std() > 0.01  # N(0, 0.1) draws
    jittered = color_jitter_lighting(images, torch.Generator().manual_seed(2), jitter=0.4, lighting=0.0)
    assert not torch.allclose(jittered, images)
    again = color_jitter_lighting(images, torch.Generator().manual_seed(2), jitter=0.4, lighting=0.0)
    assert torch.equal(jittered, again)


DDP_SCRIPT = """
import sys, torch
from fastdd.guidance.igd import SurrogateConfig, train_trajectory
from fastdd.parallel import process_group
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
images, labels = torch.rand(40, 3, 8, 8, generator=generator) * 2 - 1, torch.arange(40) % 4
with process_group(torch.device("cpu")) as (rank, world):
    snapshots = train_trajectory(SurrogateConfig(3, 4, width=8, depth=1, im_size=8), images, labels, epochs=2,
                                 batch_size=16, photometric=True, progress=False)
torch.save({"snapshots": snapshots, "world": world}, sys.argv[1])
"""


def test_training_under_torchrun_is_data_parallel(tmp_path):
    """Two gloo ranks train the surrogate under DistributedDataParallel: each reads half of every batch, with its own
    augmentation draws, and both end with the same parameters after every epoch (DDP averages the gradients)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{r}.pt")], env=env | {"RANK": str(r)},
                         stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr.read()
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert first["world"] == second["world"] == 2
    assert torch.equal(first["snapshots"], second["snapshots"])
    assert not torch.equal(first["snapshots"][0], first["snapshots"][-1])  # it trained


def test_rank_batches_split_every_batch():
    from fastdd.parallel import rank_batches

    order = torch.arange(10)
    assert rank_batches(order, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rank_batches(order, 4, 0, 2) == [[0, 2], [4, 6], [8]]
    assert rank_batches(order, 4, 1, 2) == [[1, 3], [5, 7], [9]]
    assert rank_batches(order, 4, 2, 3) == [[2], [6]]  # the last batch (2 < 3 indices) is dropped for every rank
