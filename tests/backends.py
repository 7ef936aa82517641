"""pytest parameters for the backends of a fastdd op that can run on this machine's CPU."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch

from fastdd.ops._backend import backend_usable, compiled_kernel


def cpu_backend_params(cpp_ops: Sequence[str], triton_op: str, cpp_missing: str) -> list:
    """[reference, cpp, triton] params; cpp is skipped unless fastdd._C has every op of cpp_ops for the CPU
    ("fastdd._C lacks {cpp_missing}"), triton unless it is importable and TRITON_INTERPRET=1."""
    params = [pytest.param("reference")]
    if all(compiled_kernel(op, "CPU") for op in cpp_ops):
        params.append(pytest.param("cpp"))
    else:
        skip = pytest.mark.skip(reason=f"fastdd._C lacks {cpp_missing}; run setup.py build_ext")
        params.append(pytest.param("cpp", marks=skip))
    if backend_usable("triton", torch.device("cpu"), triton_op):
        params.append(pytest.param("triton"))
    else:
        skip = pytest.mark.skip(reason="triton is not importable or TRITON_INTERPRET!=1")
        params.append(pytest.param("triton", marks=skip))
    return params
