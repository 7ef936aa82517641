"""The CUDA sources in csrc/cuda compile with nvcc for sm_80 and sm_90, so the GPU build cannot
silently break on machines without a GPU. Also checks ptxas reports no register spills."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

CUDA_SOURCES = sorted((Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


@pytest.fixture(scope="module")
def include_flags(tmp_path_factory):
    # CPU builds of torch ship the c10/cuda headers without their generated cmake-macros header.
    stub = tmp_path_factory.mktemp("stub")
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
    )
    return [f"-I{stub}"] + [f"-I{p}" for p in cpp_extension.include_paths()]


@pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm80_and_sm90(source, include_flags, tmp_path):
    cmd = [
        NVCC,
        "-std=c++20",
        "-O3",
        "-DFASTDD_WITH_CUDA=1",
        "-Xptxas",
        "-v",
        "-w",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-c",
        str(source),
        "-o",
        str(tmp_path / "out.o"),
        *include_flags,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills and max(spills) == 0, f"register spills in {source.name}:\n{result.stderr[-4000:]}"
