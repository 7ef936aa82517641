"""Options as frozen dataclasses: one definition gives the Python keyword, the CLI flag and the documentation.

A field made with `option(default, help, flag=..., choices=...)` carries its CLI flag and help in its metadata;
`fastdd.cli.options` turns the fields into argparse arguments, so `fastdd distill --help` and the Python API
cannot drift apart. `documented` appends an "Attributes:" section built from the same help to the class
docstring. Range fields ("low,high" on the command line) are `tuple[int, int]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

REQUIRED = dataclasses.MISSING


def option(
    default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None, compare: bool = True
) -> Any:
    """A dataclass field with its CLI flag (default: --<field-name>), help text and allowed values; default REQUIRED
    makes a field without default (a required CLI option). compare=False: a location that does not determine the
    images (what is read from it is checked on its own), left out of the run config a resume compares."""
    metadata = {"help": help, "flag": flag, "choices": choices, "compare": compare}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The CLI flag of an option field (`--igd-k` for IGDOptions.k)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def dest_of(field: dataclasses.Field) -> str:
    """The argparse destination (and manifest key) of an option field: its flag without dashes."""
    return flag_of(field).lstrip("-").replace("-", "_")


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of an options dataclass that are options (those made with `option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def documented(cls: type) -> type:
    """Class decorator: append 'Attributes:' (name: help (default; flag)) to the docstring of an options class."""
    lines = [(cls.__doc__ or cls.__name__).rstrip(), "", "Attributes:"]
    for field in option_fields(cls):
        default = "required" if field.default is REQUIRED else f"default {field.default!r}"
        lines.append(f"    {field.name}: {field.metadata['help']} ({default}; CLI {flag_of(field)})")
    cls.__doc__ = "\n".join(lines) + "\n"
    return cls


def record(options: Any) -> dict:
    """{manifest key: value} of an options instance, as JSON (ranges as the CLI's 'low,high' text), without the fields
    made with compare=False."""
    out = {}
    for field in option_fields(type(options)):
        if not field.metadata.get("compare", True):
            continue
        value = getattr(options, field.name)
        out[dest_of(field)] = f"{value[0]},{value[1]}" if isinstance(value, tuple) else value
    return out


def parse_range(text: str | tuple, option_name: str) -> tuple[int, int]:
    """'low,high' (or a pair) of respaced indices for 50 steps, 0 <= low <= high <= 49; ValueError naming option."""
    try:
        low, high = (int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise ValueError(f"{option_name} must be two integers low,high, got {text!r}") from None
    if not 0 <= low <= high <= 49:
        raise ValueError(f"{option_name} must satisfy 0 <= low <= high <= 49, got {text!r}")
    return low, high
