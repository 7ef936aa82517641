"""The `fastdd` command line: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import sys

from . import bench, distill, evaluate, info, prior, surrogate
from .errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    info.add_parser(subparsers)
    distill.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    prior.add_parser(subparsers)
    surrogate.add_parser(subparsers)
    bench.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as err:
        print(f"fastdd {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
