"""Each method's run wiring, one module per method (its math is in the `fastdd.guidance` module of the same name),
and the registry `fastdd distill --method` and `fastdd.distill(method=...)` read.

Add a method: an options dataclass (fields made with `fastdd.options.option`), a builder
`build(options, spec, models, data) -> MethodSetup` (see `fastdd.methods.base`), and `register_method(Method(...))`.
"""

from __future__ import annotations

from . import d3hr, dap, dit, igd, igds, mgd3, sam
from .base import Method, MethodSetup, Models, RealData, RunSpec
from .d3hr import D3HROptions
from .dap import DAPOptions
from .dit import DiTOptions
from .igd import IGDOptions
from .igds import IGDSOptions
from .mgd3 import MGD3Options
from .sam import SAMOptions

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (dit, igd, dap, mgd3, d3hr, sam, igds)}


def register_method(method: Method) -> None:
    """Make `method` available to `fastdd distill --method NAME` and `fastdd.distill(method=NAME)`."""
    name = method.name
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method names are alphanumeric (with - or _), got {name!r}")
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = method


def get_method(name: str) -> Method:
    """The registered method `name` (ValueError naming --method and the choices otherwise)."""
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Method",
    "MethodSetup",
    "Models",
    "RealData",
    "RunSpec",
    "get_method",
    "register_method",
    "DiTOptions",
    "IGDOptions",
    "DAPOptions",
    "MGD3Options",
    "D3HROptions",
    "SAMOptions",
    "IGDSOptions",
]
