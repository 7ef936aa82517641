"""Resumable, shardable generation of a distilled ImageFolder.

The plan is fixed by (classes, ipc, class_batch, images_per_batch): batch j holds up to `images_per_batch`
consecutive image indices of every class of a fixed chunk of `class_batch` classes. With images_per_batch 1
every class keeps its one-image-at-a-time order (memories filled by end_batch stay sequential); more images
per batch merge consecutive one-image batches of a chunk (fewer, larger batches, for methods without such
state). Batch composition does not depend on how many processes run. Whole chunks are dealt round-robin over
torch.distributed ranks, each rank writing its own images.

On disk:
  DIR/<class>/<i>.png                PNGs, written to a temp file then renamed
  DIR/.fastdd/batches/<j>.json       one record per finished batch (the resume state)
  DIR/.fastdd/latents/<j>.safetensors  final latents of batch j (to restore memories on resume)
  DIR/manifest.json                  method, parameters, seeds, versions, per-image records (atomic)
  DIR/preview.png                    grid of the images, one row per class (written at the end)
A batch counts as done only when its record exists; an interrupted batch is generated again whole,
so a resumed run ends byte-identical to an uninterrupted one. Left-over temp files of a killed run are
removed when the run starts again. The manifest holds no timestamps, so it is byte-identical too.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .data.atomic import save_safetensors_atomic, write_bytes_atomic
from .data.imagefolder import save_png_atomic

STATE_DIR = ".fastdd"


@dataclass(frozen=True)
class Batch:
    """Batch `index` of the plan: images `image_indices` (consecutive) of every class in `classes`."""

    index: int
    classes: tuple[int, ...]  # class indices
    image_indices: tuple[int, ...]  # image indices within each class

    @property
    def items(self) -> list[tuple[int, int]]:
        """(class, image index) of every row, image-major: the rows of the one-image batches it merges, in plan
        order."""
        return [(c, i) for i in self.image_indices for c in self.classes]


def plan_batches(num_classes: int, ipc: int, class_batch: int, images_per_batch: int = 1) -> list[Batch]:
    """Chunk-major plan: for each chunk of `class_batch` classes, images 0..ipc-1 in order, `images_per_batch`
    at a time (the last group of a chunk holds the ipc % images_per_batch left over)."""
    if ipc <= 0:
        raise ValueError(f"ipc must be > 0, got {ipc}")
    if class_batch <= 0:
        raise ValueError(f"class_batch must be > 0, got {class_batch}")
    if images_per_batch <= 0:
        raise ValueError(f"images_per_batch must be > 0, got {images_per_batch}")
    chunks = [tuple(range(s, min(s + class_batch, num_classes))) for s in range(0, num_classes, class_batch)]
    groups = [tuple(range(s, min(s + images_per_batch, ipc))) for s in range(0, ipc, images_per_batch)]
    plan = []
    for chunk in chunks:
        for group in groups:
            plan.append(Batch(len(plan), chunk, group))
    return plan


def chunk_of(batch: Batch) -> int:
    return batch.classes[0]


def batches_for_rank(plan: list[Batch], rank: int, world: int) -> list[Batch]:
    """Whole class chunks per rank (round-robin), so memories never cross processes."""
    chunks = sorted({chunk_of(b) for b in plan})
    mine = {c for k, c in enumerate(chunks) if k % world == rank}
    return [b for b in plan if chunk_of(b) in mine]


def write_json_atomic(path: Path, data) -> None:
    """JSON (sorted keys, indented) written to a temp file in the same folder, then renamed."""
    write_bytes_atomic((json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), path)


class RunDirectory:
    """The output folder of one distillation run: its manifest, batch records and saved latents."""

    def __init__(self, root: str | Path, run_config: dict, class_names: list[str], info: dict | None = None):
        """run_config: everything that determines the images (compared on resume); info: other manifest content
        (versions, resolved method parameters), not compared."""
        self.root = Path(root)
        self.run_config = json.loads(json.dumps(run_config))  # as it reads back from JSON (tuples -> lists)
        self.class_names = class_names
        self.info = info or {}
        self.state = self.root / STATE_DIR

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def check_compatible(self) -> None:
        """Refuse a file, a folder holding another run's manifest (different method or parameters), or a non-empty
        folder without a manifest (only a killed run's state folder is allowed there)."""
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--out {self.root} exists and is not a folder")
        if self.root.is_dir() and not self.manifest_path.exists():
            foreign = sorted(p.name for p in self.root.iterdir() if p.name != STATE_DIR)
            if foreign:
                raise ValueError(f"--out {self.root} is not empty and holds no fastdd manifest (found {', '.join(foreign[:3])})")
        if self.manifest_path.exists():
            try:
                existing = json.loads(self.manifest_path.read_text())["config"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{self.manifest_path} is not a fastdd manifest ({err})") from err
            if existing != self.run_config:
                changed = sorted(k for k in set(existing) | set(self.run_config) if existing.get(k) != self.run_config.get(k))
                raise ValueError(
                    f"{self.root} holds another run's manifest (differs in: {', '.join(changed)}); "
                    "resume it with the same options, choose another --out or delete it"
                )

    def start(self) -> None:
        """Check the folder, create it, remove temp files left by a killed run, write the manifest if new."""
        self.check_compatible()
        self.state.mkdir(parents=True, exist_ok=True)
        for folder in [self.root, self.state, *(self.state / d for d in ("batches", "latents")),
                       *(self.root / n for n in self.class_names)]:  # fmt: skip
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink()
        if not self.manifest_path.exists():
            self.write_manifest()

    def image_path(self, class_index: int, image: int) -> Path:
        return self.root / self.class_names[class_index] / f"{image}.png"

    def batch_done(self, batch: Batch) -> bool:
        return (self.state / "batches" / f"{batch.index}.json").exists()

    def batch_latents(self, batch: Batch) -> torch.Tensor:
        return load_file(str(self.state / "latents" / f"{batch.index}.safetensors"))["latents"]

    def finish_batch(self, batch: Batch, images: torch.Tensor, latents: torch.Tensor, records: list[dict]) -> None:
        """Write the batch's PNGs and latents, then its record (which marks it done). Adds each PNG's sha256."""
        for (class_index, image_index), image, record in zip(batch.items, images, records):
            record["sha256"] = save_png_atomic(image, self.image_path(class_index, image_index))
        save_safetensors_atomic({"latents": latents.float()}, self.state / "latents" / f"{batch.index}.safetensors")
        write_json_atomic(self.state / "batches" / f"{batch.index}.json", records)

    def records(self) -> list[dict]:
        folder = self.state / "batches"
        if not folder.exists():
            return []
        out = []
        for path in sorted(folder.glob("*.json"), key=lambda p: int(p.stem)):
            out += json.loads(path.read_text())
        return sorted(out, key=lambda r: (r["class_index"], r["index"]))

    def write_manifest(self, complete: bool = False) -> None:
        write_json_atomic(
            self.manifest_path, {"config": self.run_config, **self.info, "complete": complete, "images": self.records()}
        )

    def write_preview(self, ipc: int, max_columns: int = 16, min_tile: int = 32) -> Path:
        """preview.png: one row per class, its first min(ipc, max_columns) images, upscaled (nearest) to at least
        min_tile pixels, 2-pixel gaps. Reads the PNGs written so far (missing ones stay black)."""
        from PIL import Image

        columns = min(ipc, max_columns)
        tiles = [[self.image_path(c, i) for i in range(columns)] for c in range(len(self.class_names))]
        first = next((p for row in tiles for p in row if p.exists()), None)
        if first is None:
            raise ValueError(f"{self.root} holds no images to preview")
        with Image.open(first) as img:
            width, height, mode = img.width, img.height, img.mode
        scale = max(1, -(-min_tile // max(width, height)))
        tile_w, tile_h, gap = width * scale, height * scale, 2
        grid = Image.new(mode, (columns * (tile_w + gap) - gap, len(tiles) * (tile_h + gap) - gap))
        for row, paths in enumerate(tiles):
            for col, path in enumerate(paths):
                if path.exists():
                    with Image.open(path) as img:
                        grid.paste(img.resize((tile_w, tile_h), Image.NEAREST), (col * (tile_w + gap), row * (tile_h + gap)))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        write_bytes_atomic(buffer.getvalue(), self.root / "preview.png")
        return self.root / "preview.png"


def generate(
    run: RunDirectory,
    plan: list[Batch],
    generate_batch: Callable[[Batch], tuple[torch.Tensor, torch.Tensor, list[dict]]],
    restore: Callable[[Batch, torch.Tensor], None] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    update_manifest: bool = True,
) -> int:
    """Run this rank's share of the plan; returns the number of images generated now.

    generate_batch(batch) -> (images [B, C, H, W] in [-1, 1], final latents [B, ...], per-image extra records), one
    row per entry of batch.items.
    restore(batch, latents) replays a finished batch into stateful guidances (memories) on resume.
    """
    mine = batches_for_rank(plan, rank, world)
    done_images = sum(len(b.items) for b in mine if run.batch_done(b))
    bar = tqdm(total=sum(len(b.items) for b in mine), initial=done_images, unit="img", disable=not progress, desc="distill" if world == 1 else f"rank {rank}")
    made = 0
    for batch in mine:
        if run.batch_done(batch):
            if restore is not None:
                restore(batch, run.batch_latents(batch))
            continue
        images, latents, extra = generate_batch(batch)
        records = [
            {
                "class_index": c,
                "class": run.class_names[c],
                "index": i,
                "path": str(run.image_path(c, i).relative_to(run.root)),
                "batch": batch.index,
                **e,
            }
            for (c, i), e in zip(batch.items, extra)
        ]
        run.finish_batch(batch, images, latents, records)
        if update_manifest:
            run.write_manifest()
        made += len(records)
        bar.update(len(records))
    bar.close()
    return made
