"""`fastdd teacher`: train the soft-label protocol's teacher on the real data (read batch by batch), saved as a
safetensors state dict in torchvision's layout with the classes it was trained on."""

from __future__ import annotations

from pathlib import Path

from ..data.digits import DIGITS_CLASSES, DIGITS_IMAGE_SIZE
from ..data.imagefolder import scan_image_folder
from ..data.real import real_data
from ..evaluation.teacher import TEACHER_ARCHS, save_teacher, train_teacher
from ..parallel import distributed_env, process_group, resolve_device
from .errors import UsageError

DIGITS_TEACHER_EPOCHS, FOLDER_TEACHER_EPOCHS = 30, 90


def run(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    try:
        if args.data is None:
            classes, size = DIGITS_CLASSES, DIGITS_IMAGE_SIZE
            data = real_data(None, "digits", classes, (1, size, size))
        else:
            classes, size = scan_image_folder(args.data)[0], args.image_size
            data = real_data(args.data, "custom", classes, (3, size, size), workers=args.workers)
    except ValueError as err:
        raise UsageError(str(err)) from None
    epochs = args.epochs or (DIGITS_TEACHER_EPOCHS if args.data is None else FOLDER_TEACHER_EPOCHS)
    _, world, local_rank = distributed_env()
    try:
        device = resolve_device(args.device, local_rank, world)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with process_group(device) as (rank, _):  # torchrun: DistributedDataParallel, rank 0 writes
        model = train_teacher(data, args.arch, epochs=epochs, flip=args.data is not None, seed=args.seed,
                              device=device, progress=not args.quiet)  # fmt: skip
    if rank != 0:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_teacher(out, model, args.arch, classes, size)
    if not args.quiet:
        print(f"wrote {out}: a {args.arch} teacher of {len(classes)} classes ({epochs} epochs)")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("teacher", help="train a teacher for the soft-label protocol (`eval --labels soft`)")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--data", default=None, help="ImageFolder of real images (default: the digits train split)")
    parser.add_argument(
        "--arch", default="resnet18", choices=TEACHER_ARCHS,
        help="torchvision's ResNet-18 (the RDED / SRe²L teachers) or MobileNet-V2; small-image stems at 64 px and "
        "less (default: resnet18)",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=224, help="image size with --data (default: 224)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: {DIGITS_TEACHER_EPOCHS} on digits, {FOLDER_TEACHER_EPOCHS} with --data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation, order and augmentation seed (default: 0)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
