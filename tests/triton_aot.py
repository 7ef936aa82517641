"""Ahead-of-time compilation of Triton kernels for real GPUs, with no GPU present.

`compile_for_gpu(kernel, signature, constexprs, arch)` runs `triton.compile` for sm_<arch> and reads
the cubin's resource usage (registers, spills, shared memory) with the cuobjdump Triton ships.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# per-block shared-memory limits (bytes) of the targets we build for
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


@dataclass
class KernelResources:
    name: str
    arch: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills and stack arrays)
    shared_bytes: int


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_for_gpu(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    shared = max(field("SHARED"), compiled.metadata.shared)
    return KernelResources(compiled.metadata.name, arch, field("REG"), field("LOCAL") + field("STACK"), shared)


def assert_fits(res: KernelResources) -> None:
    """No register spills and shared memory within the target's per-block limit."""
    assert res.spill_bytes == 0, f"{res.name} on sm_{res.arch}: {res.spill_bytes} bytes of local memory (spills)"
    assert res.shared_bytes <= SHARED_LIMIT[res.arch], (
        f"{res.name} on sm_{res.arch}: {res.shared_bytes} B shared memory"
    )
