"""fastdd.pipeline: the batch plan, rank sharding, the run folder's resume state and manifest."""
from __future__ import annotations

import json

import pytest
import torch

from fastdd.pipeline import RunDirectory, batches_for_rank, generate, plan_batches


def test_plan_keeps_each_class_in_image_order_and_does_not_depend_on_ranks():
    plan = plan_batches(num_classes=7, ipc=3, class_batch=3)
    assert [b.classes for b in plan[:3]] == [(0, 1, 2)] * 3 and [b.image for b in plan[:3]] == [0, 1, 2]
    assert plan[-1].classes == (6,) and [b.index for b in plan] == list(range(9))
    pairs = [(c, b.image) for b in plan for c in b.classes]
    assert sorted(pairs) == [(c, i) for c in range(7) for i in range(3)]
    for world in (1, 2, 3, 5):
        shards = [batches_for_rank(plan, r, world) for r in range(world)]
        assert sorted(b.index for s in shards for b in s) == list(range(9))  # every batch exactly once
        for s in shards:  # a class never crosses processes
            for other in shards:
                if other is not s:
                    assert not {c for b in s for c in b.classes} & {c for b in other for c in b.classes}
    with pytest.raises(ValueError, match="ipc"):
        plan_batches(3, 0, 1)
    with pytest.raises(ValueError, match="class_batch"):
        plan_batches(3, 1, 0)


def fake_batch(batch):
    images = torch.stack([torch.full((1, 4, 4), (c + batch.image) / 10 - 0.5) for c in batch.classes])
    return images, images.clone(), [{"seed": c} for c in batch.classes]


def test_generate_skips_finished_batches_and_restores_them_in_order(tmp_path):
    plan = plan_batches(3, 2, 2)
    run = RunDirectory(tmp_path / "run", {"a": 1}, ["x", "y", "z"], info={"versions": {}})
    run.start()
    assert generate(run, plan[:2], fake_batch, progress=False) == 4
    restored = []
    made = generate(run, plan, fake_batch, lambda b, latents: restored.append((b.index, latents.shape[0])), progress=False)
    assert made == 2 and restored == [(0, 2), (1, 2)]
    run.write_manifest(complete=True)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["complete"] and [r["path"] for r in manifest["images"]] == ["x/0.png", "x/1.png", "y/0.png", "y/1.png", "z/0.png", "z/1.png"]
    assert all(len(r["sha256"]) == 64 for r in manifest["images"])


def test_run_directory_refuses_other_runs_and_cleans_temp_files(tmp_path):
    root = tmp_path / "run"
    run = RunDirectory(root, {"seed": 0}, ["x"])
    run.start()
    (root / "x").mkdir()
    (root / "x" / ".0.png.abc.tmp").write_bytes(b"partial")
    RunDirectory(root, {"seed": 0}, ["x"]).start()  # same config: resumes, drops the temp file
    assert not list(root.rglob("*.tmp"))
    with pytest.raises(ValueError, match="differs in: seed"):
        RunDirectory(root, {"seed": 1}, ["x"]).check_compatible()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        RunDirectory(tmp_path / "file", {}, ["x"]).check_compatible()
