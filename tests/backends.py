"""pytest parameters for the backends of a fastdd op that can run on this machine's CPU, and inputs every backend
must treat alike."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from fastdd import ops
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


def exact_ties(dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Cosine-memory inputs whose best rows tie EXACTLY on every backend: equal rows, and power-of-two multiples
    of basis vectors (norms, normalisations and cosines without rounding). The expected indices are the lowest
    of the tied rows. -> {"max_cosine": (query [4, D], memory [40, D], count, indices),
    "most_similar_index": [(memory [M, D], count, index), ...]}."""
    g = torch.Generator().manual_seed(0)
    dim = 24
    basis = torch.eye(dim, dtype=torch.float64)
    memory = torch.randn(40, dim, generator=g, dtype=torch.float64)
    memory[[20, 33]] = memory[7].clone()  # equal rows in three Triton memory tiles
    memory[5], memory[18], memory[2] = 0.5 * basis[0], 2 * basis[0], 4 * basis[1]
    query = torch.stack([memory[20], 3 * memory[7], 4 * basis[0], basis[0] + basis[1]])
    equal_rows = torch.randn(12, dim, generator=g, dtype=torch.float64)
    equal_rows[[2, 6, 9]] = equal_rows.sum(0)  # three copies of the rows' mean direction: the largest summed cosine
    equal_scores = torch.cat(
        [  # summed cosines 1, 2, 2, 2, 2, then rows past count
            torch.stack([4 * basis[2], 2 * basis[0], 8 * basis[1], 0.5 * basis[0], 2 * basis[1]]),
            torch.randn(3, dim, generator=g, dtype=torch.float64),
        ]
    )
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return {
        "max_cosine": (cast(query), cast(memory), 36, [7, 7, 5, 2]),
        "most_similar_index": [(cast(equal_rows), None, 2), (cast(equal_scores), 5, 1)],
    }


def assert_exact_ties_go_to_the_lowest_index(backend: str, dtype: torch.dtype = torch.float32, device="cpu") -> None:
    """max_cosine's indices and most_similar_index on `backend` pick the lowest of exactly tied rows."""
    ties = exact_ties(dtype, device)
    query, memory, count, expected = ties["max_cosine"]
    _, indices = ops.max_cosine(query, memory, count, backend=backend)
    assert indices.tolist() == expected, (backend, indices.tolist(), expected)
    for memory, count, expected in ties["most_similar_index"]:
        index = int(ops.most_similar_index(memory, count, backend=backend))
        assert index == expected, (backend, index, expected)
