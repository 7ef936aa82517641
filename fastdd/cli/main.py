"""The `fastdd` command line: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import sys

from . import bench, distill, evaluate, info, prior, report, surrogate, teacher
from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every option's help, in every sub-command, unless it already names its default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif action.help and action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
            action.help += " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdd", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    info.add_parser(subparsers)
    distill.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    prior.add_parser(subparsers)
    surrogate.add_parser(subparsers)
    teacher.add_parser(subparsers)
    report.add_parser(subparsers)
    bench.add_parser(subparsers)
    show_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as err:
        print(f"fastdd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was written is atomic: the state resumes as it is
        hint = "run the same command to resume" if args.command == "distill" else "run the same command again"
        print(f"fastdd {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
