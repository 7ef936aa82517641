"""Teachers of the soft-label protocol: load one (a torchvision-format ResNet-18 / MobileNet-V2 state dict, as RDED and
SRe²L ship theirs, or a network `fastdd teacher` trained) or train one on the real data.

A fastdd teacher file is safetensors: the network's state dict with metadata {"arch", "classes", "image_size",
"channels", "small_input"}. A torchvision file (.pth / .pt: a state dict or {"model": state dict}) has no metadata:
its network is inferred from its keys and shapes (ResNet-18 or MobileNet-V2; conv1 3×3 = the small-image stem); a
1,000-class ImageNet teacher evaluating a subset of ImageNet classes keeps the rows of those classes' labels (RDED's
`pruning_classifier`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..data.atomic import save_safetensors_atomic
from ..data.real import RealData
from ..models.loading import file_digest
from ..models.torchvision_nets import MobileNetV2, TorchvisionResNet18, load_torchvision_state
from ..parallel import data_parallel, group_rank, rank_batches
from ..progress import progress_bar
from .soft import normalise, train_augment

TEACHER_ARCHS = ("resnet18", "mobilenetv2")


def build_teacher(arch: str, num_classes: int, channels: int, small_input: bool) -> nn.Module:
    if arch == "resnet18":
        return TorchvisionResNet18(num_classes, channels, small_input=small_input)
    if arch == "mobilenetv2":
        return MobileNetV2(num_classes, channels, small_input=small_input)
    raise ValueError(f"--arch must be one of {', '.join(TEACHER_ARCHS)}, got {arch!r}")


def load_teacher(
    path: str | Path, classes: list[str], class_labels: list[int] | None, channels: int
) -> tuple[nn.Module, dict]:
    """(the teacher in eval mode, giving logits over `classes` in their order; what it is, for the summary).

    class_labels: the run's model labels of its classes (the manifest's; ImageNet ids for wnids), used to keep a
    1,000-class teacher's rows of those classes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--teacher {path} does not exist")
    identity = {"path": str(path), "sha256": file_digest(path)}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fastdd_teacher", "null") or "null")
        if meta is None:
            raise ValueError(f"--teacher {path} is not a fastdd teacher (no fastdd_teacher metadata)")
        if meta["classes"] != classes:
            raise ValueError(f"--teacher {path} was trained on other classes than the set's ({len(meta['classes'])})")
        model = build_teacher(meta["arch"], len(classes), meta["channels"], meta["small_input"])
        load_torchvision_state(model, load_file(str(path)), f"--teacher {path}")
        return model.eval(), identity | {"arch": meta["arch"], "format": "fastdd"}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint of tensors
        raise ValueError(f"--teacher {path}: cannot read it ({str(err).splitlines()[0][:120]})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state:
        raise ValueError(f"--teacher {path} is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "fc.weight" in state:
        arch, out = "resnet18", state["fc.weight"]
        small = state["conv1.weight"].shape[-1] == 3
        in_channels = state["conv1.weight"].shape[1]
        head = "fc"
    elif "classifier.1.weight" in state:
        arch, out = "mobilenetv2", state["classifier.1.weight"]
        small = False
        in_channels = state["features.0.0.weight"].shape[1]
        head = "classifier.1"
    else:
        raise ValueError(f"--teacher {path} is neither a torchvision ResNet-18 nor a MobileNet-V2 state dict")
    rows = out.shape[0]
    if rows != len(classes):
        if class_labels is None or max(class_labels) >= rows:
            raise ValueError(f"--teacher {path} has {rows} outputs, the set has {len(classes)} classes")
        keep = torch.tensor(class_labels)  # a 1,000-class teacher: the rows of the set's ImageNet labels
        state[f"{head}.weight"], state[f"{head}.bias"] = state[f"{head}.weight"][keep], state[f"{head}.bias"][keep]
    if in_channels != channels:
        raise ValueError(f"--teacher {path} takes {in_channels}-channel images, the set has {channels}")
    model = build_teacher(arch, len(classes), channels, small)
    load_torchvision_state(model, state, f"--teacher {path}")
    return model.eval(), identity | {"arch": arch, "format": "torchvision", "rows_kept": rows != len(classes)}


def train_teacher(
    data: RealData,
    arch: str,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """A teacher trained on the real data, read batch by batch: AdamW, cosine schedule over the epochs, label
    cross-entropy, random resized crops (scale 0.5-1, RDED's crop with factor 2, no patch shuffle) and flips
    (unless flip=False, e.g. digits), inputs normalised as the soft protocol's (`normalise`). In a process group of
    several ranks (torchrun) it trains under DistributedDataParallel, each rank reading its share of every batch."""
    data.require()
    rank, world = group_rank()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    augment_rng = rng if world == 1 else np.random.default_rng([seed, rank + 1])
    first, _ = next(data.batches(torch.arange(1), 1))
    channels, size = first.shape[1], first.shape[-1]
    model = build_teacher(arch, data.num_classes, channels, size <= 64).to(device)
    trained = data_parallel(model, torch.device(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(rank_batches(torch.arange(data.num_images), batch_size, rank, world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in progress_bar(range(epochs), desc=f"teacher {arch}", disable=not progress or rank != 0):
        trained.train()
        order = torch.as_tensor(rng.permutation(data.num_images))
        for images, labels in data.read(rank_batches(order, batch_size, rank, world)):
            images = train_augment(images, size, 2, augment_rng, shuffle=False, flip=flip)
            loss = F.cross_entropy(trained(normalise(images.to(device))), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def save_teacher(path: str | Path, model: nn.Module, arch: str, classes: list[str], image_size: int) -> None:
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    meta = {"arch": arch, "classes": classes, "image_size": image_size, "channels": channels,
            "small_input": bool(getattr(model, "small_input", False))}  # fmt: skip
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(state, path, {"fastdd_teacher": json.dumps(meta)})
