"""The compiled CUDA kernels of fastdd._C (csrc/cuda/*.cu), backend="cuda", against the PyTorch reference.

Needs a GPU and fastdd._C built with CUDA (`pip install .` with a CUDA build of torch); skipped otherwise.
On machines without a GPU, tests/test_cuda_sources.py still compiles the sources for sm_80 / sm_90.
"""

import pytest
import torch
from backends import assert_exact_ties_go_to_the_lowest_index

from fastdd import ops
from fastdd.ops import CosineMemory, reference
from fastdd.ops._backend import backend_usable, compiled_kernel

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not compiled_kernel("max_cosine", "CUDA"),
    reason="needs a GPU and fastdd._C built with CUDA kernels",
)
CUDA = torch.device("cuda")
# (B, M, D, count): D = 4096 / 512 take the 16-byte loads, odd D the element loads; B > 4 spans query tiles;
# count = 0 (empty memory), None (all rows) and a partial count
SHAPES = [(1, 64, 4096, None), (16, 64, 512, 37), (3, 7, 33, 5), (20, 40, 70, 37), (2, 5, 16, 0), (17, 33, 129, None)]


def _inputs(batch, rows, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    query, memory = torch.randn(batch, dim, generator=g), torch.randn(rows, dim, generator=g)
    return query.to(CUDA, dtype), memory.to(CUDA, dtype)


def _count(count):
    return None if count is None else torch.tensor(count, device=CUDA)


def _grad_and_second_order(fn, query):
    """(∂ Σ values / ∂ query, ∂ Σ (that)² / ∂ query) for fn(query) -> values."""
    q = query.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(q).sum(), q, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), q)
    return grad, second


# --------------------------------------------------------------------------- max_cosine
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_max_cosine_matches_reference_with_gradients(shape):
    batch, rows, dim, count = shape
    query, memory = _inputs(batch, rows, dim)
    count = _count(count)
    values, indices = ops.max_cosine(query, memory, count, backend="cuda")
    ref_values, ref_indices = reference.max_cosine(query.double(), memory.double(), count)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (batch,)
    assert values.device.type == "cuda" and indices.device.type == "cuda"
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices, ref_indices)

    grad, second = _grad_and_second_order(lambda q: ops.max_cosine(q, memory, count, backend="cuda")[0], query)
    ref_grad, ref_second = _grad_and_second_order(lambda q: reference.max_cosine(q, memory, count)[0], query)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(second, ref_second, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [64, 40, 33])  # 16-byte loads, element loads (D % 8 != 0)
def test_max_cosine_half_precision_accumulates_in_float32(query_dtype, memory_dtype, dim):
    query, memory = _inputs(9, 50, dim, seed=1)
    query, memory = query.to(query_dtype), memory.to(memory_dtype)
    values, indices = ops.max_cosine(query, memory, 45, backend="cuda")
    assert values.dtype == query_dtype
    exact_values, exact_indices = reference.max_cosine(query.double(), memory.double(), 45)
    # float32 accumulation, then one rounding to the query dtype (the bfloat16 reference is ~100x less exact)
    rtol = 1e-5 if query_dtype == torch.float32 else torch.finfo(query_dtype).eps
    torch.testing.assert_close(values.double(), exact_values, rtol=rtol, atol=1e-6)
    assert torch.equal(indices, exact_indices)


def test_max_cosine_float64_gradcheck():
    query, memory = _inputs(5, 6, 8, dtype=torch.float64, seed=3)
    query.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: ops.max_cosine(q, memory, 4, backend="cuda")[0], (query,))
    assert torch.autograd.gradgradcheck(lambda q: ops.max_cosine(q, memory, 4, backend="cuda")[0], (query,))
    values, indices = ops.max_cosine(query.detach(), memory.float(), 4, backend="cuda")  # float64 accumulation
    ref_values, ref_indices = reference.max_cosine(query.detach(), memory.float().double(), 4)
    torch.testing.assert_close(values, ref_values, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, ref_indices)


def test_max_cosine_ties_go_to_the_lowest_index():
    _, memory = _inputs(1, 300, 64, seed=2)  # 300 rows: ties across the threads of the selection block
    memory[3] = memory[1]
    memory[200] = memory[1]
    memory[299] = memory[2]
    query = memory[[1, 3, 2, 200]] + 0.0
    values, indices = ops.max_cosine(query, memory, backend="cuda")
    ref_values, ref_indices = reference.max_cosine(query, memory)
    assert indices.tolist() == ref_indices.tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(values, ref_values)


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_ties_go_to_the_lowest_index_on_the_gpu(backend, dtype):
    if not backend_usable(backend, CUDA, "max_cosine"):
        pytest.skip(f"{backend} cannot run on CUDA tensors here")
    assert_exact_ties_go_to_the_lowest_index(backend, dtype, CUDA)


def test_max_cosine_unaligned_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(70, 66, generator=g).to(CUDA)
    query, memory = wide[:6, 1:65], wide[6:, 2:66]  # rows start 4 / 8 bytes past 16-byte boundaries
    values, indices = ops.max_cosine(query, memory, 50, backend="cuda")
    ref_values, ref_indices = reference.max_cosine(query, memory, 50)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    column_major = wide[:40, :64].T  # [64, 40] with feature stride 66
    values, indices = ops.max_cosine(query[:, :40], column_major, backend="cuda")
    ref_values, ref_indices = reference.max_cosine(query[:, :40], column_major)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)


def test_max_cosine_empty_memory_gives_zero_values_and_index():
    query, memory = _inputs(5, 8, 32, seed=12)
    query.requires_grad_(True)
    values, indices = ops.max_cosine(query, memory, torch.tensor(0, device=CUDA), backend="cuda")
    assert torch.equal(values, torch.zeros_like(values)) and torch.equal(indices, torch.zeros_like(indices))
    (grad,) = torch.autograd.grad(values.sum(), query)
    assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------- most_similar_index
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape", [(64, 4096, None), (300, 512, 257), (7, 33, 5), (40, 70, 37), (5, 16, 0), (1, 3, 1)], ids=str
)
def test_most_similar_index_matches_reference(dtype, shape):
    rows, dim, count = shape
    _, memory = _inputs(1, rows, dim, seed=5)
    memory = memory.to(dtype)
    index = ops.most_similar_index(memory, _count(count), backend="cuda")
    # the reference on the (rounded) values in float64: the kernels accumulate in float32 or wider
    expected = reference.most_similar_index(memory.double(), count)
    assert index.dtype == torch.int64 and index.dim() == 0 and index.device.type == "cuda"
    assert int(index) == int(expected)


def test_most_similar_index_ties_and_empty():
    _, memory = _inputs(1, 150, 24, seed=6)
    doubled = torch.cat([memory, memory])  # every score appears twice: the first copy wins
    assert int(ops.most_similar_index(doubled, backend="cuda")) == int(reference.most_similar_index(doubled))
    assert int(ops.most_similar_index(doubled, backend="cuda")) < 150
    assert int(ops.most_similar_index(memory, 0, backend="cuda")) == 0
    unaligned = torch.cat([memory, memory], dim=1)[:, 3:27]  # rows 12 bytes past 16-byte boundaries
    assert int(ops.most_similar_index(unaligned, 100, backend="cuda")) == int(
        reference.most_similar_index(unaligned, 100)
    )


# --------------------------------------------------------------------------- capture safety
def test_ops_replay_in_a_cuda_graph_with_the_count_read_on_device():
    """Captured once, replayed after the memory and its count change in place: no host sync, no stale count."""
    query, memory = _inputs(4, 32, 256, seed=13)
    count = torch.tensor(10, device=CUDA)

    def step():
        return (
            *ops.max_cosine(query, memory, count, backend="cuda"),
            ops.most_similar_index(memory, count, backend="cuda"),
        )

    with ops.value_checks(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            values, indices, popped = step()

    g = torch.Generator().manual_seed(14)
    for new_count in (10, 0, 32, 17):
        memory.copy_(torch.randn(memory.shape, generator=g).to(CUDA))
        count.fill_(new_count)
        graph.replay()
        ref_values, ref_indices = reference.max_cosine(query.double(), memory.double(), new_count)
        torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(indices, ref_indices)
        assert int(popped) == int(reference.most_similar_index(memory.double(), new_count))


def test_cosine_memory_uses_the_cuda_kernels():
    g = torch.Generator().manual_seed(15)
    memory = CosineMemory(6, 48, policy="fifo", device=CUDA)
    memory.add(torch.randn(9, 48, generator=g).to(CUDA))
    query = torch.randn(3, 48, generator=g).to(CUDA)
    values, indices = memory.max_cosine(query, backend="cuda")
    ref_values, ref_indices = reference.max_cosine(query, memory.view())
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    assert int(memory.most_similar_index(backend="cuda")) == int(reference.most_similar_index(memory.view()))
