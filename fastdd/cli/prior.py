"""`fastdd prior train`: train a class-conditional pixel-space DiT prior (the digits default ships one).

With no --data it trains on the digits train split (16×16 grayscale) with DIGITS_PRIOR_DEFAULTS; the prior
shipped in fastdd/assets/digits_prior.safetensors was made with exactly

    OMP_NUM_THREADS=1 fastdd prior train --out fastdd/assets/digits_prior.safetensors

(one thread: on a busy 2-core machine it ran 10× faster than with two).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.digits import DIGITS_CLASSES, DIGITS_IMAGE_SIZE, load_digits_split
from ..data.imagefolder import load_image_folder
from ..models.dit import DiT
from ..prior import save_prior, train_prior
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
    if args.data is None:
        opts = resolve(args, DIGITS_PRIOR_DEFAULTS)
        images, labels = load_digits_split("train", opts["image_size"])
        classes, channels, dataset = DIGITS_CLASSES, 1, "digits"
    else:
        opts = resolve(args, IMAGEFOLDER_PRIOR_DEFAULTS)
        channels, dataset = 3, str(args.data)
        try:
            images, labels, classes = load_image_folder(args.data, opts["image_size"], channels)
        except ValueError as err:
            raise UsageError(str(err)) from None
    for name in ("steps", "batch_size", "image_size", "patch_size", "hidden_size", "depth", "num_heads"):
        if opts[name] <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {opts[name]}")
    if not 0 <= opts["ema_decay"] < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {opts['ema_decay']}")
    try:
        model = DiT(
            input_size=opts["image_size"],
            patch_size=opts["patch_size"],
            in_channels=channels,
            hidden_size=opts["hidden_size"],
            depth=opts["depth"],
            num_heads=opts["num_heads"],
            num_classes=len(classes),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    ema = train_prior(
        model,
        images,
        labels,
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        ema_decay=opts["ema_decay"],
        seed=args.seed,
        device=torch.device(args.device),
        progress=not args.quiet,
    )
    extra = {
        "dataset": dataset,
        "classes": classes,
        "image_size": opts["image_size"],
        "channels": channels,
        "latent": "pixel",
        "training": {**opts, "seed": args.seed},
    }
    out = Path(args.out)
    save_prior(ema, out, extra)
    print(f"wrote {out} ({sum(p.numel() for p in ema.parameters())} parameters)")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("prior", help="class-conditional DiT priors")
    prior_sub = parser.add_subparsers(dest="prior_command", required=True)
    train = prior_sub.add_parser(
        "train",
        help="train a pixel-space DiT prior (digits by default)",
        description="Train a class-conditional pixel-space DiT with the IDDPM hybrid loss. Unset options take the "
        f"digits defaults {DIGITS_PRIOR_DEFAULTS} without --data, else {IMAGEFOLDER_PRIOR_DEFAULTS}.",
    )
    train.add_argument("--out", required=True, help="output .safetensors")
    train.add_argument("--data", default=None, help="ImageFolder (default: scikit-learn digits, 16×16 grayscale)")
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--patch-size", type=int, default=None)
    train.add_argument("--hidden-size", type=int, default=None)
    train.add_argument("--depth", type=int, default=None)
    train.add_argument("--num-heads", type=int, default=None)
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--ema-decay", type=float, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=run)
