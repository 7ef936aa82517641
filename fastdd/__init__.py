"""fastdd: fused kernels and a guided sampler for diffusion-based dataset distillation.

    import fastdd
    fastdd.distill(method="igd", ipc=10, out="runs/digits-igd")        # = fastdd distill --method igd ...
    fastdd.evaluate("runs/digits-igd")                                 # = fastdd eval runs/digits-igd

`fastdd.prepare(RunSpec(...), options)` loads and builds a run without generating (its `sampler`, `models`,
`sample_batch`); `fastdd.guidance` has each method's math for other sampling loops. The names below are imported on
first use, so `import fastdd.ops` (or the CLI) does not load the whole pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "distill": "pipeline",
    "prepare": "pipeline",
    "RunResult": "pipeline",
    "PreparedRun": "pipeline",
    "evaluate": "evaluation",
    "RunSpec": "methods",
    "METHODS": "methods",
    "Method": "methods",
    "register_method": "methods",
    "DiTOptions": "methods",
    "IGDOptions": "methods",
    "DAPOptions": "methods",
    "MGD3Options": "methods",
    "D3HROptions": "methods",
    "SAMOptions": "methods",
    "IGDSOptions": "methods",
}
__all__ = [
    "D3HROptions",
    "DAPOptions",
    "DiTOptions",
    "IGDOptions",
    "IGDSOptions",
    "METHODS",
    "MGD3Options",
    "Method",
    "PreparedRun",
    "RunResult",
    "RunSpec",
    "SAMOptions",
    "distill",
    "evaluate",
    "prepare",
    "register_method",
]

if TYPE_CHECKING:
    from .evaluation import evaluate
    from .methods import (
        METHODS,
        D3HROptions,
        DAPOptions,
        DiTOptions,
        IGDOptions,
        IGDSOptions,
        Method,
        MGD3Options,
        RunSpec,
        SAMOptions,
        register_method,
    )
    from .pipeline import PreparedRun, RunResult, distill, prepare


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastdd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
