"""Versions of fastdd and its main dependencies, as the manifest and `fastdd info` record them."""

from __future__ import annotations

import importlib.metadata
import platform

RECORDED_PACKAGES = ("fastdd", "torch", "diffusers", "safetensors", "numpy")


def package_version(package: str) -> str:
    """The installed version of package, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    """{"python": ..., package: version} for the manifest."""
    return {"python": platform.python_version()} | {package: package_version(package) for package in RECORDED_PACKAGES}
