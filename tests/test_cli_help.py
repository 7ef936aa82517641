"""Every option of every `fastdd` command says what it is, its choices and its default; every command a user-facing
message or the README tells a user to run exists in what `pip install .` installs."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastdd.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def commands(parser: argparse.ArgumentParser, prefix: str = "fastdd") -> dict[str, argparse.ArgumentParser]:
    """{'fastdd distill': parser, 'fastdd prior train': parser, ...}: every (sub)command with its parser."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, f"{prefix} {name}"))
    return found


ALL = commands(build_parser())
UNDOCUMENTED_DEFAULTS = (None, False, argparse.SUPPRESS)


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(ALL))
def test_every_option_has_help_choices_and_default(command):
    parser = ALL[command]
    rendered = parser.format_help()
    for action in options(parser):
        flag = action.option_strings[-1]
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 12, f"{command} {flag}: no help"
        assert "SPEC" not in action.help, f"{command} {flag}: cites SPEC, which the repository does not ship"
        if action.default not in UNDOCUMENTED_DEFAULTS and not action.required:
            assert "default" in action.help, f"{command} {flag}: default {action.default!r} not shown"
        for choice in action.choices or ():
            assert str(choice) in rendered, f"{command} {flag}: choice {choice} not named"


def test_distill_and_eval_are_checked():
    """The two commands the issue names are among those checked, with their main options."""
    assert {"--method", "--model", "--vae", "--steps", "--seed"} <= {
        flag for a in options(ALL["fastdd distill"]) for flag in a.option_strings
    }
    assert {"--arch", "--seeds", "--quiet", "--labels", "--teacher"} <= {
        flag for a in options(ALL["fastdd eval"]) for flag in a.option_strings
    }


def test_a_missing_help_text_would_fail():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    with pytest.raises(AssertionError):
        ALL["probe"] = parser
        try:
            test_every_option_has_help_choices_and_default("probe")
        finally:
            del ALL["probe"]


COMMAND = re.compile(
    r"(?:`|^\s*(?:[A-Z_]+=\S+ )*)((?:fastdd|hf|huggingface-cli|torchrun|python -m fastdd)(?: [a-z][\w-]*)*)", re.M
)


def named_commands() -> set[str]:
    """Every command back-quoted in fastdd's source (its messages and docs) or the README, or opening a line of a code block
    there (after VAR=value settings)."""
    texts = [path.read_text() for path in (ROOT / "fastdd").rglob("*.py")] + [(ROOT / "README.md").read_text()]
    return {match.group(1) for text in texts for match in COMMAND.finditer(text)}


def test_named_commands_exist():
    named = named_commands()
    assert "hf download" in named and "fastdd distill" in named  # the scan finds what it must check
    for command in sorted(named):
        words = command.split()
        if words[0] == "python":  # python -m fastdd ...: the same parser
            words = words[2:]
        if words[0] == "fastdd":
            known = [name for name in ALL if words[: len(name.split())] == name.split()]
            assert known, f"`{command}` is named but fastdd has no such command"
            deepest = max(known, key=len)
            extra = words[len(deepest.split()) :]
            subcommands = [a for a in ALL[deepest]._actions if isinstance(a, argparse._SubParsersAction)]
            assert not (extra and subcommands), f"`{command}`: {deepest} has no sub-command {extra[0]}"
        else:
            program = shutil.which(words[0], path=str(Path(sys.executable).parent)) or shutil.which(words[0])
            assert program, f"`{command}` is named but {words[0]} is not installed"
            shown = subprocess.run([program, *words[1:2], "--help"], capture_output=True, text=True, timeout=120)
            assert shown.returncode == 0, f"`{command} --help` failed: {shown.stderr[-300:]}"
