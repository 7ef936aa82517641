"""`fastdd eval DIR`: train fresh networks on a distilled ImageFolder, report best top-1 mean ± std, under IGD's
hard-label protocol or RDED's soft-label protocol with a teacher, for one or several architectures."""

from __future__ import annotations

from ..evaluation import ARCHS, PROTOCOLS, evaluate, summary_path
from ..evaluation.soft import RDED_EPOCHS, RDED_FACTOR, RDED_TEMPERATURE
from .errors import UsageError


def run(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise UsageError(f"--arch takes a comma-separated list of {', '.join(ARCHS)}, got {args.arch!r}")
    over = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "1 seed"
    print(f"| set | arch | labels | IPC | epochs | top-1 ({over}) |")
    print("|---|---|---|---|---|---|")
    for arch in archs:
        try:
            summary = evaluate(
                args.dir,
                real_val=args.real_val,
                arch=arch,
                seeds=seeds,
                epochs=args.epochs,
                image_size=args.image_size,
                device=args.device,
                json_path=args.json if len(archs) == 1 else None,
                allow_incomplete=args.allow_incomplete,
                quiet=args.quiet,
                labels=args.labels,
                teacher=args.teacher,
                temperature=args.temperature,
                soft_factor=args.soft_factor,
                input_size=args.input_size,
                ensemble=args.ensemble,
                workers=args.workers,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        incomplete = (
            ""
            if summary["run_complete"]
            else f" (incomplete run: {summary['images']} of {summary['images_planned']} images)"
        )
        print(
            f"| {args.dir}{incomplete} | {arch} | {args.labels} | {summary['ipc']} | {summary['epochs']} | "
            f"{summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} |",
            flush=True,
        )
        if not args.quiet:
            print(f"wrote {summary_path(args.dir, arch, args.json if len(archs) == 1 else None, args.labels)}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="train on a distilled ImageFolder and report top-1 accuracy")
    parser.add_argument("dir", help="distilled ImageFolder (DIR/<class>/<i>.png)")
    parser.add_argument(
        "--real-val",
        default=None,
        help="real validation ImageFolder, one folder per class (ImageNet's val split by wnid) (default for digits "
        "sets: the digits test split)",
    )
    parser.add_argument(
        "--arch",
        default="convnet6",
        help=f"networks trained on the distilled set, comma-separated: {', '.join(ARCHS)}. convnet6 (ConvNet-6 at "
        "multiples of 64 px, else ConvNet-3; IGD's protocol), convnet3, resnetap10, resnet18 (instance norm, IGD / "
        "Minimax), resnet18-bn and mobilenetv2 (torchvision's BatchNorm networks, RDED's students) (default: "
        "convnet6). Time: ResNetAP-10 at IGD's 2,000 epochs × 3 seeds is about 2 h on a 2-core CPU; the run prints "
        "its own estimate after the first epoch",
    )
    parser.add_argument(
        "--labels",
        default="hard",
        choices=PROTOCOLS,
        help="hard: IGD's protocol (AdamW lr 1e-3 wd 0.01, MultiStepLR at 2/3 and 5/6, batch 64, CutMix, epochs by "
        "IPC 1→3000, ≤10→2000, ≤50→1500, ≤200→1000). soft: RDED's protocol (LINs-lab/RDED validation/main.py): the "
        "--teacher relabels every augmented, CutMix-ed batch, KL at --temperature, AdamW lr 1e-3 (mobilenetv2 "
        "2.5e-3) wd 0.01, quarter-cosine schedule, 300 epochs, batch by IPC (1→10, 10→50, 50→100, ×2 for ≥100 "
        "classes) (default: hard)",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        help="the soft protocol's teacher: a torchvision ResNet-18 / MobileNet-V2 state dict (.pth, RDED / SRe²L "
        "teachers; a 1,000-class ImageNet teacher keeps the set's classes' rows) or a file from `fastdd teacher`",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"soft labels' temperature T (default: {RDED_TEMPERATURE:g}, RDED's)",
    )
    parser.add_argument(
        "--soft-factor",
        type=int,
        default=None,
        help=f"RDED's factor: ShufflePatches(factor) and crops of scale (1/factor, 1) (default: {RDED_FACTOR}, RDED's "
        "ImageNet-family setting; 1 turns both off)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="soft protocol: the size students train at (default: 224 for images of 224 px and more, else theirs)",
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated training seeds, one network trained per seed (default: 0,1,2)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs >= 1 (default: the protocol's: hard by IPC, soft {RDED_EPOCHS})",
    )
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: from the manifest)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--json",
        default=None,
        help="where to write the JSON summary, with one --arch (default: DIR/eval_<arch>.json, "
        "DIR/eval_<arch>_soft.json for soft labels)",
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="evaluate a run whose manifest says it did not finish (default: refused; the summary then says so)",
    )
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="hard labels: train the seeds together as one vmap ensemble rather than one after another (the same "
        "protocol; for sets in memory and networks without BatchNorm). On a 2-core CPU it took 1.42x as long "
        "(benchmarks/eval_speed.py); not measured on GPU",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes for sets read from disk (default: 0)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-seed lines")
    parser.set_defaults(func=run)
