"""argparse arguments generated from options dataclasses (`fastdd.options`), and the dataclasses read back."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from ..options import REQUIRED, dest_of, flag_of, option_fields, parse_range


def _value_type(cls: type, field: dataclasses.Field) -> Any:
    """The field's annotation without `| None` (int, float, str, bool or tuple[int, int])."""
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_options(parser: argparse.ArgumentParser | Any, cls: type, *, title: str | None = None) -> None:
    """One argument per option field of `cls` (its flag, help, choices, default and type), in a group if titled."""
    group = parser.add_argument_group(title) if title else parser
    for field in option_fields(cls):
        value_type, flag = _value_type(cls, field), flag_of(field)
        help_text = field.metadata["help"]
        if field.default not in (REQUIRED, None, False) and "default" not in help_text:
            shown = f"{field.default[0]},{field.default[1]}" if isinstance(field.default, tuple) else field.default
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": dest_of(field), "help": help_text}
        if field.default is REQUIRED:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
        if value_type is bool:
            group.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["type"] = str if typing.get_origin(value_type) is tuple else value_type  # ranges: options_from_args
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        group.add_argument(flag, **kwargs)


def options_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of `cls` from the parsed arguments `add_options` defined ('low,high' ranges parsed here:
    ValueError naming the flag)."""
    values = {}
    for field in option_fields(cls):
        value = getattr(args, dest_of(field))
        values[field.name] = (
            parse_range(value, flag_of(field))
            if isinstance(value, str) and typing.get_origin(_value_type(cls, field)) is tuple
            else value
        )
    return cls(**values)
