"""Checks that fastdd._C was built with its CUDA kernels; no GPU needed (CI runs it on a CPU machine).

    python .ci/check_cuda_build.py [--archs "8.0;9.0+PTX"]

It checks the fastdd that imports: in CI (.ci/run) the one `pip install .` put in .ci-cuda-venv, beside a CUDA
build of torch (this script's folder, not the repository root, is on sys.path, so the source checkout does not
shadow it); in benchmarks/gpu/run_all.sh the in-place build (PYTHONPATH = the repository). It prints one line per
fact:
- torch is a CUDA build, and fastdd._C imports (without a GPU or libcuda) with WITH_CUDA = 1;
- the ops with a compiled CUDA implementation (OP_BACKENDS[op]["cuda"] holds "cuda") are exactly those that
  csrc/cuda/*.cu registers (TORCH_LIBRARY_IMPL(fastdd_C, CUDA, m) { m.impl("<op>", ...) }), and each has a kernel
  for the CUDA dispatch key: fastdd_C::<op> (the compiled kernel) and fastdd::<op> (the op users call);
- the .so holds machine code (cubins) for exactly the architectures of --archs (default: the TORCH_CUDA_ARCH_LIST
  that setup.py sets when no GPU is visible) and PTX for those marked +PTX, as cuobjdump lists them.
Any failure prints "check_cuda_build: FAIL: <why>" and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fail(message: str) -> None:
    print(f"check_cuda_build: FAIL: {message}", flush=True)
    sys.exit(1)


def say(message: str) -> None:
    print(f"check_cuda_build: {message}", flush=True)


def default_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST setup.py builds for when no GPU is visible (read from setup.py)."""
    found = re.search(r'os\.environ\["TORCH_CUDA_ARCH_LIST"\] = "([^"]+)"', (ROOT / "setup.py").read_text())
    if found is None:
        fail("setup.py sets no default TORCH_CUDA_ARCH_LIST")
    return found.group(1)


def expected_targets(arch_list: str) -> tuple[set[str], set[str]]:
    """({"sm_80", "sm_90"}, {"sm_90"}) for "8.0;9.0+PTX": the cubins, and the PTX (named by cuobjdump as sm_XY)."""
    cubins, ptx = set(), set()
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        arch = entry.removesuffix("+PTX")
        if not re.fullmatch(r"\d+\.\d+a?", arch):
            fail(f"cannot read architecture {entry!r} of {arch_list!r}")
        name = "sm_" + arch.replace(".", "")
        cubins.add(name)
        if entry.endswith("+PTX"):
            ptx.add(name)
    return cubins, ptx


def cuda_source_ops() -> set[str]:
    """The ops csrc/cuda/*.cu registers for the CUDA dispatch key."""
    ops = set()
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for block in re.findall(
            r"TORCH_LIBRARY_IMPL\(\s*fastdd_C\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\}", source.read_text(), re.S
        ):
            ops.update(re.findall(r'\.impl\(\s*"(\w+)"', block))
    return ops


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships (a CUDA build of torch brings Triton)."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    fail("no cuobjdump found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, triton's backends/nvidia/bin)")
    raise AssertionError  # unreachable


def list_targets(cuobjdump: str, library: str, kind: str) -> set[str]:
    """The architectures of the cubins (kind "elf") or PTX (kind "ptx") embedded in `library`."""
    proc = subprocess.run([cuobjdump, f"--list-{kind}", library], capture_output=True, text=True)
    if proc.returncode != 0 and "does not contain" not in proc.stdout + proc.stderr:
        fail(f"{cuobjdump} --list-{kind} {library} exited {proc.returncode}: {proc.stderr.strip()}")
    suffix = "cubin" if kind == "elf" else "ptx"
    return set(re.findall(rf"\.(sm_\d+a?)\.{suffix}\b", proc.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--archs",
        default=None,
        help="TORCH_CUDA_ARCH_LIST the build used (default: $TORCH_CUDA_ARCH_LIST, else setup.py's default)",
    )
    args = parser.parse_args()
    arch_list = args.archs or os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list()
    want_cubins, want_ptx = expected_targets(arch_list)

    import torch

    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} is a CPU build: install a CUDA build of torch first")
    try:
        ext = importlib.import_module("fastdd._C")
    except ImportError as err:
        fail(f"import fastdd._C: {err}")
    if getattr(ext, "WITH_CUDA", 0) != 1:
        fail(f"{ext.__file__} was built without its CUDA kernels (WITH_CUDA = {getattr(ext, 'WITH_CUDA', None)})")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    say(
        f"fastdd._C built against torch {torch.__version__} (CUDA {torch.version.cuda}), WITH_CUDA=1, imports "
        f"({gpu}): {ext.__file__}"
    )

    from fastdd import ops  # registers the fastdd:: ops and fills OP_BACKENDS
    from fastdd.ops._backend import OP_BACKENDS, compiled_kernel

    registry_ops = {op for op, prefs in OP_BACKENDS.items() if "cuda" in prefs["cuda"]}
    source_ops = cuda_source_ops()
    if not source_ops:
        fail("csrc/cuda/*.cu registers no op for the CUDA dispatch key")
    if registry_ops != source_ops:
        fail(
            f'OP_BACKENDS lists "cuda" for {sorted(registry_ops)} but csrc/cuda registers {sorted(source_ops)}: '
            "keep fastdd/ops and csrc/cuda in step"
        )
    for op in sorted(source_ops):
        for name in (f"fastdd_C::{op}", f"fastdd::{op}"):
            try:
                registered = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
            except RuntimeError as err:
                fail(f"{name}: {err}")
            if not registered:
                fail(f"{name} has no kernel for the CUDA dispatch key")
        if not compiled_kernel(op, "CUDA"):
            fail(f'fastdd.ops._backend.compiled_kernel("{op}", "CUDA") is False: backend="cuda" would not run')
        say(f"fastdd::{op} CUDA kernel registered (compiled fastdd_C::{op} for the CUDA dispatch key)")

    cuobjdump = find_cuobjdump()
    cubins = list_targets(cuobjdump, ext.__file__, "elf")
    ptx = list_targets(cuobjdump, ext.__file__, "ptx")
    if cubins != want_cubins or ptx != want_ptx:
        fail(
            f"TORCH_CUDA_ARCH_LIST={arch_list} wants cubins {sorted(want_cubins)} and PTX {sorted(want_ptx)}; "
            f"{os.path.basename(ext.__file__)} holds cubins {sorted(cubins)} and PTX {sorted(ptx)}"
        )
    say(
        f"cubins {' '.join(sorted(cubins))}; PTX {' '.join(sorted(ptx)) or 'none'} "
        f"(TORCH_CUDA_ARCH_LIST={arch_list}; {cuobjdump})"
    )

    # the C++ half of a CUDA build works too: one CPU call of a compiled kernel against the reference
    query, memory = torch.randn(3, 64, dtype=torch.float64), torch.randn(10, 64, dtype=torch.float64)
    values, indices = ops.max_cosine(query, memory, backend="cpp")
    ref_values, ref_indices = ops.reference.max_cosine(query, memory, None)
    if not (torch.allclose(values, ref_values) and torch.equal(indices, ref_indices)):
        fail("max_cosine on the cpp backend disagrees with the reference")
    say("OK")


if __name__ == "__main__":
    main()
