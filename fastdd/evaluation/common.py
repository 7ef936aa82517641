"""What every evaluation protocol shares: the distilled set (exactly the manifest's images) and the real validation
set as datasets read in batches, the test networks, accuracy, summaries, and where a summary may be written.

Memory: the distilled set is held decoded in memory while it fits IN_MEMORY_BYTES (training reads each image
thousands of times), else read from disk batch by batch at every epoch; a --real-val folder is always read batch by
batch at every check (a DataLoader with worker processes), so an evaluation's memory does not grow with the
validation set (the built-in digits test split is in memory).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.dataset import FolderImages, TensorImages, load_batches
from ..data.digits import DIGITS_CLASSES, load_digits_split
from ..data.imagefolder import matches_sha256, scan_image_folder
from ..data.real import fingerprint_of
from ..models import ConvNet, ResNet, ResNetAP
from ..models.torchvision_nets import MobileNetV2, TorchvisionResNet18

ARCHS = ("convnet6", "convnet3", "resnetap10", "resnet18", "resnet18-bn", "mobilenetv2")
IN_MEMORY_BYTES = 2 * 2**30


def make_model_factory(arch: str, channels: int, num_classes: int, image_size: int):
    """A function building a fresh network of `arch`: convnet6 (ConvNet-6 at multiples of 64 px, else ConvNet-3),
    convnet3, resnetap10, resnet18 (instance norm, the IGD / Minimax protocols' nets), resnet18-bn and mobilenetv2
    (torchvision's BatchNorm networks, RDED's students; their small-image stems at 64 px and less)."""
    small = image_size <= 64
    if arch == "convnet6":
        depth = 6 if image_size % 64 == 0 else 3
        return lambda: ConvNet(channels, num_classes, width=128, depth=depth, im_size=image_size)
    if arch == "convnet3":
        return lambda: ConvNet(channels, num_classes, width=128, depth=3, im_size=image_size)
    if arch == "resnetap10":
        return lambda: ResNetAP(channels, num_classes, depth=10, im_size=image_size)
    if arch == "resnet18":
        return lambda: ResNet(channels, num_classes, depth=18, im_size=image_size)
    if arch == "resnet18-bn":
        return lambda: TorchvisionResNet18(num_classes, channels, small_input=small)
    if arch == "mobilenetv2":
        return lambda: MobileNetV2(num_classes, channels, small_input=small)
    raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")


# --------------------------------------------------------------------------------------------- the sets
@dataclass
class ImageSet:
    """Images and labels for training or validation: `dataset` (in memory, or decoded on access) and what it is."""

    dataset: Dataset
    labels: Tensor
    description: str

    @property
    def in_memory(self) -> bool:
        return isinstance(self.dataset, TensorImages)

    def batches(self, indices: Tensor | None = None, batch_size: int = 256, workers: int = 0):
        """(images, labels) batches of `indices` (default: all, in order)."""
        indices = torch.arange(len(self.labels)) if indices is None else indices
        return load_batches(self.dataset, indices, batch_size, workers)


def held(images: ImageSet, image_shape: tuple[int, int, int], workers: int) -> ImageSet:
    """The set decoded into memory when it fits IN_MEMORY_BYTES, else as it is (read from disk at every pass)."""
    if images.in_memory or len(images.labels) * 4 * int(torch.tensor(image_shape).prod()) > IN_MEMORY_BYTES:
        return images
    batches = list(images.batches(workers=workers))
    tensors = torch.cat([b for b, _ in batches]) if batches else torch.zeros(0, *image_shape)
    return ImageSet(TensorImages(tensors, images.labels), images.labels, images.description)


def read_manifest(folder: Path) -> dict | None:
    """The manifest `fastdd distill` wrote in folder (None without one); ValueError naming it when unreadable or when a
    field eval reads is malformed: config.classes a list of names, config.image_size a positive int, config.channels
    1 or 3, and every image record {class_index within the classes, class = classes[class_index], index,
    path = "<class>/<index>.png", sha256}."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable fastdd manifest ({type(err).__name__}: {err})") from None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("config"), dict)
        or not all(isinstance(value, list) for value in (manifest["config"].get("classes"), manifest.get("images")))
    ):
        raise ValueError(f"{path} is not a readable fastdd manifest (no config.classes or images list)")
    config, classes = manifest["config"], manifest["config"]["classes"]
    if not all(isinstance(name, str) for name in classes):
        raise ValueError(f"{path}: config.classes must be a list of names")
    for key, valid in (("image_size", lambda v: v > 0), ("channels", lambda v: v in (1, 3))):
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and valid(value)):
            raise ValueError(f"{path}: config.{key} is {value!r}, not a valid {key}")
    for number, record in enumerate(manifest["images"]):
        problem = _record_problem(record, classes)
        if problem:
            raise ValueError(f"{path}: image record {number} {problem}")
    return manifest


def _record_problem(record, classes: list[str]) -> str | None:
    """What is wrong with one manifest image record, or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not a record"
    missing = [k for k in ("class_index", "class", "index", "path", "sha256") if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    c, index = record["class_index"], record["index"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (c, index)) or not 0 <= c < len(classes):
        return f"has class_index {c!r} / index {index!r} outside the {len(classes)} classes"
    if record["class"] != classes[c] or record["path"] != f"{classes[c]}/{index}.png":
        return f"names class {record['class']!r} and path {record['path']!r}, but class_index {c} is {classes[c]!r}"
    if not isinstance(record["sha256"], str):
        return "has no sha256 text"
    return None


def training_set(folder: Path, manifest: dict | None, image_size: int, channels: int) -> tuple[ImageSet, list[str]]:
    """(the distilled images, class names): exactly the manifest's images, each checked against its sha256 (files in
    the class folders that the manifest does not list are left out and named on stderr); without a manifest, every
    image of the ImageFolder."""
    if manifest is None:
        classes, samples = scan_image_folder(folder)
        dataset = FolderImages(samples, image_size, channels)
        return ImageSet(dataset, dataset.classes, f"{folder} ({len(samples)} images)"), classes
    records, classes = manifest["images"], manifest["config"]["classes"]
    if not records:
        raise ValueError(f"{folder / 'manifest.json'} lists no images")
    for record in records:
        path = folder / record["path"]
        if not matches_sha256(path, record["sha256"]):
            raise ValueError(
                f"{path} is missing or not the image the manifest records; resume the run with "
                "`fastdd distill` (same command) to repair it"
            )
    listed = {r["path"] for r in records}
    extra = sorted(
        str(p.relative_to(folder))
        for name in classes
        for p in (folder / name).glob("*")
        if p.is_file() and str(p.relative_to(folder)) not in listed
    )
    if extra:
        print(
            f"eval: left out {len(extra)} file(s) that the manifest does not list: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}",
            file=sys.stderr,
        )
    dataset = FolderImages([(folder / r["path"], r["class_index"]) for r in records], image_size, channels)
    return ImageSet(dataset, dataset.classes, f"{folder} ({len(records)} images)"), classes


def validation_set(
    real_val: str | os.PathLike | None, config: dict, classes: list[str], image_size: int, channels: int
) -> tuple[ImageSet, dict]:
    """(the real validation images, what they are: {"source", "images", "fingerprint"}): --real-val as an ImageFolder
    of the run's classes (ImageNet's val split: one folder per wnid), or the digits test split for a digits set."""
    if real_val is None:
        if config.get("dataset") != "digits" or classes != DIGITS_CLASSES:
            raise ValueError("--real-val is required unless the set was distilled from the digits default")
        images, labels = load_digits_split("test", image_size)
        identity = {"source": "digits test split", "images": len(labels), "fingerprint": "digits:test"}
        return ImageSet(TensorImages(images, labels), labels, "digits test split"), identity
    _, samples = scan_image_folder(real_val, classes)
    listing = [(str(Path(p).relative_to(real_val)), Path(p).stat().st_size) for p, _ in samples]
    identity = {"source": str(real_val), "images": len(samples), "fingerprint": fingerprint_of(listing)}
    dataset = FolderImages(samples, image_size, channels)
    return ImageSet(dataset, dataset.classes, f"{real_val} ({len(samples)} images)"), identity


# --------------------------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    best_top1: float
    final_top1: float
    epochs: int


def summarize(results: list[EvalResult]) -> dict:
    """mean ± std (population std over seeds, as in the papers' tables) of best top-1, in percent."""
    values = [100.0 * r.best_top1 for r in results]
    return {
        "top1_mean": statistics.fmean(values),
        "top1_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def top1(forward, val: ImageSet, device: torch.device, workers: int = 0) -> Tensor:
    """Top-1 accuracy [M] of the M networks forward(images) -> logits [M, b, classes] computes, over the set."""
    correct = None
    for images, labels in val.batches(workers=workers):
        with torch.no_grad():
            hits = (forward(images.to(device)).argmax(-1) == labels.to(device)).sum(-1)
        correct = hits if correct is None else correct + hits
    return correct.double().cpu() / len(val.labels)


class EpochClock:
    """Says, after the first epoch, how long the whole training will take (a long evaluation on a CPU is hours)."""

    def __init__(self, total_epochs: int, what: str, quiet: bool):
        self.total, self.what, self.quiet, self.start = total_epochs, what, quiet, time.perf_counter()
        self.said = False

    def tick(self, epochs_done: int) -> None:
        if self.quiet or self.said or epochs_done < 1:
            return
        self.said = True
        per_epoch = (time.perf_counter() - self.start) / epochs_done
        total = per_epoch * self.total
        when = f"{total / 60:.1f} min" if total < 5400 else f"{total / 3600:.1f} h"
        print(f"eval: ~{when} for {self.what} ({per_epoch:.2f} s per epoch here)", file=sys.stderr)


def summary_path(folder: str | os.PathLike, arch: str, json_path=None, protocol: str = "hard") -> Path:
    """Where `evaluate` writes its summary: json_path, or DIR/eval_<arch>.json (eval_<arch>_soft.json for the soft
    protocol)."""
    return Path(json_path) if json_path else Path(folder) / f"eval_{arch}{'_soft' if protocol == 'soft' else ''}.json"


def check_writable(path: Path, folder: Path, real_val: str | os.PathLike | None) -> None:
    """ValueError naming --json when path cannot be written or would overwrite something eval reads or a run owns
    (checked before any training): inside the distilled folder only a top-level eval_*.json is allowed, nothing
    inside --real-val."""
    resolved = path.resolve()
    if folder.resolve() in resolved.parents and not (
        resolved.parent == folder.resolve() and resolved.name.startswith("eval_") and resolved.suffix == ".json"
    ):
        raise ValueError(
            f"--json {path}: inside the distilled folder only a top-level eval_*.json may be written (this would "
            "overwrite the run's own files)"
        )
    if real_val is not None and Path(real_val).resolve() in resolved.parents:
        raise ValueError(f"--json {path}: inside --real-val {real_val}; write the summary elsewhere")
    target = path if path.exists() else path.parent
    if not target.exists() or not os.access(target, os.W_OK) or (path.exists() and path.is_dir()):
        raise ValueError(f"--json {path}: cannot write there (missing folder, a folder, or no permission)")


def epoch_batches(order: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
