"""`fastdd distill`: generate a distilled ImageFolder with a registered method (fastdd/methods.py).

    fastdd distill --method igd --ipc 10 --out DIR            # offline default: digits + the bundled prior
    torchrun --nproc_per_node=N -m fastdd distill ...          # classes sharded over ranks (whole class chunks)

Writes DIR/<class>/<i>.png, DIR/manifest.json and DIR/preview.png; resumable (see fastdd/pipeline.py): start the
same command again after a crash. The images depend only on the run config (not on the device count); every
argument except --device, --dry-run, --quiet, --compile and --cuda-graphs is part of it, and a folder made with
another config is refused. --images-per-batch is part of it although it changes the images of no method but igds
(its entropy term spans the batch; other methods: at most float rounding of larger matrix products, none on CPU for
dit, mgd3, d3hr and sam): the resume state is kept per batch, so a run resumes with the value it began with.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..data.classes import IMAGENET_INDEX, NAMED_CLASS_LISTS, resolve_class_entries
from ..data.digits import DIGITS_CLASSES, load_digits_split
from ..data.imagefolder import load_image_folder, scan_image_folder
from ..methods import METHODS, LocalLabels, MethodContext, Models, RealData, get_method, label_map
from ..pipeline import STATE_DIR, RunDirectory, batches_for_rank, generate, plan_batches
from ..sampling import GaussianDiffusion, GuidedSampler
from ..sampling.seeds import image_seed
from .errors import UsageError
from .info import package_version

DIGITS_PRIOR_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_prior.safetensors"
DIGITS_CFG_SCALE = 2.0
DIT_CFG_SCALE = 4.0


# ----------------------------------------------------------------------------------------- helpers
def file_digest(path: Path, limit: int = 200 * 2**20) -> str:
    """sha256 of a file up to `limit` bytes (else 'size:<bytes>'), so a changed checkpoint is noticed on resume."""
    size = path.stat().st_size
    if size > limit:
        return f"size:{size}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    return {"python": platform.python_version()} | {
        package: package_version(package) for package in ("fastdd", "torch", "diffusers", "safetensors", "numpy")
    }


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str, local_rank: int, world: int) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available")
        if world > 1 and device.index is None:
            device = torch.device("cuda", local_rank)
    return device


# ----------------------------------------------------------------------------------------- models and classes
def load_generator(args, device: torch.device) -> tuple[torch.nn.Module, object, dict]:
    """(DiT, codec, description). --model: a fastdd prior (.safetensors from `fastdd prior train`), an official DiT
    checkpoint (.pt / .pth / .safetensors), or a diffusers DiT (hub id or folder). Default: the bundled digits
    prior without --data, else facebook/DiT-XL-2-256."""
    from ..models.vae import LatentCodec, PixelCodec
    from ..prior import load_prior

    spec = args.model or (str(DIGITS_PRIOR_PATH) if args.data is None else "facebook/DiT-XL-2-256")
    path = Path(spec)
    if args.model is None and args.data is None and not path.is_file():
        raise ValueError(f"the bundled digits prior {path} is missing; make it with `fastdd prior train --out {path}`")
    description = {"model": spec if args.model else ("bundled digits prior" if args.data is None else spec)}
    fastdd_prior = False
    if path.is_file():
        description["model_sha256"] = file_digest(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    fastdd_prior = "fastdd_dit_config" in (f.metadata() or {})
            except Exception as err:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"--model {path} is not a readable safetensors file ({err})") from None
    if fastdd_prior:
        try:
            model, extra = load_prior(path, device)
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"--model {path}: checkpoint does not match its DiT config ({err})") from None
        if args.vae not in (None, "none"):
            raise ValueError(f"--vae: {path} is a pixel-space prior; it takes no VAE")
        codec = PixelCodec(model.in_channels)
        description.update(prior_extra=extra)
    else:
        from ..models.dit import load_diffusers_dit, load_dit_checkpoint

        if not path.exists() and (path.suffix in (".pt", ".pth", ".safetensors", ".bin") or spec.startswith((".", "/"))):
            raise ValueError(f"--model {spec} does not exist")
        try:
            if path.is_file():
                model = load_dit_checkpoint(str(path), strict=False, device=device)
            else:
                model = load_diffusers_dit(spec).to(device)
        except (OSError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"--model {spec}: cannot load a DiT ({type(err).__name__}: {str(err).splitlines()[0]})") from None
        vae = args.vae or "mse"
        codec = PixelCodec(model.in_channels) if vae == "none" else LatentCodec.from_pretrained(
            vae, device=device, channels_last=device.type == "cuda", precision=args.precision)
        description.update(vae=vae)
        extra = {}
    if codec.latent_channels != model.in_channels:
        raise ValueError(f"--model {spec} takes {model.in_channels} channels, the VAE makes {codec.latent_channels}")
    return model.eval().requires_grad_(False), codec, description | {"extra": extra}


def resolve_classes(args, model, prior_extra: dict) -> tuple[list[str], list[int], str]:
    """(class names, model label per class, dataset kind) from --classes / --data / the prior."""
    prior_classes = prior_extra.get("classes")
    if args.classes is not None:
        entries = resolve_class_entries(args.classes)
        dataset = args.classes if args.classes in NAMED_CLASS_LISTS else "custom"
    elif args.data is not None:
        entries = [(name, None) for name in scan_image_folder(args.data)[0]]
        dataset = "custom"
    else:
        entries = [(name, None) for name in (prior_classes or DIGITS_CLASSES)]
        dataset = "digits" if prior_extra.get("dataset", "digits") == "digits" else "custom"
    named = args.classes in NAMED_CLASS_LISTS
    names, labels = [], []
    for position, (name, label) in enumerate(entries):
        if prior_classes is not None:
            if name not in prior_classes:
                raise ValueError(f"--classes: the prior knows no class {name!r} (it has {', '.join(prior_classes)})")
            label = prior_classes.index(name)
        elif label is not None and (not named or model.num_classes == 1000):
            pass  # a label from a --classes file, or the ImageNet id of a named list for a 1000-class DiT
        elif model.num_classes == 1000 and name in IMAGENET_INDEX:
            label = IMAGENET_INDEX[name]
        elif model.num_classes == len(entries):
            label = position
        else:
            raise ValueError(f"--classes: no model label for class {name!r}; the model has {model.num_classes} classes, "
                             "give 'name label' lines in a --classes file")  # fmt: skip
        if not 0 <= label < model.num_classes:
            raise ValueError(f"--classes: class {name!r} maps to label {label}, the model has {model.num_classes} classes")
        names.append(name)
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise ValueError("--classes: two classes map to the same model label")
    return names, labels, dataset


def real_data(args, dataset: str, class_names: list[str], image_shape, verify: bool = True) -> RealData:
    """Real images of the classes: --data (checked now: folders exist and hold images; with verify, every image
    opens: pass False when the caller loads them at once, which names an unreadable image itself), or the
    digits train split; loaded on first use."""
    channels, size, _ = image_shape
    if args.data is not None:
        _, samples = scan_image_folder(args.data, class_names)
        if verify:
            from PIL import Image, UnidentifiedImageError

            for path, _ in samples:
                try:
                    with Image.open(path) as img:
                        img.verify()
                except (OSError, UnidentifiedImageError) as err:
                    raise ValueError(f"--data: cannot read image {path} ({err})") from None

        def load_folder():
            images, labels, _ = load_image_folder(args.data, size, channels, classes=class_names)
            return images, labels

        return RealData(load_folder, f"{args.data} ({len(samples)} images)")
    if dataset == "digits":
        positions = {name: i for i, name in enumerate(DIGITS_CLASSES)}

        def load_digits():
            images, labels = load_digits_split("train", size)
            keep = [positions[n] for n in class_names]
            mask = torch.isin(labels, torch.tensor(keep))
            local = torch.tensor([keep.index(int(v)) for v in labels[mask]])
            return images[mask], local

        return RealData(load_digits, "digits train split")

    def missing():
        raise ValueError("--data: this method needs real images of the classes")

    return RealData(missing, "none")


# ----------------------------------------------------------------------------------------- run
def run_config(args, class_names, class_labels, models: Models, dataset: str, method_args: dict) -> dict:
    return {
        "method": args.method,
        "ipc": args.ipc,
        "seed": args.seed,
        "steps": args.steps,
        "sampler": args.sampler,
        "eta": args.eta,
        "cfg_scale": args.cfg_scale,
        "compat": args.compat,
        "precision": args.precision,
        "model_jacobian": not args.fast,
        "class_batch": args.class_batch,
        "images_per_batch": args.images_per_batch,
        "classes": class_names,
        "class_labels": class_labels,
        "dataset": dataset,
        "data": args.data,
        "model": models.description["model"],
        "model_sha256": models.description.get("model_sha256"),
        "vae": models.description.get("vae", "none"),
        "image_size": models.image_shape[1],
        "channels": models.image_shape[0],
        "method_args": method_args,
    }


def validate(args) -> None:
    if args.ipc is None or args.ipc <= 0:
        raise UsageError(f"--ipc must be > 0, got {args.ipc}")
    if args.steps <= 1:
        raise UsageError(f"--steps must be > 1, got {args.steps}")
    if args.class_batch <= 0:
        raise UsageError(f"--class-batch must be > 0, got {args.class_batch}")
    if args.images_per_batch <= 0:
        raise UsageError(f"--images-per-batch must be > 0, got {args.images_per_batch}")
    if args.cfg_scale is not None and args.cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    try:
        get_method(args.method)
    except ValueError as err:
        raise UsageError(str(err)) from None


def estimate_seconds(sampler: GuidedSampler, models: Models, batch_size: int, steps: int, batches: int, guided_steps: int) -> float:
    """Seconds for `batches` batches: a timed model call (CFG included) × steps; guided steps count 4× (the
    backward through the model, decoder and surrogate). Rough: the first batch also pays warm-up."""
    x = torch.randn(batch_size * sampler.rows_per_image, *models.latent_shape, device=models.device)
    label = models.class_labels[0]
    y = torch.full((x.shape[0],), label, device=models.device, dtype=torch.long)
    t = torch.full((x.shape[0],), 500, device=models.device, dtype=torch.long)
    with torch.no_grad():
        sampler.model_fn(x, t, y)
        start = time.perf_counter()
        sampler.model_fn(x, t, y)
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        per_call = time.perf_counter() - start
    return per_call * (steps + 3 * guided_steps) * batches


def run(args) -> int:
    validate(args)
    spec = get_method(args.method)
    rank, world, local_rank = distributed_env()
    device = resolve_device(args.device, local_rank, world)
    progress = not args.quiet and rank == 0
    try:
        prior, codec, description = load_generator(args, device)
        class_names, class_labels, dataset = resolve_classes(args, prior, description.get("prior_extra", {}))
        if args.cfg_scale is None:
            args.cfg_scale = DIGITS_CFG_SCALE if dataset == "digits" else DIT_CFG_SCALE
        latent = (prior.in_channels, prior.input_size, prior.input_size)
        image = (codec.image_channels, prior.input_size * codec.downsample, prior.input_size * codec.downsample)
        models = Models(prior, codec, GaussianDiffusion(args.steps, learn_sigma=prior.learn_sigma), latent, image,
                        class_labels, prior.num_classes, device, description)  # fmt: skip
        data = real_data(args, dataset, class_names, image, verify=not spec.needs_data)
        if spec.needs_data:
            data.load()
        plan = plan_batches(len(class_names), args.ipc, args.class_batch, args.images_per_batch)
        method_args = {k: getattr(args, k) for k in sorted(method_arg_names(spec))}
        config = run_config(args, class_names, class_labels, models, dataset, method_args)
        run_dir = RunDirectory(args.out, config, class_names)
        run_dir.check_compatible()
        cache = None if args.dry_run else Path(args.out) / STATE_DIR
        ctx = MethodContext(args, models, data, class_names, dataset, args.dry_run, cache, progress)
        setup = spec.builder(ctx)
    except ValueError as err:
        raise UsageError(str(err)) from None

    table = label_map(class_labels, prior.num_classes)
    guidances = [LocalLabels(g, table) for g in setup.guidances]
    sampler = GuidedSampler(prior, models.diffusion, guidances, cfg_scale=args.cfg_scale, compat=args.compat,
                            cfg_channels=min(3, prior.in_channels) if args.compat else None,
                            num_classes=prior.num_classes, precision=args.precision, compile=args.compile,
                            cuda_graphs=args.cuda_graphs, model_jacobian=not args.fast)  # fmt: skip
    mine = batches_for_rank(plan, rank, world)
    guided = max((min(g.high, args.steps - 1) - g.low + 1 for g in guidances if g.requires_grad), default=0)

    if args.dry_run:
        batch_size = max(len(b.items) for b in plan)
        seconds = estimate_seconds(sampler, models, batch_size, args.steps, len(mine), guided)
        print(f"method      {args.method}: {spec.help}")
        print(f"method args {json.dumps(setup.params, sort_keys=True)}")
        print(f"classes     {len(class_names)} ({dataset}): {', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''}")
        print(f"generator   {description['model']} ({sum(p.numel() for p in prior.parameters()):,} parameters), latent {list(latent)}, images {list(image)}")
        print(f"sampling    {args.sampler}, {args.steps} steps, CFG {args.cfg_scale}{' (compat)' if args.compat else ''}, {guided} guided steps, "
              f"{args.precision}{', fast (no DiT Jacobian)' if args.fast else ''}, device {device}")
        print(f"data        {data.description}")
        print(f"plan        {len(class_names) * args.ipc} images in {len(plan)} batches of ≤{batch_size} "
              f"(≤{args.class_batch} classes × ≤{args.images_per_batch} images); "
              f"this process (rank {rank} of {world}): {len(mine)} batches")  # fmt: skip
        done = sum(1 for b in mine if run_dir.batch_done(b))
        print(f"output      {args.out} ({done} of {len(mine)} batches already done)")
        print(f"estimate    ~{seconds:.0f} s for this process (timed model call × steps, guided steps ×4)")
        return 0

    run_dir.info = {"versions": versions(), "method_params": setup.params}
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        run_dir.start()
    if world > 1:
        dist.barrier()

    def generate_batch(batch):
        ids = [(c, i, args.seed) for c, i in batch.items]
        labels = [class_labels[c] for c, _ in batch.items]
        if setup.prepare is not None:
            setup.prepare([c for c, _ in batch.items])
        if setup.sample is not None:
            latents = setup.sample(sampler, labels, ids, latent, device)
        elif args.sampler == "ddim":
            latents = sampler.ddim_sample(labels, ids, latent, device, eta=args.eta, progress=False)
        else:
            latents = sampler.sample(labels, ids, latent, device, progress=False)
        with torch.no_grad():
            images = codec.decode(latents).float().cpu()
        return images, latents, [{"seed": image_seed(args.seed, c, i), "label": class_labels[c]} for c, i in batch.items]

    def restore(batch, latents):
        labels = torch.tensor([class_labels[c] for c, _ in batch.items], device=device)
        for guidance in guidances:
            guidance.end_batch(latents.to(device), labels)

    made = generate(run_dir, plan, generate_batch, restore, rank=rank, world=world, progress=progress,
                    update_manifest=rank == 0)  # fmt: skip
    if world > 1:
        dist.barrier()
    if rank == 0:
        run_dir.write_manifest(complete=True)
        preview = run_dir.write_preview(args.ipc)
        total = len(class_names) * args.ipc
        print(f"wrote {total} images to {args.out} ({made} generated now by this process), manifest.json and {preview.name}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def method_arg_names(spec) -> set[str]:
    """The argparse dests a method's add_arguments defines."""
    if spec.add_arguments is None:
        return set()
    scratch = argparse.ArgumentParser(add_help=False)
    spec.add_arguments(scratch)
    return set(vars(scratch.parse_args([])))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="generate a distilled ImageFolder with a guided diffusion method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(METHODS))}")
    parser.add_argument("--ipc", type=int, required=True, help="images per class")
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds this run's manifest)")
    parser.add_argument("--data", default=None, help="real ImageFolder (default: the scikit-learn digits, offline)")
    parser.add_argument("--classes", default=None, help="imagenette | imagewoof | FILE ('name [label]' per line)")
    parser.add_argument("--model", default=None, help="fastdd prior, DiT checkpoint or diffusers DiT (default: bundled digits prior)")
    parser.add_argument("--vae", default=None, help="mse | ema | none | NAME_OR_PATH (default: mse for DiT, none for pixel priors)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; image (class c, index i) uses hash(seed, c, i)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (respaced from 1000)")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"), help="ancestral DDPM (the authors') or DDIM")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--cfg-scale", type=float, default=None, help=f"CFG scale (default {DIT_CFG_SCALE}; digits {DIGITS_CFG_SCALE})")
    parser.add_argument("--compat", action="store_true", help="reproduce the authors' quirks (shadow rows, CFG on 3 channels)")
    parser.add_argument("--class-batch", type=int, default=10,
                        help="classes per batch; processes get whole chunks of this many classes")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                       help="bf16: DiT forward and VAE decoder under bf16 autocast (guidance reductions stay fp32)")
    speed.add_argument("--images-per-batch", type=int, default=1,
                       help="consecutive images of each class in a batch (rows: classes × this); the same images as 1, "
                       "up to float rounding, for every method but igds (its entropy term spans the batch); igd with "
                       "--igd-gamma > 0 needs 1 (its memory sees a class's images one at a time)")  # fmt: skip
    speed.add_argument("--compile", action="store_true", help="torch.compile the DiT (first batch pays compilation)")
    speed.add_argument("--cuda-graphs", action="store_true",
                       help="replay whole sampling steps as CUDA graphs from the second batch on (CUDA only)")
    speed.add_argument("--fast", action="store_true",
                       help="opt-in approximation: guidance gradients skip the DiT Jacobian (no backward through the DiT)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, write nothing")
    parser.add_argument("--quiet", action="store_true")
    for method in METHODS.values():
        if method.add_arguments is not None:
            method.add_arguments(parser)
    parser.set_defaults(func=run)

