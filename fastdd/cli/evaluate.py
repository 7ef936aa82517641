"""`fastdd eval DIR`: train fresh networks on a distilled ImageFolder, report best top-1 mean ± std."""

from __future__ import annotations

from ..evaluation import ARCHS, evaluate, summary_path
from .errors import UsageError


def run(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    try:
        summary = evaluate(
            args.dir,
            real_val=args.real_val,
            arch=args.arch,
            seeds=seeds,
            epochs=args.epochs,
            image_size=args.image_size,
            device=args.device,
            json_path=args.json,
            allow_incomplete=args.allow_incomplete,
            quiet=args.quiet,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    incomplete = (
        ""
        if summary["run_complete"]
        else f" (incomplete run: {summary['images']} of {summary['images_planned']} images)"
    )
    print(f"| set | arch | IPC | epochs | top-1 (mean ± std over {len(seeds)} seeds) |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.dir}{incomplete} | {args.arch} | {summary['ipc']} | {summary['epochs']} | "
        f"{summary['top1_mean']:.2f} ± {summary['top1_std']:.2f} |"
    )
    print(f"wrote {summary_path(args.dir, args.arch, args.json)}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="train on a distilled ImageFolder and report top-1 accuracy")
    parser.add_argument("dir", help="distilled ImageFolder (DIR/<class>/<i>.png)")
    parser.add_argument(
        "--real-val", default=None, help="real validation ImageFolder (default for digits sets: the digits test split)"
    )
    parser.add_argument("--arch", default="convnet6", choices=ARCHS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs >= 1 (default: by IPC: 1→3000, ≤10→2000, ≤50→1500, ≤200→1000)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: from the manifest")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", default=None, help="where to write the JSON summary (default DIR/eval_<arch>.json)")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="evaluate a run whose manifest says it did not finish (default: refused)",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)
