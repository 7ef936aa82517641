"""The Python API and the layout: `fastdd.distill` makes the bytes `fastdd distill` makes (and the bytes recorded
before the layout redesign), no module below fastdd/cli imports argparse, every module imports on its own, the
module import graph has no cycle, the CLI's method flags are the options dataclasses' fields, and every ```python
block of the README runs as written."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import recorded_outputs
from recorded_outputs import image_list

import fastdd
from fastdd.cli.main import build_parser, main
from fastdd.methods import METHODS
from fastdd.options import dest_of, flag_of, option_fields

PACKAGE = Path(fastdd.__file__).resolve().parent  # the fastdd that is imported (installed, or the checkout)
ROOT = PACKAGE.parent
README = Path(__file__).resolve().parents[1] / "README.md"

SMALL_OPTIONS = {
    "dit": fastdd.DiTOptions(),
    "igd": fastdd.IGDOptions(k=3.0),
    "dap": fastdd.DAPOptions(gamma=0.1),
    "mgd3": fastdd.MGD3Options(),
    "d3hr": fastdd.D3HROptions(candidates=50),
    "sam": fastdd.SAMOptions(epochs=1, batch=16),
    "igds": fastdd.IGDSOptions(epochs=1, classifier_epochs=3),
}
SMALL_FLAGS = {
    "dit": [],
    "igd": ["--igd-k", "3.0"],
    "dap": ["--dap-gamma", "0.1"],
    "mgd3": [],
    "d3hr": ["--d3hr-candidates", "50"],
    "sam": ["--sam-epochs", "1", "--sam-batch", "16"],
    "igds": ["--igds-epochs", "1", "--igds-classifier-epochs", "3"],
}


def folder_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the run folder's own path replaced in JSON files)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".json":
            data = data.replace(str(root).encode(), b"<out>")
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def test_every_method_is_registered_with_documented_options():
    assert sorted(METHODS) == sorted(SMALL_OPTIONS)
    for method in METHODS.values():
        assert dataclasses.is_dataclass(method.options) and method.options.__dataclass_params__.frozen
        for field in option_fields(method.options):
            assert field.name in method.options.__doc__ and flag_of(field) in method.options.__doc__


def test_cli_method_flags_are_generated_from_the_dataclasses():
    parser = build_parser()
    distill = parser._subparsers._group_actions[0].choices["distill"]
    flags = {flag: action for action in distill._actions for flag in action.option_strings}
    expected = {flag_of(f) for m in METHODS.values() for f in option_fields(m.options)}
    expected |= {flag_of(f) for f in option_fields(fastdd.RunSpec)}
    assert expected == set(flags) - {"-h", "--help"}
    for method in METHODS.values():
        for field in option_fields(method.options):
            action = flags[flag_of(field)]
            assert action.dest == dest_of(field) and action.help.startswith(field.metadata["help"])
            assert action.default == field.default


@pytest.mark.parametrize("method", sorted(SMALL_OPTIONS))
def test_python_api_writes_the_bytes_of_the_cli(tmp_path, method):
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    args = [
        "distill",
        "--method",
        method,
        "--ipc",
        "2",
        "--out",
        str(by_cli),
        "--steps",
        "5",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(args + SMALL_FLAGS[method]) == 0
    result = fastdd.distill(method, 2, by_api, SMALL_OPTIONS[method], steps=5, quiet=True, device="cpu")
    assert result == fastdd.RunResult(by_api, 20, 20)
    assert folder_bytes(by_cli) == folder_bytes(by_api)
    again = fastdd.distill(method, 2, by_api, SMALL_OPTIONS[method], steps=5, quiet=True, device="cpu")
    assert again.generated == 0 and folder_bytes(by_cli) == folder_bytes(by_api)  # resumed: nothing left to do


@pytest.mark.parametrize(
    "options, settings, message",
    [
        (fastdd.DAPOptions(kernel="cubic"), {}, "--dap-kernel must be one of linear, rbf, poly, got 'cubic'"),
        (None, {"sampler": "euler"}, "--sampler must be one of ddpm, ddim, dpm-solver++, got 'euler'"),
        (fastdd.IGDOptions(k=float("nan")), {}, "--igd-k must be a finite number"),
    ],
)
def test_python_api_checks_choices_and_finite_values_like_the_cli(tmp_path, options, settings, message):
    method = "dap" if isinstance(options, fastdd.DAPOptions) else "igd"
    with pytest.raises(ValueError, match=re.escape(message)):
        fastdd.distill(method, 2, tmp_path / "x", options, **settings)
    assert not (tmp_path / "x").exists()


def test_python_api_refuses_options_of_another_method(tmp_path):
    with pytest.raises(ValueError, match="igd takes IGDOptions"):
        fastdd.distill("igd", 2, tmp_path / "x", fastdd.DAPOptions())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", sorted(SMALL_OPTIONS))
def test_default_run_makes_the_recorded_images_and_its_dry_run_estimate_holds(tmp_path, capsys, method):
    """`fastdd distill --method M --ipc 2` on the digits default with default options makes the recorded images
    (tests/recorded_outputs.py): the same bytes on a platform with its own record, the same pixels within the
    method's measured rounding tolerance on any CPU; and its --dry-run estimate is within 2× of the real time (plus
    1 s for the shortest runs, whose few seconds are timer noise on a shared CPU)."""
    out = tmp_path / method
    fastdd.distill(method, 2, out, quiet=True, device="cpu", dry_run=True)
    estimate = float(re.search(r"estimate\s+~(\d+(?:\.\d+)?) s", capsys.readouterr().out).group(1))
    start = time.perf_counter()
    fastdd.distill(method, 2, out, quiet=True, device="cpu")
    real = time.perf_counter() - start
    assert recorded_outputs.within_tolerance(method, out), recorded_outputs.pixel_difference(method, out)
    recorded = recorded_outputs.recorded_sha256(method)
    if recorded is not None:
        assert image_list(out) == recorded
    assert real / 2 - 1 <= estimate <= 2 * real + 1, (estimate, real)


@pytest.mark.parametrize("method", sorted(SMALL_OPTIONS))
def test_a_small_real_change_breaks_the_pixel_guard(tmp_path, method):
    """The cross-platform guard is not vacuous: a small change of one option (recorded_outputs.REAL_CHANGES) moves
    the images beyond the method's tolerance."""
    options, settings = recorded_outputs.REAL_CHANGES[method]
    out = tmp_path / method
    fastdd.distill(method, 2, out, options, quiet=True, device="cpu", **settings)
    assert not recorded_outputs.within_tolerance(method, out), recorded_outputs.pixel_difference(method, out)


def module_names() -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    )


def test_no_module_below_cli_imports_argparse():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [str(path) for n in names if n.split(".")[0] == "argparse"]
    assert not offenders


def module_level_imports(path: Path, name: str) -> set[str]:
    """fastdd modules imported at module level (not inside functions) by module `name` at `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (base + ("." + node.module if node.module else "")) if node.level else node.module
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "fastdd"}


def module_path(name: str) -> Path:
    folder = ROOT / name.replace(".", "/")
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def test_module_import_graph_has_no_cycle():
    """Edges: module M imports X (at module level) -> M needs X and X's parent packages, except M's own parents
    (Python initialises those before M, whatever M imports)."""
    names = set(module_names())
    graph: dict[str, set[str]] = {}
    for name in names:
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        needed = set()
        for imported in module_level_imports(module_path(name), name) & names:
            parts = imported.split(".")
            needed |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = (needed & names) - own_parents - {name}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in sorted(names):
        if name not in state:
            visit(name, [])


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (fails on a cycle that only shows when a module is imported first)."""
    script = "import importlib, sys; importlib.import_module(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTDD_NO_EXT": os.environ.get("FASTDD_NO_EXT", "")}

    def import_alone(name: str) -> str | None:
        proc = subprocess.run([sys.executable, "-c", script, name], env=env, capture_output=True, text=True)
        return f"{name}: {proc.stderr.strip().splitlines()[-1]}" if proc.returncode != 0 else None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(import_alone, [n for n in module_names() if not n.endswith("__main__")]) if f]
    assert not failures, failures


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs_as_written(tmp_path, index):
    """Each block in a fresh interpreter in an empty folder, on the shipped digits assets."""
    code = readme_blocks()[index]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README block {index}:\n{code}\n{proc.stderr[-3000:]}"
