"""Per-image time of plain and guided sampling per method, the authors' algorithm vs fastdd: `fastdd bench` as a
script (same options; what is timed: fastdd/bench/sampler.py).

    python benchmarks/bench_sampler.py [--config tiny|dit-s2-128|dit-xl2-256] [--device cpu|cuda] [--methods ...]
                                       [--repeats 3] [--batch 4] [--steps 50] [--no-compile] [--bf16] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdd.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
