"""`fastdd bench`: per-image sampling time per method, the authors' algorithm vs fastdd (fastdd.bench.sampler)."""
from __future__ import annotations

import argparse

from ..bench import sampler
from .errors import UsageError


def run(args: argparse.Namespace) -> int:
    try:
        options = sampler.options_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sampler.run_benchmark(options)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="sampler benchmark: the authors' algorithms vs fastdd, per method",
                                   description=sampler.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sampler.add_arguments(parser)
    parser.set_defaults(func=run)
