"""Per-image time of plain and guided sampling per method, the authors' algorithm vs fastdd: `fastdd bench` as a
script (same options; what is timed: fastdd/bench/sampler.py).

    python benchmarks/bench_sampler.py [--config tiny|dit-s2-128|dit-xl2-256] [--device cpu|cuda] [--methods ...]
                                       [--repeats 3] [--batch 4] [--steps 50] [--no-compile] [--bf16] [--out DIR]
                                       [--allow-reference]

It times the INSTALLED fastdd (imported before the repository joins the path) and refuses, exit 2 with one line, when an op
would run on its PyTorch reference because fastdd._C is missing, unless --allow-reference.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

with contextlib.suppress(ImportError):  # fastdd as installed first, then this repository's benchmarks/ first on the
    import fastdd  # noqa: F401  path (a pip package may ship a top-level "benchmarks" too)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import require_compiled  # noqa: E402
from fastdd.cli.bench import main  # noqa: E402
from fastdd.ops import OP_BACKENDS  # noqa: E402


def _device(argv: list[str]) -> torch.device:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return torch.device(argv[i + 1])
        if arg.startswith("--device="):
            return torch.device(arg.split("=", 1)[1])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    allow = "--allow-reference" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--allow-reference"]
    require_compiled(sorted(OP_BACKENDS), _device(sys.argv[1:]), allow)
    sys.exit(main())
