"""`fastdd report DIR...`: the eval summaries of several runs in one table (markdown + PNG chart)."""

from __future__ import annotations

from ..evaluation import report
from .errors import UsageError


def run(args) -> int:
    try:
        path = report(args.dirs, args.out)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(path.read_text(), end="")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="one table of several runs' eval summaries (method × IPC × arch)")
    parser.add_argument("dirs", nargs="+", help="run folders holding eval_*.json summaries")
    parser.add_argument(
        "--out", default="report", help="output path without suffix: writes .md and .png (default: report)"
    )
    parser.set_defaults(func=run)
