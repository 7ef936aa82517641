"""`fastdd eval DIR`: train fresh networks on a distilled ImageFolder, report best top-1 mean ± std."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.digits import DIGITS_CLASSES, load_digits_split
from ..data.imagefolder import load_image_folder
from ..evaluate import epochs_for_ipc, summarize, train_and_evaluate
from ..models import ConvNet, ResNet, ResNetAP
from .errors import UsageError

ARCHS = ("convnet6", "convnet3", "resnetap10", "resnet18")


def make_model_factory(arch: str, channels: int, num_classes: int, image_size: int):
    if arch == "convnet6":
        depth = 6 if image_size % 64 == 0 else 3
        return lambda: ConvNet(channels, num_classes, width=128, depth=depth, im_size=image_size)
    if arch == "convnet3":
        return lambda: ConvNet(channels, num_classes, width=128, depth=3, im_size=image_size)
    if arch == "resnetap10":
        return lambda: ResNetAP(channels, num_classes, depth=10, im_size=image_size)
    if arch == "resnet18":
        return lambda: ResNet(channels, num_classes, depth=18, im_size=image_size)
    raise UsageError(f"--arch must be one of {ARCHS}, got {arch!r}")


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text())["config"] if path.exists() else {}


def run(args) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"distilled folder {folder} does not exist")
    config = read_manifest(folder)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    image_size = args.image_size or config.get("image_size")
    channels = config.get("channels", 3)
    if image_size is None:
        raise UsageError(f"{folder} has no manifest.json: pass --image-size")
    try:
        train_x, train_y, classes = load_image_folder(folder, image_size, channels, classes=config.get("classes"))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.real_val is None:
        if config.get("dataset") != "digits" or classes != DIGITS_CLASSES:
            raise UsageError("--real-val is required unless the set was distilled from the digits default")
        val_x, val_y = load_digits_split("test", image_size)
    else:
        try:
            val_x, val_y, _ = load_image_folder(args.real_val, image_size, channels, classes=classes)
        except ValueError as err:
            raise UsageError(str(err)) from None
    ipc = max(int((train_y == c).sum()) for c in range(len(classes)))
    epochs = args.epochs or epochs_for_ipc(ipc)
    factory = make_model_factory(args.arch, channels, len(classes), image_size)
    device = torch.device(args.device)
    results = [
        train_and_evaluate(factory, train_x, train_y, val_x, val_y, seed=s, epochs=epochs, device=device, progress=not args.quiet)
        for s in seeds
    ]
    summary = {"dir": str(folder), "arch": args.arch, "ipc": ipc, "epochs": epochs, "seeds": seeds, **summarize(results)}
    print(f"| set | arch | IPC | epochs | top-1 (mean ± std over {len(seeds)} seeds) |")
    print("|---|---|---|---|---|")
    print(f"| {folder} | {args.arch} | {ipc} | {epochs} | {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} |")
    out = Path(args.json) if args.json else folder / f"eval_{args.arch}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="train on a distilled ImageFolder and report top-1 accuracy")
    parser.add_argument("dir", help="distilled ImageFolder (DIR/<class>/<i>.png)")
    parser.add_argument("--real-val", default=None, help="real validation ImageFolder (default for digits sets: the digits test split)")
    parser.add_argument("--arch", default="convnet6", choices=ARCHS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="default: by IPC (1→3000, ≤10→2000, ≤50→1500, ≤200→1000)")
    parser.add_argument("--image-size", type=int, default=None, help="default: from the manifest")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="where to write the JSON summary (default DIR/eval_<arch>.json)")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)
