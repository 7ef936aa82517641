"""Evaluation of a distilled set: train fresh networks on it, report top-1 on real validation data, under the protocols
the papers use: IGD's hard-label protocol (`hard`, the default where it applies: ImageNette, ImageWoof, digits) and
RDED's soft-label protocol with a teacher (`soft`: IGD's and DAP's ImageNet-1K numbers). `report` gathers several runs'
summaries into one table."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.atomic import write_bytes_atomic
from ..progress import progress_bar
from . import hard, soft
from .common import (
    ARCHS,
    EpochClock,
    EvalResult,
    check_writable,
    held,
    make_model_factory,
    read_manifest,
    summarize,
    summary_path,
    training_set,
    validation_set,
)
from .hard import cutmix, ensemble_ready, epochs_for_ipc, train_and_evaluate, train_ensemble
from .report import report
from .teacher import load_teacher, train_teacher

PROTOCOLS = ("hard", "soft")


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
    labels: str = "hard",
    teacher: str | os.PathLike | None = None,
    temperature: float | None = None,
    soft_factor: int | None = None,
    input_size: int | None = None,
    ensemble: bool = False,
    workers: int = 0,
) -> dict:
    """`fastdd eval` from Python: train `arch` from each seed on a distilled ImageFolder, test on real images.

    Args:
        folder: the distilled set (DIR/<class>/<i>.png with the manifest `fastdd distill` writes: exactly its images
            are used, each checked against its sha256; or a plain ImageFolder with image_size given).
        real_val: real validation ImageFolder (default for digits sets: the digits test split).
        arch: one of ARCHS. seeds: one training run per seed. epochs: >= 1 (default: the protocol's).
        image_size: default from the manifest. device: default cuda when available, else cpu.
        json_path: where the summary is written (default `summary_path`), after every seed.
        allow_incomplete: evaluate a run whose manifest says it is not complete. quiet: no progress output.
        labels: "hard" (IGD's protocol) or "soft" (RDED's, with `teacher`). teacher: the soft protocol's teacher file
            (`fastdd.evaluation.teacher.load_teacher`). temperature, soft_factor, input_size: the soft protocol's T
            (20), crop / patch factor (2) and training size (224 for images >= 224 px, else theirs).
        ensemble: train the seeds of the hard protocol together (`hard.train_ensemble`, vmap) when the set is in
            memory and the network has no BatchNorm statistics (the same protocol); default False, one after
            another: on a 2-core CPU the ensemble took 1.42× as long (benchmarks/eval_speed.py).
        workers: DataLoader worker processes for sets read from disk.

    Returns:
        {"dir", "arch", "protocol", "ipc", "epochs", "seeds", "top1_mean", "top1_std", "per_seed", "complete",
        "run_complete", "images", "images_planned", "val", "teacher", "seconds"} (top-1 in percent). Raises
        ValueError (naming the CLI option) on bad input, before any training.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"distilled folder {folder} does not exist")
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if labels not in PROTOCOLS:
        raise ValueError(f"--labels must be one of {', '.join(PROTOCOLS)}, got {labels!r}")
    if labels == "soft" and teacher is None:
        raise ValueError("--labels soft needs --teacher FILE (a torchvision ResNet-18 state dict or `fastdd teacher`)")
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
    out = summary_path(folder, arch, json_path, labels)
    check_writable(out, folder, real_val)
    train, classes = training_set(folder, manifest, image_size, channels)
    val, val_identity = validation_set(real_val, config, classes, image_size, channels)
    teacher_model, teacher_identity = None, None
    if labels == "soft":
        teacher_model, teacher_identity = load_teacher(teacher, classes, config.get("class_labels"), channels)
    shape = (channels, image_size, image_size)
    train = held(train, shape, workers)  # read thousands of times; the validation set is streamed at each check
    ipc = max(int((train.labels == c).sum()) for c in range(len(classes)))
    run_complete = manifest is None or bool(manifest.get("complete"))
    planned = len(classes) * config["ipc"] if isinstance(config.get("ipc"), int) else len(train.labels)
    if not run_complete:
        print(
            f"eval: {folder} is not a complete run ({len(train.labels)} of {planned} images); the summary says so "
            "(run_complete: false)",
            file=sys.stderr,
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    factory = make_model_factory(arch, channels, len(classes), image_size)
    if labels == "hard":
        epochs = epochs or epochs_for_ipc(ipc)
        protocol = dict(hard.PROTOCOL, epochs=epochs)
    else:
        epochs = epochs or soft.RDED_EPOCHS
        input_size = input_size or (224 if image_size >= 224 else image_size)
        batch = soft.rded_batch_size(ipc, len(classes))
        temperature = soft.RDED_TEMPERATURE if temperature is None else temperature
        factor = soft.RDED_FACTOR if soft_factor is None else soft_factor
        protocol = dict(soft.PROTOCOL, epochs=epochs, batch_size=batch, temperature=temperature, factor=factor,
                        input_size=input_size, lr=soft.rded_lr(arch), teacher=teacher_identity)  # fmt: skip
        factory = make_model_factory(arch, channels, len(classes), input_size)
    together = labels == "hard" and ensemble and len(seeds) > 1 and ensemble_ready(factory, train)
    started = time.perf_counter()
    results: list[EvalResult] = []
    summary: dict = {}

    def record(done: list[EvalResult]) -> dict:
        summary = {
            "dir": str(folder),
            "arch": arch,
            "protocol": protocol,
            "ipc": ipc,
            "epochs": epochs,
            "seeds": seeds[: len(done)],
            **summarize(done),
            "complete": len(done) == len(seeds),
            "run_complete": run_complete,
            "images": len(train.labels),
            "images_planned": planned,
            "val": val_identity,
            "teacher": teacher_identity,
            "engine": "ensemble" if together else "sequential",
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_bytes_atomic((json.dumps(summary, indent=2) + "\n").encode(), out)  # a killed eval keeps it
        return summary

    what = f"{len(seeds)} seed{'s' * (len(seeds) > 1)} × {epochs} epochs of {arch} ({labels} labels)"
    clock = EpochClock(epochs if together else epochs * len(seeds), what, quiet)
    with progress_bar(total=epochs * len(seeds), desc=f"eval {arch}", unit="epoch", disable=quiet) as bar:

        def said(done: list[EvalResult]) -> None:
            for seed, result in zip(seeds[len(results) - len(done) :], done):
                if not quiet:
                    bar.write(f"eval seed {seed}: top-1 {100 * result.best_top1:.2f}%", file=sys.stdout)

        if together:
            results = train_ensemble(
                factory, train, val, seeds=seeds, epochs=epochs, device=device, bar=bar, clock=clock
            )
            summary = record(results)
            said(results)
        for seed in [] if together else seeds:
            bar.set_postfix_str(f"seed {seed}")
            if labels == "hard":
                result = train_and_evaluate(factory, train, val, seed=seed, epochs=epochs, device=device,
                                            workers=workers, bar=bar, clock=clock)  # fmt: skip
            else:
                result = soft.train_soft(factory, teacher_model, train, val, seed=seed, epochs=epochs,
                                         batch_size=protocol["batch_size"], lr=protocol["lr"], input_size=input_size,
                                         temperature=temperature, factor=factor, device=device, workers=workers,
                                         bar=bar, clock=clock)  # fmt: skip
            results.append(result)
            summary = record(results)
            said([result])
    return summary


__all__ = [
    "ARCHS",
    "PROTOCOLS",
    "EvalResult",
    "cutmix",
    "epochs_for_ipc",
    "evaluate",
    "load_teacher",
    "read_manifest",
    "report",
    "summary_path",
    "train_and_evaluate",
    "train_ensemble",
    "train_teacher",
]
