"""fastdd.pipeline: the batch plan, rank sharding, the run folder's resume state and manifest."""

from __future__ import annotations

import json

import pytest
import torch

from fastdd.pipeline import RunDirectory, batches_for_rank, generate, plan_batches


def test_plan_keeps_each_class_in_image_order_and_does_not_depend_on_ranks():
    plan = plan_batches(num_classes=7, ipc=3, class_batch=3)
    assert [b.classes for b in plan[:3]] == [(0, 1, 2)] * 3 and [b.image_indices for b in plan[:3]] == [
        (0,),
        (1,),
        (2,),
    ]
    assert plan[-1].classes == (6,) and [b.index for b in plan] == list(range(9))
    pairs = [item for b in plan for item in b.items]
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
    with pytest.raises(ValueError, match="images_per_batch"):
        plan_batches(3, 1, 1, 0)


def test_plan_with_several_images_per_batch_merges_consecutive_one_image_batches():
    one = plan_batches(num_classes=5, ipc=5, class_batch=2)
    plan = plan_batches(num_classes=5, ipc=5, class_batch=2, images_per_batch=2)
    assert [(b.classes, b.image_indices) for b in plan] == [
        (chunk, images) for chunk in ((0, 1), (2, 3), (4,)) for images in ((0, 1), (2, 3), (4,))
    ]  # chunk-major, the last group of each chunk holds ipc % 2 images
    assert [b.index for b in plan] == list(range(9))
    assert plan[0].items == [(0, 0), (1, 0), (0, 1), (1, 1)]  # image-major rows
    assert [item for b in plan for item in b.items] == [item for b in one for item in b.items]  # the same row order
    for world in (1, 2, 3):  # whole chunks per rank, as with one image per batch
        shards = [batches_for_rank(plan, r, world) for r in range(world)]
        assert [{c for b in s for c in b.classes} for s in shards] == [
            {c for b in batches_for_rank(one, r, world) for c in b.classes} for r in range(world)
        ]
    assert [b.image_indices for b in plan_batches(1, 3, 1, images_per_batch=8)] == [(0, 1, 2)]


def fake_batch(batch):
    images = torch.stack([torch.full((1, 4, 4), (c + 3 * i) / 10 - 0.5) for c, i in batch.items])
    return images, images.clone(), [{"seed": 10 * c + i} for c, i in batch.items]


def test_generate_skips_finished_batches_and_restores_them_in_order(tmp_path):
    plan = plan_batches(3, 2, 2)
    run = RunDirectory(tmp_path / "run", {"a": 1}, ["x", "y", "z"], info={"versions": {}})
    run.start()
    assert generate(run, plan[:2], fake_batch, progress=False) == 4
    restored = []
    made = generate(
        run, plan, fake_batch, lambda b, latents: restored.append((b.index, latents.shape[0])), progress=False
    )
    assert made == 2 and restored == [(0, 2), (1, 2)]
    run.write_manifest(complete=True)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["complete"] and [r["path"] for r in manifest["images"]] == [
        "x/0.png",
        "x/1.png",
        "y/0.png",
        "y/1.png",
        "z/0.png",
        "z/1.png",
    ]
    assert all(len(r["sha256"]) == 64 for r in manifest["images"])


def test_several_images_per_batch_write_the_same_images_and_records(tmp_path):
    runs = {}
    for per_batch in (1, 2):
        run = RunDirectory(tmp_path / str(per_batch), {"a": 1}, ["x", "y", "z"], info={})
        run.start()
        plan = plan_batches(3, 3, 2, per_batch)
        assert generate(run, plan, fake_batch, progress=False) == 9
        run.write_manifest(complete=True)
        runs[per_batch] = run
    for path in sorted(runs[1].root.glob("*/*.png")):
        assert (runs[2].root / path.relative_to(runs[1].root)).read_bytes() == path.read_bytes()
    records = {n: [{k: v for k, v in r.items() if k != "batch"} for r in run.records()] for n, run in runs.items()}
    assert records[1] == records[2] and len(records[1]) == 9
    assert [r["seed"] for r in records[2]] == [10 * c + i for c in range(3) for i in range(3)]
    assert [r["batch"] for r in runs[2].records() if r["class"] == "x"] == [0, 0, 1]


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
