"""`fastdd prior train`: train a class-conditional DiT prior on a dataset (the digits default ships one)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.digits import DIGITS_CLASSES, load_digits_split
from ..data.imagefolder import load_image_folder
from ..models.dit import DiT
from ..prior import save_prior, train_prior
from .errors import UsageError

# the prior shipped in fastdd/assets/digits_prior.safetensors was made with exactly these defaults:
#   fastdd prior train --out fastdd/assets/digits_prior.safetensors
DIGITS_PRIOR = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=4, num_heads=4, num_classes=10)


def run(args) -> int:
    if args.steps <= 0 or args.batch_size <= 0:
        raise UsageError(f"--steps and --batch-size must be > 0, got {args.steps} and {args.batch_size}")
    if args.data is None:
        images, labels = load_digits_split("train")
        classes, config = DIGITS_CLASSES, dict(DIGITS_PRIOR)
        extra = {"dataset": "digits", "classes": classes, "image_size": 16, "channels": 1, "latent": "pixel"}
    else:
        try:
            images, labels, classes = load_image_folder(args.data, args.image_size, 3)
        except ValueError as err:
            raise UsageError(str(err)) from None
        config = dict(input_size=args.image_size, patch_size=args.patch_size, in_channels=3, hidden_size=args.hidden_size,
                      depth=args.depth, num_heads=args.num_heads, num_classes=len(classes))  # fmt: skip
        extra = {"dataset": str(args.data), "classes": classes, "image_size": args.image_size, "channels": 3, "latent": "pixel"}
    model = DiT(**config)
    ema = train_prior(model, images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=torch.device(args.device), progress=not args.quiet)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    save_prior(ema, tmp, extra)
    tmp.replace(out)
    print(f"wrote {out} ({sum(p.numel() for p in ema.parameters())} parameters)")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("prior", help="class-conditional DiT priors")
    prior_sub = parser.add_subparsers(dest="prior_command", required=True)
    train = prior_sub.add_parser("train", help="train a pixel-space DiT prior (digits by default)")
    train.add_argument("--out", required=True, help="output .safetensors")
    train.add_argument("--data", default=None, help="ImageFolder (default: scikit-learn digits, 16×16 grayscale)")
    train.add_argument("--image-size", type=int, default=32)
    train.add_argument("--patch-size", type=int, default=4)
    train.add_argument("--hidden-size", type=int, default=192)
    train.add_argument("--depth", type=int, default=6)
    train.add_argument("--num-heads", type=int, default=6)
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=run)
