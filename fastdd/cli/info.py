"""`fastdd info`: versions, devices, and the op registry: which implementation each op runs on each device."""

from __future__ import annotations

import importlib.metadata
import platform

import torch


def package_version(package: str) -> str:
    """The installed version of package, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    import fastdd
    from fastdd import ops  # noqa: F401  (registers the ops)
    from fastdd.ops._backend import (
        DEVICE_TYPES,
        OP_BACKENDS,
        extension,
        extension_error,
        extension_has_cuda,
        resolve_backend,
    )

    lines = [f"fastdd {fastdd.__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for package in ("torch", "triton", "diffusers", "safetensors", "numpy"):
        lines.append(f"{package} {package_version(package)}")
    lines.append(f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}")
    ext = extension()
    lines.append(
        "fastdd._C: " + ("built with CUDA kernels" if extension_has_cuda() else "built (C++ CPU kernels)")
        if ext is not None
        else f"fastdd._C: missing ({extension_error()})"
    )
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for d in devices:
        name = (
            torch.cuda.get_device_name(d)
            if d.type == "cuda"
            else f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}"
        )
        lines.append(f"device {d}: {name}")
    lines.append("")
    lines.append("op".ljust(22) + "".join(str(d).ljust(12) for d in devices) + "auto order (cpu | cuda)")
    for op, prefs in sorted(OP_BACKENDS.items()):
        order = " | ".join(", ".join(prefs[device_type]) for device_type in DEVICE_TYPES)
        lines.append(op.ljust(22) + "".join(resolve_backend(op, "auto", d).ljust(12) for d in devices) + order)
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print versions, devices and the backend of each op")
    parser.set_defaults(func=lambda args: print(info_text()))
