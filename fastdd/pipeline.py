"""The distillation pipeline: plan a run, load what it needs, build the method, generate, resume.

`run(spec, options)` is `fastdd distill` (and `fastdd.distill`); `prepare(spec, options)` stops before generating and
returns the sampler and everything else a custom loop needs. The steps: validate the spec, load the generator
(`fastdd.models.loading`), resolve the classes and the real data (`fastdd.data`), build the method
(`fastdd.methods`), wrap its guidances for local class indices, then generate the plan's batches.

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
A batch counts as done only when its record exists and its latents and PNGs match it (`batch_intact`); any other
batch is generated again whole, so a resumed run ends byte-identical to an uninterrupted one. Left-over temp files of a killed run are
removed when the run starts again. The manifest holds no timestamps, so it is byte-identical too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .bench.common import synchronize
from .data.atomic import save_safetensors_atomic, write_bytes_atomic
from .data.classes import resolve_classes
from .data.imagefolder import matches_sha256, save_png_atomic
from .data.real import RealData, real_data
from .environment import versions
from .methods import Method, MethodSetup, Models, RunSpec, get_method
from .methods.base import (
    MAX_IMAGES,
    STATE_DIR,
    WEIGHT_KEYS,
    SamplingSettings,
    check_options,
    default_sample,
)
from .models.loading import load_generator
from .options import record as record_options
from .parallel import distributed_env, resolve_device
from .progress import progress_bar
from .sampling import GaussianDiffusion, GuidedSampler
from .sampling.labels import LocalLabels, label_map
from .sampling.seeds import image_seed

DIGITS_CFG_SCALE = 2.0
DIT_CFG_SCALE = 4.0
_HELD_LOCKS: dict[str, Any] = {}  # run folders this process writes: lock file path -> open, flock-ed handle


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
                raise ValueError(
                    f"--out {self.root} is not empty and holds no fastdd manifest (found {', '.join(foreign[:3])})"
                )
        if self.manifest_path.exists():
            try:
                existing = json.loads(self.manifest_path.read_text())["config"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"{self.manifest_path} is not a fastdd manifest ({err})") from err
            if existing != self.run_config:
                changed = sorted(
                    k for k in set(existing) | set(self.run_config) if existing.get(k) != self.run_config.get(k)
                )
                raise ValueError(
                    f"{self.root} holds another run's manifest (differs in: {', '.join(changed)}); "
                    "resume it with the same options, choose another --out or delete it"
                )

    def start(self) -> None:
        """Create the folder, take its lock (a second process on it is refused), check it again under the lock,
        remove temp files left by a killed run, write the manifest if new."""
        self.check_compatible()
        self.state.mkdir(parents=True, exist_ok=True)
        self.lock()
        self.check_compatible()
        leftovers = [*self.state.rglob("*.tmp*")]  # everything under the state folder is fastdd's own
        for folder in [self.root, *(self.root / n for n in self.class_names)]:
            if folder.is_dir():
                leftovers += folder.glob(".*.tmp")
        for tmp in leftovers:
            if tmp.is_file():
                tmp.unlink()
        if not self.manifest_path.exists():
            self.write_manifest()

    def lock(self) -> None:
        """Hold an exclusive lock on DIR/.fastdd/lock for the rest of the process (ValueError naming the holder's
        pid if another process holds it; this process may start the same folder again)."""
        import fcntl

        path = (self.state / "lock").resolve()
        if str(path) in _HELD_LOCKS:
            return
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(
                f"--out {self.root}: another fastdd process (pid {holder}) is writing this run; wait for "
                "it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_LOCKS[str(path)] = handle  # released when the process ends

    def image_path(self, class_index: int, image: int) -> Path:
        return self.root / self.class_names[class_index] / f"{image}.png"

    def batch_done(self, batch: Batch) -> bool:
        """Whether the batch's record exists (it is written last; `batch_intact` also checks its files)."""
        return self.record_path(batch).exists()

    def record_path(self, batch: Batch) -> Path:
        return self.state / "batches" / f"{batch.index}.json"

    def latents_path(self, batch: Batch) -> Path:
        return self.state / "latents" / f"{batch.index}.safetensors"

    def batch_latents(self, batch: Batch) -> torch.Tensor:
        return load_file(str(self.latents_path(batch)))["latents"]

    def batch_intact(self, batch: Batch) -> bool:
        """Whether a finished batch's record parses and names its images, its latents file has the sha256 the record
        holds (so a file swapped for another batch's, or altered with its header intact, is not restored into the
        memories), and every PNG exists with the sha256 the record holds (a batch that is not is generated again)."""
        try:
            record = json.loads(self.record_path(batch).read_text())
            images = record["images"]
            if [(r["class_index"], r["index"]) for r in images] != batch.items:
                return False
            if not matches_sha256(self.latents_path(batch), record["latents_sha256"]):
                return False
            return all(matches_sha256(self.image_path(c, i), r["sha256"]) for (c, i), r in zip(batch.items, images))
        except Exception:  # missing, unreadable or malformed (an old record format included)
            return False

    def finish_batch(self, batch: Batch, images: torch.Tensor, latents: torch.Tensor, records: list[dict]) -> None:
        """Write the batch's PNGs and latents, then its record (which marks it done): the per-image records, each with
        its PNG's sha256, and the latents file's sha256."""
        for (class_index, image_index), image, record in zip(batch.items, images, records):
            record["sha256"] = save_png_atomic(image, self.image_path(class_index, image_index))
        save_safetensors_atomic({"latents": latents.float()}, self.latents_path(batch))
        latents_sha256 = hashlib.sha256(self.latents_path(batch).read_bytes()).hexdigest()
        write_json_atomic(self.record_path(batch), {"images": records, "latents_sha256": latents_sha256})

    def records(self) -> list[dict]:
        """The per-image records of every finished batch, by class and index."""
        folder = self.state / "batches"
        if not folder.exists():
            return []
        out = []
        for path in sorted(folder.glob("*.json"), key=lambda p: int(p.stem)):
            try:
                out += json.loads(path.read_text())["images"]
            except (ValueError, KeyError, TypeError):  # a corrupt record: its batch is generated again
                continue
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
                        grid.paste(
                            img.resize((tile_w, tile_h), Image.NEAREST), (col * (tile_w + gap), row * (tile_h + gap))
                        )
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
    intact = {b.index for b in mine if run.batch_done(b) and run.batch_intact(b)}
    repaired = [b for b in mine if run.batch_done(b) and b.index not in intact]
    for batch in repaired:  # generated again below, in plan order, so restored memories stay exact
        run.record_path(batch).unlink()
    if repaired:
        count = sum(len(b.items) for b in repaired)
        print(
            f"resume: {count} image(s) of {len(repaired)} finished batch(es) were missing or did not match the "
            "manifest; they are generated again",
            file=sys.stderr,
        )
    done_images = sum(len(b.items) for b in mine if b.index in intact)
    bar = progress_bar(
        total=sum(len(b.items) for b in mine),
        initial=done_images,
        unit="img",
        disable=not progress,
        desc="distill" if world == 1 else f"rank {rank}",
    )
    made = 0
    for batch in mine:
        if batch.index in intact:
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


# ----------------------------------------------------------------------------------------- the run
def run_config(spec: RunSpec, sampling: SamplingSettings, models: Models, data: RealData, method_args: dict) -> dict:
    """Everything that determines the images (compared on resume; the manifest's "config")."""
    return {
        "method": spec.method,
        "ipc": spec.ipc,
        "seed": spec.seed,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "spacing": sampling.spacing,
        "cfg_channels": sampling.cfg_channels,
        "shadow_rows": sampling.shadow_rows,
        "eta": spec.eta,
        "cfg_scale": spec.cfg_scale,
        "compat": spec.compat,
        "precision": spec.precision,
        "model_jacobian": not spec.fast,
        "class_batch": spec.class_batch,
        "images_per_batch": spec.images_per_batch,
        "classes": data.class_names,
        "class_labels": models.class_labels,
        "dataset": data.dataset,
        "data": spec.data,
        **{key: models.description.get(key) for key in WEIGHT_KEYS},
        "vae": models.description.get("vae", "none"),
        "missing_keys": models.description.get("missing_keys"),
        "numerics": models.description.get("numerics"),
        "scheduler": models.description.get("scheduler"),
        "data_fingerprint": data.fingerprint,
        "image_size": models.image_shape[1],
        "channels": models.image_shape[0],
        "method_args": method_args,
    }


@dataclass
class PreparedRun:
    """A planned run with its models, data, method setup and sampler: what `run` generates from, and what a custom
    sampling loop can use directly (`sample_batch`, `sampler`, `models.latent_shape`)."""

    spec: RunSpec
    method: Method
    options: Any
    models: Models
    data: RealData
    setup: MethodSetup
    sampler: GuidedSampler
    plan: list[Batch]
    directory: RunDirectory
    rank: int = 0
    world: int = 1
    prepare_seconds: float = 0.0  # what loading the models and data and building the method took

    def sample_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """(images [B, C, H, W] in [-1, 1] on the CPU, final latents [B, C, h, w], per-image records) of a batch."""
        spec, models = self.spec, self.models
        ids = [(c, i, spec.seed) for c, i in batch.items]
        labels = [models.class_labels[c] for c, _ in batch.items]
        if self.setup.prepare is not None:
            self.setup.prepare([c for c, _ in batch.items])
        if self.setup.sample is not None:
            latents = self.setup.sample(self.sampler, labels, ids, models.latent_shape, models.device)
        else:  # with the batch's sampling steps as a bar under the run's image bar
            steps_bar = spec.progress and self.rank == 0
            latents = default_sample(spec, self.sampler, labels, ids, models.latent_shape, models.device, steps_bar)
        check_final_latents(latents, batch, self.data.class_names)
        with torch.no_grad():
            images = models.codec.decode(latents).float().cpu()
        check_images(images, batch, self.data.class_names)
        records = [{"seed": image_seed(spec.seed, c, i), "label": models.class_labels[c]} for c, i in batch.items]
        return images, latents, records

    def restore(self, batch: Batch, latents: torch.Tensor) -> None:
        """Replay a finished batch into the guidances' memories (resume)."""
        labels = torch.tensor([self.models.class_labels[c] for c, _ in batch.items], device=self.models.device)
        for guidance in self.sampler.guidances:
            guidance.end_batch(latents.to(self.models.device), labels)


def check_final_latents(latents: torch.Tensor, batch: Batch, class_names: list[str]) -> None:
    """ValueError naming the first image whose final latents hold NaN or Inf (nothing of the batch is written)."""
    finite = torch.isfinite(latents).flatten(1).all(1).tolist()
    if not all(finite):
        c, i = batch.items[finite.index(False)]
        raise ValueError(
            f"image {i} of class {class_names[c]!r}: the sampler produced NaN or Inf (likely causes: a "
            "guidance scale too large for this model, or broken weights); nothing of its batch was "
            "written"
        )


SATURATED_SHARE = 0.95  # of an image's values at 0 or 255 once saved ...
NOISE_STEP = 64.0  # ... with a mean step between neighbouring pixels above this (8-bit levels): saturated noise


def degenerate(image: torch.Tensor) -> str | None:
    """Why a decoded image [C, H, W] in [-1, 1] is not a picture, or None: "one flat colour" (every channel constant:
    black, grey, red, ...) or "saturated noise" (≥ 95% of its values clipped to 0 or 255 and a mean jump of more than
    64 levels between neighbouring pixels, as an exploded CFG scale or η makes; a digit on black is saturated but
    smooth)."""
    flat = image.flatten(1)
    if bool((flat.amax(1) == flat.amin(1)).all()):
        return "one flat colour"
    levels = ((image.clamp(-1, 1) + 1) * 127.5).round()
    saturated = ((levels == 0) | (levels == 255)).float().mean()
    steps = torch.cat(
        [(levels[:, 1:] - levels[:, :-1]).abs().flatten(), (levels[:, :, 1:] - levels[:, :, :-1]).abs().flatten()]
    )
    if float(saturated) >= SATURATED_SHARE and float(steps.mean()) > NOISE_STEP:
        return "saturated noise"
    return None


def check_images(images: torch.Tensor, batch: Batch, class_names: list[str]) -> None:
    """ValueError naming the first decoded image [C, H, W] that is `degenerate` (nothing of its batch is written: a
    run never exits 0 with such an image)."""
    for (c, i), image in zip(batch.items, images):
        why = degenerate(image)
        if why is not None:
            raise ValueError(
                f"image {i} of class {class_names[c]!r} decoded to {why} (likely causes: a guidance or CFG scale, or "
                "--eta, too large for this model, or broken model or VAE weights); nothing of its batch was written"
            )


RESERVED_NAMES = ("manifest.json", "preview.png", STATE_DIR)  # and eval_*.json, which `fastdd eval` writes


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved, symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_output_paths(spec: RunSpec, class_names: list[str], model_path: Path | None) -> None:
    """The one check of where a run writes, before anything is written (ValueError naming the option): --out must not
    lie in --data or in a --model / --vae folder (the run's own files would change the inputs it is resumed with),
    nor contain --data; no class folder may take a name the run writes itself (manifest.json, preview.png, the state
    folder, eval_*.json)."""
    for name in class_names:
        if name in RESERVED_NAMES or (name.startswith("eval_") and name.endswith(".json")):
            raise ValueError(f"class {name!r}: fastdd writes a file of that name in --out; rename the class folder")
    sources = [("--data", spec.data), ("--model", model_path), ("--vae", spec.vae)]
    for option, source in sources:
        if source is None or not Path(source).is_dir():
            continue
        if inside(spec.out, source):
            raise ValueError(f"--out {spec.out} lies inside {option} {source}; choose an --out outside it")
        if option == "--data" and inside(source, spec.out):
            raise ValueError(f"--data {source} lies inside --out {spec.out}; choose an --out outside it")


def check_weights(model: torch.nn.Module, option: str) -> None:
    """ValueError naming the first parameter of `model` that holds NaN or Inf."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ValueError(f"{option}: parameter {name} holds NaN or Inf; these weights cannot make images")


def prepare(spec: RunSpec, options: Any = None) -> PreparedRun:
    """Validate, load the generator and the data, build the method and its sampler (ValueError naming the CLI
    option on bad input; nothing is written). options: the method's options dataclass (default: its defaults)."""
    started = time.perf_counter()
    spec.validate()
    method = get_method(spec.method)
    options = method.options() if options is None else options
    if not isinstance(options, method.options):
        raise ValueError(f"options: {spec.method} takes {method.options.__name__}, got {type(options).__name__}")
    check_options(options)
    rank, world, local_rank = distributed_env()
    device = resolve_device(spec.device, local_rank, world)
    sampling = SamplingSettings.of(spec, method)
    if spec.sampler == "dpm-solver++" and method.guides_steps:
        raise ValueError(
            f"--sampler dpm-solver++ runs no guidance (a multistep solver has no single step to guide); "
            f"{spec.method} guides every step: use --sampler ddpm or ddim"
        )
    prior, codec, description = load_generator(
        spec.model,
        spec.vae,
        spec.data,
        device,
        spec.precision,
        spec.allow_missing_keys,
        spec.num_heads,
        sampling.numerics,
        spec.revision,
    )
    check_weights(prior, "--model")
    if getattr(codec, "vae", None) is not None:
        check_weights(codec.vae, "--vae")
    class_names, class_labels, dataset = resolve_classes(
        spec.classes, spec.data, prior.num_classes, description.get("prior_extra", {})
    )
    check_output_paths(spec, class_names, description.get("model_path"))
    if spec.cfg_scale is None:
        spec = dataclasses.replace(spec, cfg_scale=DIGITS_CFG_SCALE if dataset == "digits" else DIT_CFG_SCALE)
    schedule = dict(description.get("schedule", {}))
    folder_spacing = schedule.pop("timestep_spacing", None)
    if spec.spacing is None and folder_spacing is not None and sampling.spacing in ("leading", "trailing"):
        sampling = dataclasses.replace(sampling, spacing=folder_spacing)  # the pipeline's own diffusers spacing
    latent = (prior.in_channels, prior.input_size, prior.input_size)
    image = (codec.image_channels, prior.input_size * codec.downsample, prior.input_size * codec.downsample)
    models = Models(
        prior,
        codec,
        GaussianDiffusion(spec.steps, learn_sigma=prior.learn_sigma, timestep_spacing=sampling.spacing, **schedule),
        latent,
        image,
        class_labels,
        prior.num_classes,
        device,
        description,
    )
    workers = spec.workers if spec.workers is not None else min(4, os.cpu_count() or 1)
    data = real_data(spec.data, dataset, class_names, image, workers=workers, pin_memory=device.type == "cuda")
    if method.needs_data:
        data.require()
    if len(class_names) * spec.ipc > MAX_IMAGES:
        raise ValueError(
            f"--ipc {spec.ipc}: {len(class_names)} classes × {spec.ipc} images is more than fastdd's limit "
            f"of {MAX_IMAGES:,} images per run"
        )
    plan = plan_batches(len(class_names), spec.ipc, spec.class_batch, spec.images_per_batch)
    if sampling.cfg_channels is not None:  # the latent's channels, when it has fewer (a pixel prior)
        sampling = dataclasses.replace(sampling, cfg_channels=min(sampling.cfg_channels, prior.in_channels))
    directory = RunDirectory(spec.out, run_config(spec, sampling, models, data, record_options(options)), class_names)
    directory.check_compatible()
    setup = method.build(options, spec if rank == 0 else dataclasses.replace(spec, quiet=True), models, data)
    table = label_map(class_labels, prior.num_classes)
    sampler = GuidedSampler(
        prior,
        models.diffusion,
        [LocalLabels(g, table) for g in setup.guidances],
        cfg_scale=spec.cfg_scale,
        compat=sampling.shadow_rows,
        cfg_channels=sampling.cfg_channels,
        num_classes=prior.num_classes,
        precision=spec.precision,
        compile=spec.compile,
        cuda_graphs=spec.cuda_graphs,
        model_jacobian=not spec.fast,
    )
    return PreparedRun(
        spec, method, options, models, data, setup, sampler, plan, directory, rank, world, time.perf_counter() - started
    )


class Probe:
    """Timed pieces of a run for the dry run's estimate: each the median of a few calls after a warm-up call."""

    def __init__(self, run: PreparedRun):
        self.run, self._calls = run, {}

    def seconds(self, fn: Callable[[], object], repeats: int = 5, budget: float = 0.5) -> float:
        """Mean seconds of fn over at least `repeats` calls and at least `budget` seconds (at most 200 calls), after
        one untimed warm-up call. The mean, not the median: a run is a sum of calls, and on a machine shared with
        other work the slow calls are part of it."""
        fn()
        device, calls = self.run.models.device, 0
        synchronize(device)
        start = time.perf_counter()
        while calls < repeats or (time.perf_counter() - start < budget and calls < 200):
            fn()
            calls += 1
            synchronize(device)
        return (time.perf_counter() - start) / calls

    def _inputs(self, rows: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device, label = self.run.models.device, self.run.models.class_labels[0]
        x = torch.randn(rows, *shape, device=device)
        full = lambda value: torch.full((rows,), value, device=device, dtype=torch.long)  # noqa: E731
        return x, full(500), full(label)

    def model_call(self, rows: int) -> float:
        """Seconds of one no-grad sampler model call (CFG included) for `rows` images."""
        if rows not in self._calls:
            x, t, y = self._inputs(rows * self.run.sampler.rows_per_image, self.run.models.latent_shape)
            with torch.no_grad():
                self._calls[rows] = self.seconds(lambda: self.run.sampler.model_fn(x, t, y))
        return self._calls[rows]

    def model_train_step(self, rows: int) -> float:
        """Seconds of a forward and backward of the prior on `rows` latents (a fine-tuning step)."""
        x, t, y = self._inputs(rows, self.run.models.latent_shape)
        prior = self.run.models.prior
        parameters = [p for p in prior.parameters() if p.is_floating_point()]
        with torch.enable_grad():
            for p in parameters:
                p.requires_grad_(True)
            try:
                return self.seconds(lambda: prior(x, t, y).float().square().mean().backward())
            finally:
                for p in parameters:
                    p.requires_grad_(False)
                    p.grad = None

    def image_read(self, rows: int) -> float:
        """Seconds to read `rows` of the run's real images through its DataLoader path (file decoding included), per
        image; 0 without real data."""
        data = self.run.data
        rows = min(rows, data.num_images)
        if data.source is None or rows == 0:
            return 0.0
        order = torch.arange(rows)
        return self.seconds(lambda: sum(len(labels) for _, labels in data.batches(order, rows)), repeats=2) / rows

    def encode(self, rows: int) -> float:
        """Seconds of the codec's encoder on `rows` images (the VAE of a latent run; ~0 in pixel space)."""
        models = self.run.models
        x = torch.rand(rows, *models.image_shape, device=models.device) * 2 - 1
        with torch.no_grad():
            return self.seconds(lambda: models.codec.encode(x), repeats=2)

    def network_train_step(self, network: torch.nn.Module, rows: int) -> float:
        """Seconds of a forward and backward of `network` on `rows` images of the run's image shape."""
        network = network.to(self.run.models.device)
        x = torch.randn(rows, *self.run.models.image_shape, device=self.run.models.device)
        with torch.enable_grad():
            return self.seconds(lambda: network(x).float().square().mean().backward())


def estimate_seconds(run: PreparedRun, batches: list[Batch]) -> float:
    """Seconds for this process to generate `batches` (the ones left): the preparation (as long as this one took),
    each batch a timed model call × its sampling steps (guided steps × the method's cost in model calls), plus the
    method's per-run state still to compute for their classes (`Cost.state`, from timed probes). Within 2× of the real time on the digits default and a small --data
    folder for every method (tests/test_api.py, benchmarks/dry_run_estimates.py)."""
    if not batches:
        return 0.0
    probe, cost = Probe(run), run.setup.cost
    steps = cost.sampling_steps or run.spec.steps
    per_step = cost.guided_step_calls * cost.guided_steps
    sampling = sum(probe.model_call(len(b.items)) for b in batches) * (steps + per_step)
    classes = {c for b in batches for c in b.classes}
    state = cost.state(probe, classes) if cost.state is not None else 0.0
    return run.prepare_seconds + sampling + state


def print_plan(run: PreparedRun) -> None:
    """The dry run's report: method, parameters, classes, generator, sampling, data, plan, output, estimate."""
    spec, models, data, plan = run.spec, run.models, run.data, run.plan
    mine = batches_for_rank(plan, run.rank, run.world)
    batch_size = max(len(b.items) for b in plan)
    names = data.class_names
    parameters = sum(p.numel() for p in models.prior.parameters())
    print(f"method      {spec.method}: {run.method.help}")
    print(f"method args {json.dumps(run.setup.params, sort_keys=True)}")
    print(f"classes     {len(names)} ({data.dataset}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    print(
        f"generator   {models.description['model']} ({parameters:,} parameters), latent {list(models.latent_shape)}, "
        f"images {list(models.image_shape)}"
    )
    sampling = run.setup.sampling or (
        f"{spec.sampler}{f' eta {spec.eta}' if spec.sampler == 'ddim' else ''}, {spec.steps} steps "
        f"({models.diffusion.timestep_spacing} spacing)"
    )
    print(
        f"sampling    {sampling}, "
        f"CFG {spec.cfg_scale}{f' on eps[:, :{run.sampler.cfg_channels}]' if run.sampler.cfg_channels else ''}"
        f"{', the official 2-row loop (compat)' if run.sampler.compat else ''}, numerics {models.description['numerics']}, "
        f"{run.setup.cost.guided_steps} guided steps, {spec.precision}{', fast (no DiT Jacobian)' if spec.fast else ''}, "
        f"device {models.device}"
    )
    print(f"data        {data.description}")
    print(
        f"plan        {len(names) * spec.ipc} images in {len(plan)} batches of ≤{batch_size} "
        f"(≤{spec.class_batch} classes × ≤{spec.images_per_batch} images); "
        f"this process (rank {run.rank} of {run.world}): {len(mine)} batches"
    )
    left = [b for b in mine if not (run.directory.batch_done(b) and run.directory.batch_intact(b))]
    print(f"output      {spec.out} ({len(mine) - len(left)} of {len(mine)} batches already done)")
    print(
        f"estimate    ~{estimate_seconds(run, left):.1f} s for this process, for the work left (timed probes: the "
        "sampling steps, the guided steps' backward and the method's per-run state not yet cached)"
    )


@dataclass(frozen=True)
class RunResult:
    """out: the run folder; images: images in the plan; generated: images this process generated now (0 in a dry
    run)."""

    out: Path
    images: int
    generated: int


def run(spec: RunSpec, options: Any = None) -> RunResult:
    """`fastdd distill`: prepare, then generate this process's share of the plan (resuming what is done) and write
    the manifest and preview; a dry run prints the plan and writes nothing."""
    prepared = prepare(spec, options)
    spec, rank, world = prepared.spec, prepared.rank, prepared.world
    total = len(prepared.data.class_names) * spec.ipc
    if spec.dry_run:
        print_plan(prepared)
        return RunResult(Path(spec.out), total, 0)
    directory = prepared.directory
    directory.info = {"versions": versions(), "method_params": prepared.setup.params}
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if prepared.models.device.type == "cuda" else "gloo")
    if world == 1:
        directory.start()
    else:  # rank 0 takes the folder; every rank learns whether it could, so all of them stop in one line if not
        refusal = [None]
        if rank == 0:
            try:
                directory.start()
            except (ValueError, OSError) as err:
                refusal = [err]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            dist.destroy_process_group()
            if rank == 0:
                raise refusal[0]
            raise ValueError(f"rank {rank}: rank 0 could not start the run: {refusal[0]}")
    made = generate(
        directory,
        prepared.plan,
        prepared.sample_batch,
        prepared.restore,
        rank=rank,
        world=world,
        progress=spec.progress and rank == 0,
        update_manifest=rank == 0,
    )
    if world > 1:
        dist.barrier()
    if rank == 0:
        directory.write_manifest(complete=True)
        preview = directory.write_preview(spec.ipc)
        if spec.progress and made == 0 and world == 1:  # (--quiet: nothing but errors)
            print(f"{spec.out} is already complete: {total} images, manifest.json and {preview.name}")
        elif spec.progress:
            print(
                f"wrote {total} images to {spec.out} ({made} generated now by this process), manifest.json and "
                f"{preview.name}"
            )
    if world > 1:
        dist.destroy_process_group()
    return RunResult(Path(spec.out), total, made)


def distill(method: str, ipc: int, out: str | os.PathLike, options: Any = None, **settings: Any) -> RunResult:
    """`fastdd distill` from Python: the same files, bytes and resume as the command line.

    Args:
        method: a registered method name ("dit", "igd", "dap", "mgd3", "d3hr", "sam", "igds").
        ipc: images per class.
        out: the run folder (resumed if it holds this run's manifest).
        options: the method's options (e.g. `IGDOptions(k=5.0)`); default: its defaults.
        **settings: any other `RunSpec` field (data, classes, model, vae, seed, steps, sampler, eta, cfg_scale,
            compat, class_batch, device, precision, images_per_batch, compile, cuda_graphs, fast, dry_run, quiet).

    Returns:
        RunResult(out, images, generated). Raises ValueError (naming the CLI option) on bad input.
    """
    return run(
        RunSpec(method=method, ipc=ipc, out=os.fspath(out) if isinstance(out, os.PathLike) else out, **settings),
        options,
    )
