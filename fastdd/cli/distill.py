"""`fastdd distill`: generate a distilled ImageFolder with a registered method (fastdd/methods/).

    fastdd distill --method igd --ipc 10 --out DIR            # offline default: digits + the bundled prior
    torchrun --nproc_per_node=N -m fastdd distill ...          # classes sharded over ranks (whole class chunks)

Writes DIR/<class>/<i>.png, DIR/manifest.json and DIR/preview.png; resumable (see fastdd/pipeline.py): start the
same command again after a crash. The images depend only on the run config (not on the device count); every
argument except --device, --dry-run, --quiet, --compile and --cuda-graphs is part of it, and a folder made with
another config is refused. --images-per-batch is part of it although it changes the images of no method but igds
(its entropy term spans the batch; other methods: at most float rounding of larger matrix products, none on CPU for
dit, mgd3, d3hr and sam): the resume state is kept per batch, so a run resumes with the value it began with.
"""

from __future__ import annotations

import argparse

from ..methods import METHODS, RunSpec, get_method
from ..options import option_fields
from ..pipeline import run as run_pipeline
from .errors import UsageError
from .options import add_options, options_from_args


def run(args: argparse.Namespace) -> int:
    """Build the RunSpec and the method's options from the arguments and run the pipeline (ValueError -> exit 2)."""
    try:
        method = get_method(args.method)
        spec = options_from_args(RunSpec, args)
        run_pipeline(spec, options_from_args(method.options, args))
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # permission denied, read-only file system, disk full: the written state stays resumable
        where = f"{err.filename}: " if err.filename else ""
        raise UsageError(
            f"{where}{err.strerror or err}; what was written is kept: fix it and run the same command again to resume"
        ) from None
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="generate a distilled ImageFolder with a guided diffusion method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, RunSpec)
    method_flag = next(a for a in parser._actions if "--method" in a.option_strings)
    method_flag.choices = sorted(METHODS)
    method_flag.help = "the distillation method: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
    for method in METHODS.values():
        if option_fields(method.options):
            add_options(parser, method.options, title=f"{method.name}: {method.help}")
    parser.set_defaults(func=run)
