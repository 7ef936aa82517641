"""The evaluation protocols the papers use: RDED's soft-label protocol (loss, augmentations, teacher formats), the
torchvision-layout networks, the batched-ensemble engine of the hard protocol, and `fastdd report`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli_eval import real_digits_set

from fastdd.cli.main import main
from fastdd.data.dataset import TensorImages
from fastdd.data.digits import load_digits_split
from fastdd.evaluation.common import ImageSet, make_model_factory
from fastdd.evaluation.hard import train_and_evaluate, train_ensemble
from fastdd.evaluation.soft import rded_batch_size, shuffle_patches, soft_loss, validation_epochs
from fastdd.evaluation.teacher import load_teacher
from fastdd.models.torchvision_nets import MobileNetV2, TorchvisionResNet18


def test_the_soft_loss_is_rdeds_kl_divergence_restated():
    """KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) = (1/B) Σ_b Σ_k p_bk (log p_bk − log q_bk), no T²."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=generator), torch.randn(6, 10, generator=generator) * 3
    for temperature in (1.0, 4.0, 20.0):
        p = torch.softmax(teacher / temperature, dim=1)
        log_q = torch.log_softmax(student / temperature, dim=1)
        expected = sum(float((p[b] * (p[b].log() - log_q[b])).sum()) for b in range(6)) / 6
        assert float(soft_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-6)


def test_rded_batch_sizes_and_validation_epochs():
    assert [rded_batch_size(ipc, 10) for ipc in (1, 10, 50)] == [10, 50, 100]
    assert [rded_batch_size(ipc, 1000) for ipc in (1, 10, 50)] == [20, 100, 200]
    assert rded_batch_size(10, 2) == 20  # at most IPC × classes
    assert validation_epochs(300) == [249, 259, 269, 279, 289, 299]
    assert validation_epochs(5) == [4]


def test_shuffle_patches_permutes_the_factor_grid():
    image = torch.arange(16.0).view(1, 4, 4)
    shuffled = shuffle_patches(image, 2, np.random.default_rng(3))
    assert sorted(shuffled.flatten().tolist()) == list(range(16))  # the same pixels
    quadrants = {tuple(image[:, r : r + 2, c : c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)}
    assert {tuple(shuffled[:, r : r + 2, c : c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)} == quadrants
    assert torch.equal(shuffle_patches(image, 1, np.random.default_rng(3)), image)


def test_torchvision_layouts():
    """The parameter counts and key names of torchvision's resnet18 (11,689,512) and mobilenet_v2 (3,504,872)."""
    resnet, mobilenet = TorchvisionResNet18(1000), MobileNetV2(1000)
    assert sum(p.numel() for p in resnet.parameters()) == 11_689_512
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    keys = set(resnet.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.num_batches_tracked", "fc.bias"} <= keys  # fmt: skip
    assert len(keys) == 122
    keys = set(mobilenet.state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight", "features.2.conv.3.bias",
            "features.18.1.running_var", "classifier.1.weight"} <= keys  # fmt: skip
    assert len(keys) == 314


def test_a_torchvision_teacher_loads_strictly_and_keeps_the_sets_imagenet_rows(tmp_path):
    torch.manual_seed(0)
    imagenet = TorchvisionResNet18(1000)
    torch.save({"model": imagenet.state_dict()}, tmp_path / "imagenet.pth")  # torchvision's reference-trainer format
    classes, labels = ["n01440764", "n02102040"], [0, 217]
    teacher, identity = load_teacher(tmp_path / "imagenet.pth", classes, labels, channels=3)
    assert identity["format"] == "torchvision" and identity["rows_kept"] and identity["sha256"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), imagenet.eval()(x)[:, labels])
    broken = {k: v for k, v in imagenet.state_dict().items() if k != "layer3.0.conv1.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing: layer3.0.conv1.weight"):
        load_teacher(tmp_path / "broken.pth", classes, labels, channels=3)
    with pytest.raises(ValueError, match="1000 outputs, the set has 2 classes"):
        load_teacher(tmp_path / "imagenet.pth", classes, None, channels=3)


def test_the_ensemble_engine_computes_the_one_at_a_time_protocol():
    """Seeds trained together draw the same batches and CutMix as one at a time: their accuracies agree within float
    rounding of batched convolutions (here after 12 epochs on 100 digits)."""
    images, labels = load_digits_split("train")
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(10)])
    train = ImageSet(TensorImages(images[keep], labels[keep]), labels[keep], "100 digits")
    val_images, val_labels = load_digits_split("test")
    val = ImageSet(TensorImages(val_images, val_labels), val_labels, "digits test")
    factory = make_model_factory("convnet6", 1, 10, 16)
    together = train_ensemble(factory, train, val, seeds=[0, 1], epochs=12)
    alone = [train_and_evaluate(factory, train, val, seed=s, epochs=12) for s in (0, 1)]
    for a, b in zip(together, alone):
        assert abs(a.final_top1 - b.final_top1) <= 0.02, (a, b)
    assert together[0].final_top1 != together[1].final_top1  # two networks, not one


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "digits_teacher.safetensors"
    assert main(["teacher", "--out", str(path), "--epochs", "2", "--quiet", "--device", "cpu"]) == 0
    return path


def test_soft_labels_from_the_command_line(tmp_path, digits_teacher, capsys):
    folder = real_digits_set(tmp_path / "set", ipc=2)
    args = ["eval", str(folder), "--labels", "soft", "--teacher", str(digits_teacher), "--epochs", "3", "--seeds", "0",
            "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((folder / "eval_convnet6_soft.json").read_text())
    protocol = summary["protocol"]
    assert protocol["name"] == "soft" and protocol["temperature"] == 20 and protocol["batch_size"] == 20
    assert protocol["teacher"]["format"] == "fastdd" and protocol["teacher"]["sha256"] == summary["teacher"]["sha256"]
    assert summary["epochs"] == 3 and len(summary["per_seed"]) == 1
    assert main(["eval", str(folder), "--labels", "soft", "--quiet"]) == 2
    assert "--labels soft needs --teacher" in capsys.readouterr().err


def test_report_renders_runs_and_refuses_mixed_columns(tmp_path, capsys):
    a, b = real_digits_set(tmp_path / "a", ipc=1), real_digits_set(tmp_path / "b", ipc=2)
    for folder, method in ((a, "dit"), (b, "igd")):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["config"] |= {"method": method, "ipc": 1 if folder == a else 2}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert main(["eval", str(folder), "--epochs", "2", "--seeds", "0,1", "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "table")]) == 0
    text = (tmp_path / "table.md").read_text()
    assert "| digits | dit | 1 |" in text and "| digits | igd | 2 |" in text and "convnet6 (hard)" in text
    assert (tmp_path / "table.png").stat().st_size > 0
    other = json.loads((b / "eval_convnet6.json").read_text())
    other["val"]["fingerprint"] = "another validation set"
    (b / "eval_convnet6.json").write_text(json.dumps(other))
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "mixed")]) == 2
    assert "other protocol settings or validation sets" in capsys.readouterr().err


def test_a_list_of_archs_evaluates_each(tmp_path):
    folder = real_digits_set(tmp_path / "set", ipc=1)
    args = ["eval", str(folder), "--arch", "convnet3,mobilenetv2", "--epochs", "1", "--seeds", "0", "--quiet",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    for arch in ("convnet3", "mobilenetv2"):
        summary = json.loads((folder / f"eval_{arch}.json").read_text())
        assert summary["arch"] == arch and summary["engine"] == "sequential"


def test_soft_protocol_restated_batch_step(tmp_path):
    """One training step of the soft protocol equals its restatement: the teacher labels the mixed batch, the loss is
    the KL at T of student and teacher on that batch."""
    from fastdd.evaluation.hard import cutmix
    from fastdd.evaluation.soft import normalise, train_augment

    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    teacher, student = TorchvisionResNet18(10, 1, small_input=True).eval(), make_model_factory("convnet3", 1, 10, 16)()
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    x = normalise(train_augment(images, 16, 2, rng_a))
    mixed, _, _, _ = cutmix(x, labels, rng_a)
    with torch.no_grad():
        target = teacher(mixed)
    ours = soft_loss(student(mixed), target, 20.0)
    x_b = normalise(train_augment(images, 16, 2, rng_b))
    mixed_b, _, _, _ = cutmix(x_b, labels, rng_b)
    with torch.no_grad():
        target_b = F.softmax(teacher(mixed_b) / 20.0, dim=1)
    restated = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student(mixed_b) / 20.0, dim=1), target_b)
    torch.testing.assert_close(ours, restated)


def test_real_val_is_read_batch_by_batch(tmp_path):
    """`--real-val` stays on disk: the validation set is decoded one batch at a time at every check, with the top-1
    of the set held in memory."""
    from PIL import Image

    from fastdd.evaluation.common import top1, validation_set

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    for name in classes:
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(tmp_path / "val" / name / f"{i}.png")
    val, identity = validation_set(tmp_path / "val", {}, classes, 8, 3)
    assert not val.in_memory and identity["images"] == 21
    held = ImageSet(TensorImages(torch.cat([b for b, _ in val.batches()]), val.labels), val.labels, "held")
    model = make_model_factory("convnet3", 3, 3, 8)().eval()
    with torch.no_grad():
        streamed = top1(lambda x: model(x)[None], val, torch.device("cpu"))
        in_memory = top1(lambda x: model(x)[None], held, torch.device("cpu"))
    torch.testing.assert_close(streamed, in_memory)


def test_fastdd_teacher_under_two_gloo_ranks(tmp_path):
    """`torchrun -m fastdd teacher`: DistributedDataParallel over gloo ranks, rank 0 writes a loadable teacher."""
    from test_cli_distill import free_port, run_cli

    out = tmp_path / "teacher.safetensors"
    port = free_port()
    ranks = [
        run_cli(["teacher", "--out", str(out), "--epochs", "1", "--quiet", "--device", "cpu"],
                env_extra={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
        for r in range(2)
    ]  # fmt: skip
    for rank in ranks:
        assert rank.wait(timeout=300) == 0, rank.stderr.read()
    model, identity = load_teacher(out, [str(c) for c in range(10)], list(range(10)), 1)
    assert identity["format"] == "fastdd" and model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
