"""`--method dit`: the unguided prior (plain class-conditional sampling with CFG), the baseline of every table."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodSetup, Models, RealData, RunSpec


@dataclass(frozen=True)
class DiTOptions:
    """The unguided prior has no options of its own."""


def build(options: DiTOptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """No guidance: the run's sampler as is."""
    return MethodSetup()


METHOD = Method(
    "dit",
    DiTOptions,
    build,
    needs_data=False,
    help="unguided class-conditional sampling from the prior (baseline)",
    guides_steps=False,
)
