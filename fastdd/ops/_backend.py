"""The op registry: which implementation ("backend") runs each fastdd op on each device type.

Implementations:
- reference: the plain PyTorch spec in `fastdd.ops.reference` (any device, always there).
- triton:    Triton kernels in `fastdd.ops.triton` for CUDA tensors (CPU tensors too under TRITON_INTERPRET=1).
- cpp:       the compiled `fastdd._C` C++ kernels for CPU tensors.
- cuda:      the compiled `fastdd._C` CUDA kernels for CUDA tensors (when built with CUDA).
- fused:     a fast path made of PyTorch ops (grad_cosine; any device).
- func:      torch.func per-sample gradients written competently (grad_cosine; any device): "auto" steps aside
             to it where the fused path does not pay (see grad_cosine._fused_pays).

Each custom op (`torch.ops.fastdd.*`) is defined once, with one kernel per device type (`register_kernels`):
the kernel runs the first usable implementation of `OP_BACKENDS[op][device type]` ("auto"). A public
function's `backend=` other than "auto" overrides that choice for its call (eager only; see `dispatch`).
FASTDD_NO_EXT=1 at run time leaves fastdd._C unloaded (ops then run on Triton or the reference).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda", "fused", "func")
PORTABLE = ("reference", "fused", "func")  # made of PyTorch ops: they run on any device
DEVICE_TYPES = ("cpu", "cuda")
_extension = None
_extension_error: str | None = None
_extension_loaded = False

# The registry: op name -> device type -> the implementations "auto" tries, in order (filled by the op modules)
OP_BACKENDS: dict[str, dict[str, tuple[str, ...]]] = {}
# (op name, backend) that an explicit backend= forces on the op's kernels for the current call (see dispatch)
_forced: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("fastdd_forced", default=None)


def extension():
    """The compiled `fastdd._C` module, or None (warns once, with the reason, when it is missing)."""
    global _extension, _extension_error, _extension_loaded
    if not _extension_loaded:
        _extension_loaded = True
        if os.environ.get("FASTDD_NO_EXT") == "1":
            _extension_error = "disabled by FASTDD_NO_EXT=1"
        else:
            try:
                _extension = importlib.import_module("fastdd._C")
            except ImportError as err:
                _extension_error = str(err)
        if _extension is None:
            warnings.warn(
                f"fastdd._C is not available ({_extension_error}); fastdd ops run on Triton (GPU) or the PyTorch "
                f"reference. {_how_to_build()}",
                stacklevel=2,
            )
    return _extension


def source_checkout() -> Path | None:
    """The repository root when fastdd is imported from a source checkout (setup.py and csrc/ beside it)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _how_to_build() -> str:
    if os.environ.get("FASTDD_NO_EXT") == "1":
        return "Unset FASTDD_NO_EXT to use it."
    root = source_checkout()
    if root is not None:
        return (
            f"fastdd is imported from the source checkout {root}, which has no built extension (it shadows an "
            "installed fastdd): build it in place with `pip install -e .`, or run from another folder to use the "
            "installed package."
        )
    return "Reinstall with `pip install .` (with torch installed first) to build it."


def extension_error() -> str | None:
    extension()
    return _extension_error


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", 0))


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastdd._C registered a kernel of `op` for `dispatch_key` ("CPU" or "CUDA")."""
    if extension() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdd_C::{op}", dispatch_key)
    except RuntimeError:  # the extension has no such operator
        return False


def backend_usable(backend: str, device: torch.device, op: str) -> bool:
    """Whether `backend` can run `op` on tensors of `device` in this process."""
    if backend in PORTABLE:
        return True
    if backend == "triton":
        return triton_importable() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))
    if backend == "cpp":
        return device.type == "cpu" and compiled_kernel(op, "CPU")
    if backend == "cuda":
        return device.type == "cuda" and compiled_kernel(op, "CUDA")
    return False


def register_op(name: str, *, cpu: tuple[str, ...], cuda: tuple[str, ...]) -> None:
    """Declare an op's implementations in "auto" preference order for CPU and CUDA tensors."""
    OP_BACKENDS[name] = {"cpu": cpu, "cuda": cuda}


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The implementation that runs `op` on `device` for the requested `backend`.

    Under torch.compile it runs once at trace time (it asks the dispatcher, which cannot be traced).

    "auto" picks the first usable implementation in the op's preference order (triton is not auto-picked
    on CPU). An explicit backend that is not implemented or cannot run here raises ValueError.
    """
    prefs = OP_BACKENDS[op]
    implemented = ("auto",) + tuple(dict.fromkeys(prefs["cpu"] + prefs["cuda"]))
    if backend not in implemented:
        raise ValueError(f"backend must be one of {implemented} for {op}, got {backend!r}")
    if backend == "auto":
        return next((b for b in prefs.get(device.type, ()) if backend_usable(b, device, op)), "reference")
    if not backend_usable(backend, device, op):
        raise ValueError(f"backend={backend!r} cannot run {op} on {device.type} tensors in this process")
    return backend


def current_backend(op: str, device: torch.device) -> str:
    """The implementation op's kernel runs on `device` now: the one forced by `dispatch`, else auto's choice."""
    forced = _forced.get()
    return forced[1] if forced is not None and forced[0] == op else resolve_backend(op, "auto", device)


@contextlib.contextmanager
def forced_backend(op: str, backend: str):
    """Within the block, op's kernels run `backend` (a usable implementation) instead of auto's choice."""
    token = _forced.set((op, backend))
    try:
        yield
    finally:
        _forced.reset(token)


def _kernel(name: str, implementations: dict[str, Callable], device: torch.device, *args, **kwargs):
    return implementations[current_backend(name, device)](*args, **kwargs)


def register_kernels(op, name: str, implementations: dict[str, Callable]) -> None:
    """The one kernel per device type of the custom op `op`: implementations[current_backend(name, device)].

    implementations maps backend names to functions of the op's arguments (one entry per backend of
    OP_BACKENDS[name]); ops that share an entry (a backward op and its forward) share the choice.
    """
    for device_type in DEVICE_TYPES:
        op.register_kernel(device_type, functools.partial(_kernel, name, implementations, torch.device(device_type)))


def dispatch(op: Callable, name: str, backend: str, device: torch.device, *args):
    """op(*args) on the implementation `backend` selects (resolve_backend) for tensors on `device`.

    auto's choice goes straight through the dispatcher (what torch.compile traces); another explicit backend is
    forced on the op's kernel for this call, in eager mode only.
    """
    chosen = resolve_backend(name, backend, device)
    auto = resolve_backend(name, "auto", device)
    if chosen == auto:
        return op(*args)
    if torch.compiler.is_compiling():
        raise ValueError(
            f"backend={backend!r} overrides {name}'s {auto!r} on {device.type}, which torch.compile cannot trace; "
            "pass backend='auto' (or change OP_BACKENDS)"
        )
    with forced_backend(name, chosen):
        return op(*args)
