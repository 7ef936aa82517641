"""Evaluation of a distilled set: train a fresh network on it, report top-1 on real validation data.

Hard-label protocol of IGD (SPEC "Evaluation protocol"): AdamW lr 1e-3, wd 0.01, MultiStepLR at 2/3 and
5/6 of the epochs (×0.2), batch 64, CutMix (β = 1, p = 1), epochs by IPC (1 → 3000, ≤10 → 2000,
≤50 → 1500, ≤200 → 1000, else 500), best top-1 on the validation split, mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.atomic import write_bytes_atomic
from .data.digits import DIGITS_CLASSES, load_digits_split
from .data.imagefolder import load_image, load_image_folder, matches_sha256
from .models import ConvNet, ResNet, ResNetAP
from .progress import progress_bar

ARCHS = ("convnet6", "convnet3", "resnetap10", "resnet18")


def epochs_for_ipc(ipc: int) -> int:
    if ipc <= 1:
        return 3000
    if ipc <= 10:
        return 2000
    if ipc <= 50:
        return 1500
    if ipc <= 200:
        return 1000
    return 500


def cutmix(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, beta: float = 1.0):
    """CutMix with λ ~ Beta(β, β), a random box and a random partner permutation.

    images: [B, C, H, W] -> (mixed images, labels, partner labels, λ = the kept area fraction).
    """
    batch, _, height, width = images.shape
    lam = rng.beta(beta, beta)
    perm = torch.as_tensor(rng.permutation(batch), device=images.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return mixed, labels, labels[perm], lam


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


@dataclass
class EvalResult:
    best_top1: float
    final_top1: float
    epochs: int


def train_and_evaluate(
    make_model,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    cutmix_beta: float = 1.0,
    eval_every: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    bar=None,
) -> EvalResult:
    """Train make_model() from seed on (train_images [N,C,H,W], train_labels [N]); best and final val top-1.
    bar: a progress bar to advance by one per epoch (default: one of its own when progress)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs * 2 // 3, epochs * 5 // 6], gamma=0.2)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    val_images, val_labels = val_images.to(device), val_labels.to(device)
    eval_every = eval_every or max(1, epochs // 20)
    best = 0.0
    own_bar = bar is None
    bar = progress_bar(total=epochs, desc=f"eval seed {seed}", disable=not progress, leave=False) if own_bar else bar
    for epoch in range(epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(len(train_labels)), device=device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images, labels_a, labels_b, lam = cutmix(train_images[idx], train_labels[idx], rng, cutmix_beta)
            logits = model(images)
            loss = lam * F.cross_entropy(logits, labels_a) + (1 - lam) * F.cross_entropy(logits, labels_b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            best = max(best, accuracy(model, val_images, val_labels))
        bar.update(1)
    if own_bar:
        bar.close()
    final = accuracy(model, val_images, val_labels)
    return EvalResult(best_top1=max(best, final), final_top1=final, epochs=epochs)


def summarize(results: list[EvalResult]) -> dict:
    """mean ± std (population std over seeds, as in the papers' tables) of best top-1, in percent."""
    values = [100.0 * r.best_top1 for r in results]
    return {
        "top1_mean": statistics.fmean(values),
        "top1_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def make_model_factory(arch: str, channels: int, num_classes: int, image_size: int):
    """A function building a fresh network of `arch` (convnet6 is ConvNet-6 at multiples of 64 px, else ConvNet-3)."""
    if arch == "convnet6":
        depth = 6 if image_size % 64 == 0 else 3
        return lambda: ConvNet(channels, num_classes, width=128, depth=depth, im_size=image_size)
    if arch == "convnet3":
        return lambda: ConvNet(channels, num_classes, width=128, depth=3, im_size=image_size)
    if arch == "resnetap10":
        return lambda: ResNetAP(channels, num_classes, depth=10, im_size=image_size)
    if arch == "resnet18":
        return lambda: ResNet(channels, num_classes, depth=18, im_size=image_size)
    raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")


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


def manifest_training_set(folder: Path, manifest: dict, image_size: int, channels: int) -> tuple[Tensor, Tensor]:
    """(images [N, C, S, S], labels [N]) of exactly the manifest's images, each checked against its sha256; files
    in the class folders that the manifest does not list are left out and named on stderr."""
    records = manifest["images"]
    listed = {r["path"] for r in records}
    for record in records:
        path = folder / record["path"]
        if not matches_sha256(path, record["sha256"]):
            raise ValueError(
                f"{path} is missing or not the image the manifest records; resume the run with "
                "`fastdd distill` (same command) to repair it"
            )
    extra = sorted(
        str(p.relative_to(folder))
        for name in manifest["config"]["classes"]
        for p in (folder / name).glob("*")
        if p.is_file() and str(p.relative_to(folder)) not in listed
    )
    if extra:
        print(
            f"eval: left out {len(extra)} file(s) that the manifest does not list: {', '.join(extra[:5])}"
            f"{' ...' if len(extra) > 5 else ''}",
            file=sys.stderr,
        )
    if not records:
        raise ValueError(f"{folder / 'manifest.json'} lists no images")
    images = torch.stack([load_image(folder / r["path"], image_size, channels) for r in records])
    return images, torch.tensor([r["class_index"] for r in records], dtype=torch.int64)


def summary_path(folder: str | os.PathLike, arch: str, json_path: str | os.PathLike | None = None) -> Path:
    """Where `evaluate` writes its summary: json_path, or DIR/eval_<arch>.json."""
    return Path(json_path) if json_path else Path(folder) / f"eval_{arch}.json"


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


def evaluate(
    folder: str | os.PathLike,
    *,
    real_val: str | os.PathLike | None = None,
    arch: str = "convnet6",
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike | None = None,
    allow_incomplete: bool = False,
    quiet: bool = False,
) -> dict:
    """`fastdd eval` from Python: train `arch` from each seed on a distilled ImageFolder, test on real images.

    Args:
        folder: the distilled set (DIR/<class>/<i>.png with the manifest `fastdd distill` writes: exactly its images
            are used, each checked against its sha256; or a plain ImageFolder with image_size given).
        real_val: real validation ImageFolder (default for digits sets: the digits test split).
        arch: one of ARCHS. seeds: one training run per seed. epochs: >= 1, default by IPC (`epochs_for_ipc`).
        image_size: default from the manifest. device: default cuda when available, else cpu.
        json_path: where the summary is written (default DIR/eval_<arch>.json), after every seed.
        allow_incomplete: evaluate a run whose manifest says it is not complete. quiet: no progress bar.

    Returns:
        {"dir", "arch", "ipc", "epochs", "seeds", "top1_mean", "top1_std", "per_seed", "complete" (every seed ran),
        "run_complete" (the distilled run was finished), "images", "images_planned"} (top-1 in percent). Raises ValueError (naming the CLI option) on bad input, before any training.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"distilled folder {folder} does not exist")
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds is empty")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    manifest = read_manifest(folder)
    config = manifest["config"] if manifest else {}
    if manifest is not None and not manifest.get("complete") and not allow_incomplete:
        raise ValueError(
            f"{folder} is an unfinished run (manifest: complete false); finish it with the same "
            "`fastdd distill` command, or pass --allow-incomplete"
        )
    image_size = image_size or config.get("image_size")
    channels = config.get("channels", 3)
    if image_size is None:
        raise ValueError(f"{folder} has no manifest.json: pass --image-size")
    out = summary_path(folder, arch, json_path)
    check_writable(out, folder, real_val)
    if manifest is not None:
        classes = config["classes"]
        train_x, train_y = manifest_training_set(folder, manifest, image_size, channels)
    else:
        train_x, train_y, classes = load_image_folder(folder, image_size, channels)
    if real_val is None:
        if config.get("dataset") != "digits" or classes != DIGITS_CLASSES:
            raise ValueError("--real-val is required unless the set was distilled from the digits default")
        val_x, val_y = load_digits_split("test", image_size)
    else:
        val_x, val_y, _ = load_image_folder(real_val, image_size, channels, classes=classes)
    ipc = max(int((train_y == c).sum()) for c in range(len(classes)))
    run_complete = manifest is None or bool(manifest.get("complete"))
    planned = len(classes) * config["ipc"] if isinstance(config.get("ipc"), int) else len(train_y)
    if not run_complete:
        print(
            f"eval: {folder} is not a complete run ({len(train_y)} of {planned} images); the summary says so "
            "(run_complete: false)",
            file=sys.stderr,
        )
    epochs = epochs or epochs_for_ipc(ipc)
    factory = make_model_factory(arch, channels, len(classes), image_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: list[EvalResult] = []
    summary: dict = {}
    with progress_bar(total=epochs * len(seeds), desc=f"eval {arch}", unit="epoch", disable=quiet) as bar:
        for seed in seeds:
            bar.set_postfix_str(f"seed {seed}")
            results.append(
                train_and_evaluate(
                    factory, train_x, train_y, val_x, val_y, seed=seed, epochs=epochs, device=device, bar=bar
                )
            )
            summary = {
                "dir": str(folder),
                "arch": arch,
                "ipc": ipc,
                "epochs": epochs,
                "seeds": seeds[: len(results)],
                **summarize(results),
                "complete": len(results) == len(seeds),
                "run_complete": run_complete,
                "images": len(train_y),
                "images_planned": planned,
            }
            write_bytes_atomic((json.dumps(summary, indent=2) + "\n").encode(), out)  # a killed eval keeps it
            if not quiet:
                bar.write(f"eval seed {seed}: top-1 {100 * results[-1].best_top1:.2f}%", file=sys.stdout)
    return summary
