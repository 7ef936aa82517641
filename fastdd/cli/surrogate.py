"""`fastdd surrogate`: ConvNet trajectory on real data -> Algorithm 2 checkpoints -> per-class real gradients,
saved as one safetensors file (or imported from the authors' replay_buffer_<n>.pt)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.digits import DIGITS_CLASSES, DIGITS_IMAGE_SIZE
from ..data.imagefolder import scan_image_folder
from ..data.real import real_data
from ..guidance.igd import (
    DIGITS_SURROGATE,
    MAX_CHECKPOINTS,
    SELECTION_RULES,
    SurrogateConfig,
    build_surrogate_bundle,
    train_trajectory,
)
from ..models.replay_buffer import check_against_model, load_replay_buffer, select_snapshots
from ..parallel import distributed_env, process_group, resolve_device
from .errors import UsageError

# the bundle shipped in fastdd/assets/digits_surrogate.safetensors:  fastdd surrogate --out fastdd/assets/digits_surrogate.safetensors
DIGITS_EPOCHS = 20
# Algorithm 2 on digits keeps 18 of 21 epochs (the class-averaged gradient of a fitted 1,347-image set is mostly
# noise: consecutive cosines 0.8 .. -0.7), so the digits default takes the published ImageNette picks [0, 2, 11, 40]
# of 50 epochs scaled to 20 epochs; pass --threshold to run Algorithm 2 anyway.
DIGITS_EPOCH_LIST = [0, 1, 4, 16]
# the real gradients go into the file up to this size (ImageNet-1K's [1000, 4, P] at ConvNet-6 is ≈45 GB: per class)
REAL_GRADS_IN_FILE = 2**30


def run(args) -> int:
    if args.data is None:
        data = real_data(None, "digits", DIGITS_CLASSES, (1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE))
        config, flip = DIGITS_SURROGATE, False
    else:
        try:
            classes = scan_image_folder(args.data)[0]
            data = real_data(args.data, "custom", classes, (3, args.image_size, args.image_size), workers=args.workers)
        except ValueError as err:
            raise UsageError(str(err)) from None
        config = SurrogateConfig(3, len(classes), width=args.width, depth=args.depth, im_size=args.image_size)
        flip = True
    digits_default = args.data is None and args.threshold is None and args.epochs is None and not args.replay_buffer
    epochs = DIGITS_EPOCH_LIST if digits_default else None
    if args.epochs_list:
        try:
            epochs = [int(e) for e in args.epochs_list.split(",")]
        except ValueError:
            raise UsageError(f"--epochs-list must be comma-separated integers, got {args.epochs_list!r}") from None
    if args.replay_buffer:
        if epochs is None:
            raise UsageError("--replay-buffer needs --epochs-list (the authors' picks, e.g. 0,2,11,40)")
        try:
            buffer = load_replay_buffer(args.replay_buffer)
            snapshots = select_snapshots(buffer, list(range(len(buffer[0]))))
            check_against_model(snapshots, config.build())
        except (ValueError, IndexError) as err:
            raise UsageError(str(err)) from None
    else:
        num_epochs = args.epochs if args.epochs is not None else (DIGITS_EPOCHS if args.data is None else 50)
        if num_epochs <= 0:
            raise UsageError(f"--epochs must be > 0, got {num_epochs}")
        _, world, local_rank = distributed_env()
        try:
            device = resolve_device(args.device, local_rank, world)
        except ValueError as err:
            raise UsageError(str(err)) from None
        with process_group(device) as (rank, world):  # torchrun: DistributedDataParallel, rank 0 writes
            snapshots = train_trajectory(
                config,
                data,
                epochs=num_epochs,
                flip=flip,
                photometric=flip,
                seed=args.seed,
                device=device,
                progress=not args.quiet,
            )
        if rank != 0:
            return 0
    if epochs is not None and max(epochs) >= len(snapshots):
        raise UsageError(f"--epochs-list asks for epoch {max(epochs)} but there are {len(snapshots)} snapshots")
    threshold = 0.7 if args.threshold is None else args.threshold
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], got {threshold}")
    if args.max_checkpoints is not None and args.max_checkpoints <= 0:
        raise UsageError(f"--max-checkpoints must be > 0, got {args.max_checkpoints}")
    kept = len(epochs) if epochs is not None else args.max_checkpoints or MAX_CHECKPOINTS
    in_file = 4 * config.num_classes * kept * len(snapshots[0]) <= REAL_GRADS_IN_FILE
    bundle = build_surrogate_bundle(
        config,
        snapshots,
        data,
        epochs=epochs,
        threshold=threshold,
        max_checkpoints=args.max_checkpoints,
        selection=args.selection,
        seed=args.seed,
        progress=not args.quiet,
        real_grads=in_file,
    )
    out = Path(args.out)
    bundle.save(out)  # creates the parent folders
    held = (
        f"real gradients for {config.num_classes} classes"
        if in_file
        else f"no real gradients (over {REAL_GRADS_IN_FILE // 2**30} GiB: a run computes each class's when a batch "
        "needs them and stores them per class in its state folder)"
    )
    print(f"wrote {out}: checkpoints at epochs {bundle.epochs}, {held}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("surrogate", help="surrogate checkpoints + per-class real gradients for IGD")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--data", default=None, help="ImageFolder of real images (default: digits train split)")
    parser.add_argument("--image-size", type=int, default=256, help="with --data (digits: 16)")
    parser.add_argument("--width", type=int, default=128, help="ConvNet width (default: 128; IGD's ConvNet-6)")
    parser.add_argument("--depth", type=int, default=6, help="ConvNet depth (default: 6; IGD's ConvNet-6)")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"trajectory length (default {DIGITS_EPOCHS} on digits, else 50)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"Algorithm 2 cosine threshold (default 0.7; on digits without --epochs or --threshold: epochs {DIGITS_EPOCH_LIST}, no Algorithm 2)",
    )
    parser.add_argument(
        "--max-checkpoints",
        type=int,
        default=MAX_CHECKPOINTS,
        help=f"keep at most this many of Algorithm 2's checkpoints, the first ones (default {MAX_CHECKPOINTS}, as every "
        "published pick)",
    )
    parser.add_argument(
        "--selection",
        choices=SELECTION_RULES,
        default="paper",
        help="Algorithm 2 as the paper states it (cosine of class-mean gradients) or as the authors' "
        "test_ckpts_grad_sim.py computes it (mean of per-class cosines + 1e-6 on 80 images per class from one shuffled "
        "pass over the first 500 of each class, seeded by --seed)",
    )
    parser.add_argument("--epochs-list", default=None, help="use these epochs instead of Algorithm 2 (e.g. 0,2,11,40)")
    parser.add_argument(
        "--replay-buffer", default=None, help="import the authors' replay_buffer_<n>.pt instead of training"
    )
    parser.add_argument("--seed", type=int, default=0, help="training and loader seed (default: 0)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes that decode --data images")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
