"""Builds fastdd and its compiled extension fastdd._C from csrc/.

C++ CPU kernels always; CUDA kernels too when the installed torch has CUDA and nvcc is found.
FASTDD_FORCE_CUDA=1 builds the CUDA kernels regardless; FASTDD_NO_EXT=1 builds no extension (and, set at run
time, leaves a built one unloaded): fastdd then runs on Triton / the PyTorch reference.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def import_installed_torch():
    """The torch the user installed, also under pip's build isolation (which hides it).

    Building against another torch than the one that imports the extension breaks its ABI, so
    torch is not a build requirement: we ask the outer interpreter where its torch lives.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if found.returncode != 0:
        return None
    sys.path.append(found.stdout.strip().splitlines()[-1])
    import torch

    return torch


def _is_cuda_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home(cpp_extension) -> str | None:
    """The CUDA toolkit's root for the build (sets cpp_extension.CUDA_HOME), or None when there is none.

    Without CUDA_HOME / CUDA_PATH, torch takes two folders above `which nvcc`, which is wrong when the nvcc on PATH
    is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc -> /usr/local: no headers, no libcudart,
    so the link fails). Then nvcc itself says where its toolkit is (`TOP=` of `nvcc --dryrun`).
    """
    guess = cpp_extension.CUDA_HOME
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _is_cuda_toolkit(guess):
        return guess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return guess
    probe = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    out = subprocess.run(probe, capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    root = os.path.realpath(top.group(1).strip()) if top else None
    if not _is_cuda_toolkit(root):
        return guess
    print(f"fastdd: CUDA toolkit at {root} (from {nvcc})")
    cpp_extension.CUDA_HOME = root
    os.environ["CUDA_HOME"] = root
    return root


def extension_modules():
    if os.environ.get("FASTDD_NO_EXT") == "1":
        print("fastdd: FASTDD_NO_EXT=1, building without fastdd._C")
        return [], {}
    torch = import_installed_torch()
    if torch is None:
        print("fastdd: no installed torch found, building without fastdd._C")
        return [], {}
    from torch.utils import cpp_extension

    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    sources.insert(0, "csrc/module.cpp")
    cuda_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    force_cuda = os.environ.get("FASTDD_FORCE_CUDA") == "1"
    cuda_home = find_cuda_home(cpp_extension) if force_cuda or torch.version.cuda is not None else None
    want_cuda = force_cuda or (torch.version.cuda is not None and cuda_home is not None)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    if want_cuda and cuda_sources:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to ask for its architecture (a build machine): build for Ampere and Hopper, PTX for newer
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        extra["cxx"] = cxx_flags + ["-DFASTDD_WITH_CUDA=1"]
        extra["nvcc"] = ["-O3", "-std=c++20", "-DFASTDD_WITH_CUDA=1", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(
            "fastdd._C", sources + cuda_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"]
        )
    else:
        ext = cpp_extension.CppExtension("fastdd._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    print(
        f"fastdd: building fastdd._C ({'C++ + CUDA for TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] if 'nvcc' in extra else 'C++ CPU'}) against torch {torch.__version__}"
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
