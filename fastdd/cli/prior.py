"""`fastdd prior train`: train a class-conditional DiT prior, in pixel space or on the latents of a VAE (`--vae`); `fastdd
prior vae`: train the small diffusers AutoencoderKL such a latent prior works in.

With no --data they train on the digits train split (grayscale). The file shipped in fastdd/assets was made with

    OMP_NUM_THREADS=1 fastdd prior train --out fastdd/assets/digits_prior.safetensors

(one thread: on a busy 2-core machine it ran 10× faster than with two). A latent prior and its VAE:

    fastdd prior vae --out digits_vae && fastdd prior train --vae digits_vae --out digits_latent_prior.safetensors
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from ..data.digits import DIGITS_CLASSES, DIGITS_IMAGE_SIZE
from ..data.imagefolder import scan_image_folder
from ..data.real import real_data
from ..models.dit import DiT
from ..models.loading import weights_fingerprint
from ..models.vae import LatentCodec
from ..prior import save_prior, train_prior
from ..vae_training import DIGITS_VAE, build_vae, train_vae
from .errors import UsageError

# architecture and training defaults per dataset kind; any flag given on the command line overrides them
DIGITS_PRIOR_DEFAULTS = dict(
    image_size=DIGITS_IMAGE_SIZE,
    patch_size=4,
    hidden_size=96,
    depth=4,
    num_heads=4,
    steps=4000,
    batch_size=64,
    lr=2e-3,
    ema_decay=0.995,
)
IMAGEFOLDER_PRIOR_DEFAULTS = dict(
    image_size=32,
    patch_size=4,
    hidden_size=192,
    depth=6,
    num_heads=6,
    steps=2000,
    batch_size=64,
    lr=1e-3,
    ema_decay=0.999,
)


def resolve(args, defaults: dict) -> dict:
    """The defaults overridden by the flags that were given (argparse leaves the others None)."""
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}


def run(args) -> int:
    codec = None
    if args.vae is not None:
        try:
            codec = LatentCodec.from_pretrained(args.vae)
        except ValueError as err:
            raise UsageError(f"--vae {args.vae}: {err}") from None
        if args.image_size is None:
            args.image_size = int(codec.vae.config.sample_size)
    if args.data is None:
        opts = resolve(args, DIGITS_PRIOR_DEFAULTS)
        classes, channels, dataset = DIGITS_CLASSES, 1, "digits"
    else:
        opts = resolve(args, IMAGEFOLDER_PRIOR_DEFAULTS)
        channels, dataset = 3, str(args.data)
    try:
        classes = classes if args.data is None else scan_image_folder(args.data)[0]
        data = real_data(args.data, dataset, classes, (channels, opts["image_size"], opts["image_size"]))
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name in ("steps", "batch_size", "image_size", "patch_size", "hidden_size", "depth", "num_heads"):
        if opts[name] <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {opts[name]}")
    if not 0 <= opts["ema_decay"] < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {opts['ema_decay']}")
    if codec is not None and (codec.image_channels != channels or opts["image_size"] % codec.downsample):
        raise UsageError(f"--vae {args.vae} takes {codec.image_channels}-channel images, a multiple of "
                         f"{codec.downsample} px; the data is {channels}-channel at {opts['image_size']} px")  # fmt: skip
    latent_size = opts["image_size"] // (codec.downsample if codec else 1)
    try:
        model = DiT(
            input_size=latent_size,
            patch_size=opts["patch_size"],
            in_channels=codec.latent_channels if codec else channels,
            hidden_size=opts["hidden_size"],
            depth=opts["depth"],
            num_heads=opts["num_heads"],
            num_classes=len(classes),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if codec is not None:
        codec.vae.to(device)
    ema = train_prior(
        model,
        data,
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        ema_decay=opts["ema_decay"],
        seed=args.seed,
        device=device,
        progress=not args.quiet,
        encode=None if codec is None else partial(codec.encode, sample=False),
    )
    extra = {
        "dataset": dataset,
        "classes": classes,
        "image_size": opts["image_size"],
        "channels": channels,
        "latent": "pixel" if codec is None else "vae",
        "training": {**opts, "seed": args.seed},
    }
    out = Path(args.out)
    if codec is not None:  # the VAE it was trained in: found again relative to the prior's own folder
        vae_path = Path(args.vae).resolve()
        extra["vae"] = os.path.relpath(vae_path, out.resolve().parent)
        extra["vae_sha256"] = weights_fingerprint(vae_path)
    save_prior(ema, out, extra)
    print(f"wrote {out} ({sum(p.numel() for p in ema.parameters())} parameters)")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("prior", help="class-conditional DiT priors")
    prior_sub = parser.add_subparsers(dest="prior_command", required=True)
    train = prior_sub.add_parser(
        "train",
        help="train a DiT prior in pixel space or on a VAE's latents (digits by default)",
        description="Train a class-conditional DiT with the IDDPM hybrid loss, on pixels or (--vae) on the VAE's "
        f"scaled encoder-mean latents. Unset options take the digits defaults {DIGITS_PRIOR_DEFAULTS} without "
        f"--data, else {IMAGEFOLDER_PRIOR_DEFAULTS}.",
    )
    train.add_argument("--out", required=True, help="output .safetensors")
    train.add_argument(
        "--vae",
        default=None,
        help="a diffusers AutoencoderKL folder (e.g. from `fastdd prior vae`): train on its latents; the prior records "
        "the VAE (relative to its own folder) and `--model PRIOR` decodes with it (default: pixel space)",
    )
    train.add_argument("--data", default=None, help="ImageFolder (default: scikit-learn digits, 16×16 grayscale)")
    defaults = "(default: {} on digits, {} with --data)"
    for flag, kind, what in (
        ("--image-size", int, "image side the prior is trained at"),
        ("--patch-size", int, "DiT patch size"),
        ("--hidden-size", int, "DiT width"),
        ("--depth", int, "DiT blocks"),
        ("--num-heads", int, "attention heads"),
        ("--steps", int, "training steps"),
        ("--batch-size", int, "images per training step"),
        ("--lr", float, "AdamW learning rate"),
        ("--ema-decay", float, "decay of the EMA weights that are saved"),
    ):
        key = flag.removeprefix("--").replace("-", "_")
        train.add_argument(flag, type=kind, default=None,
                           help=f"{what} {defaults.format(DIGITS_PRIOR_DEFAULTS[key], IMAGEFOLDER_PRIOR_DEFAULTS[key])}")  # fmt: skip
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (default: 0)")
    train.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=run)
    vae = prior_sub.add_parser(
        "vae",
        help="train a small diffusers AutoencoderKL for a latent prior (digits at 32 px by default)",
        description="Train a diffusers AutoencoderKL (MSE + KL, scaling_factor set to 1 / RMS of its latents) on "
        "the real images, saved with save_pretrained.",
    )
    vae.add_argument("--out", required=True, help="output folder (config.json + diffusion_pytorch_model.safetensors)")
    vae.add_argument("--data", default=None, help="ImageFolder (default: scikit-learn digits, grayscale)")
    vae.add_argument("--image-size", type=int, default=32, help="image side (default: 32)")
    vae.add_argument(
        "--channels",
        default=",".join(str(c) for c in DIGITS_VAE["block_out_channels"]),
        help="block widths, comma-separated; n widths downsample 2^(n-1) (default: 32,64,64: 32 px -> 4×8×8 latents)",
    )
    vae.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    vae.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    vae.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (default: 0)")
    vae.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    vae.add_argument("--quiet", action="store_true", help="no progress bar")
    vae.set_defaults(func=run_vae)


def run_vae(args) -> int:
    """`fastdd prior vae`: train and save a small AutoencoderKL."""
    try:
        widths = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UsageError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    size = args.image_size
    if size <= 0 or size % 2 ** (len(widths) - 1):
        raise UsageError(f"--image-size {size} must be a positive multiple of {2 ** (len(widths) - 1)}")
    try:
        if args.data is None:
            classes, channels, dataset = DIGITS_CLASSES, 1, "digits"
        else:
            classes, channels, dataset = scan_image_folder(args.data)[0], 3, "custom"
        data = real_data(args.data, dataset, classes, (channels, size, size))
    except ValueError as err:
        raise UsageError(str(err)) from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_vae(channels, size, widths, DIGITS_VAE["layers_per_block"], DIGITS_VAE["latent_channels"],
                      DIGITS_VAE["norm_num_groups"])  # fmt: skip
    model = train_vae(model, data, steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=device,
                      progress=not args.quiet)  # fmt: skip
    out = Path(args.out)
    model.to("cpu").save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters())} parameters, scaling_factor "
          f"{model.config.scaling_factor:.4f})")  # fmt: skip
    return 0
