"""Builds fastdd and its compiled extension fastdd._C from csrc/.

C++ CPU kernels always; CUDA kernels too when the installed torch has CUDA and nvcc is found.
FASTDD_FORCE_CUDA=1 builds the CUDA kernels regardless; FASTDD_NO_EXT=1 builds no extension (and, set at run
time, leaves a built one unloaded): fastdd then runs on Triton / the PyTorch reference.
"""

import glob
import os
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
    want_cuda = os.environ.get("FASTDD_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
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
        f"fastdd: building fastdd._C ({'C++ + CUDA' if 'nvcc' in extra else 'C++ CPU'}) against torch {torch.__version__}"
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
