"""Backend selection for fastdd ops: "auto" | "reference" | "triton" | "cpp" | "cuda".

- reference: the plain PyTorch spec in `fastdd.ops.reference` (any device, always there).
- triton:    Triton kernels in `fastdd.ops.triton` for CUDA tensors (CPU tensors too under TRITON_INTERPRET=1).
- cpp:       the compiled `fastdd._C` C++ kernels for CPU tensors.
- cuda:      the compiled `fastdd._C` CUDA kernels for CUDA tensors (when built with CUDA).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")
_extension = None
_extension_error: str | None = None
_extension_loaded = False

# op name -> backends it implements, in "auto" preference order per device type (filled by the op modules)
OP_BACKENDS: dict[str, dict[str, tuple[str, ...]]] = {}


def extension():
    """The compiled `fastdd._C` module, or None (warns once, with the reason, when it is missing)."""
    global _extension, _extension_error, _extension_loaded
    if not _extension_loaded:
        _extension_loaded = True
        try:
            _extension = importlib.import_module("fastdd._C")
        except ImportError as err:
            _extension_error = str(err)
            if os.environ.get("FASTDD_NO_EXT") != "1":
                warnings.warn(
                    f"fastdd._C is not available ({err}); fastdd ops run on Triton (GPU) or the PyTorch "
                    "reference. Reinstall with `pip install .` to build it.",
                    stacklevel=2,
                )
    return _extension


def extension_error() -> str | None:
    extension()
    return _extension_error


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "WITH_CUDA", 0))


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


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
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_importable() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))
    if backend == "cpp":
        return device.type == "cpu" and compiled_kernel(op, "CPU")
    if backend == "cuda":
        return device.type == "cuda" and compiled_kernel(op, "CUDA")
    return False


def register_op(name: str, *, cpu: tuple[str, ...], cuda: tuple[str, ...]) -> None:
    """Declare an op's backends in "auto" preference order for CPU and CUDA tensors."""
    OP_BACKENDS[name] = {"cpu": cpu, "cuda": cuda}


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs `op` on `device` for the requested `backend`.

    Under torch.compile it runs once at trace time (it asks the dispatcher, which cannot be traced).

    "auto" picks the first usable backend in the op's preference order (triton is not auto-picked on CPU).
    An explicit backend that is not implemented or cannot run here raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    prefs = OP_BACKENDS[op]
    implemented = set(prefs["cpu"]) | set(prefs["cuda"]) | {"reference"}
    if backend == "auto":
        for candidate in prefs.get(device.type, ("reference",)):
            if backend_usable(candidate, device, op):
                return candidate
        return "reference"
    if backend not in implemented:
        raise ValueError(f"backend={backend!r} is not implemented for {op}; choose from {sorted(implemented)}")
    if not backend_usable(backend, device, op):
        raise ValueError(f"backend={backend!r} cannot run {op} on {device.type} tensors in this process")
    return backend
