"""`fastdd bench`: per-image sampling time per method, the authors' algorithm vs fastdd (fastdd.bench.sampler)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..bench import sampler
from ..bench.sampler import CONFIGS, METHODS, SPEC_STEPS, BenchOptions, default_out
from .errors import UsageError


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    sampler.run_benchmark(options)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="sampler benchmark: the authors' algorithms vs fastdd, per method",
        description=sampler.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny", help="model sizes (default tiny)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods (default all: {','.join(METHODS)}); dit always runs",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (the median is kept)")
    parser.add_argument("--batch", type=int, default=4, help="images per fastdd call (image 0 of classes 0, 1, ...)")
    parser.add_argument(
        "--steps", type=int, default=SPEC_STEPS, help="sampling steps (guided windows rescaled from 50)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled path")
    parser.add_argument("--bf16", action="store_true", help="add the bf16 path (compiled path + bf16 autocast)")
    parser.add_argument("--fast", action="store_true", help="add the fast path (compiled path, no DiT Jacobian)")
    parser.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results in the repository, else ./fastdd-bench)"
    )


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Checked options; ValueError naming the option otherwise."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown method(s) {unknown or args.methods!r}; choose from {','.join(METHODS)}")
    for option, value, minimum in (
        ("--repeats", args.repeats, 1),
        ("--batch", args.batch, 1),
        ("--steps", args.steps, 2),
    ):
        if value < minimum:
            raise ValueError(f"{option} must be >= {minimum}, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device: not a torch device: {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    return BenchOptions(
        config=args.config,
        device=device,
        methods=tuple(m for m in METHODS if m == "dit" or m in methods),
        repeats=args.repeats,
        batch=args.batch,
        steps=args.steps,
        compile=not args.no_compile,
        bf16=args.bf16,
        fast=args.fast,
        out=Path(args.out) if args.out else default_out(),
    )


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/bench_sampler.py ...`: the options of `fastdd bench` (bad options: exit 2)."""
    parser = argparse.ArgumentParser(
        prog="bench_sampler.py", description=sampler.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    sampler.run_benchmark(options)
    return 0
