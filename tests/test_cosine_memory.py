"""Cosine-memory ops (max_cosine, most_similar_index) on every backend available here, and CosineMemory.

Backends are compared with the PyTorch reference (fastdd.ops.reference); CosineMemory is compared with a
plain Python-list memory. Triton runs in its CPU interpreter here and is compiled ahead of time for
sm_80 / sm_90 in a subprocess (the interpreter cannot compile for a GPU).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from backends import assert_exact_ties_go_to_the_lowest_index, cpu_backend_params  # noqa: E402

from fastdd import ops  # noqa: E402
from fastdd.ops import CosineMemory, reference  # noqa: E402
from fastdd.ops._backend import compiled_kernel  # noqa: E402

BACKENDS = cpu_backend_params(("max_cosine", "most_similar_index"), "max_cosine", "the cosine-memory ops")
# (B, M, D, count): ragged against the Triton tiles (16 queries, 16/32 rows, 32/64 features), count = 0 and None
SHAPES = [(3, 7, 33, 5), (20, 40, 70, 37), (2, 5, 16, 0), (17, 33, 129, None), (1, 1, 8, 1)]


def _inputs(batch, rows, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g).to(dtype), torch.randn(rows, dim, generator=g).to(dtype)


def _grad_and_second_order(fn, query):
    """(∂ Σ values / ∂ query, ∂ Σ (that)² / ∂ query) for fn(query) -> values."""
    q = query.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(q).sum(), q, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), q)
    return grad, second


# --------------------------------------------------------------------------- max_cosine
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_max_cosine_matches_reference_with_gradients(backend, shape):
    batch, rows, dim, count = shape
    query, memory = _inputs(batch, rows, dim)
    values, indices = ops.max_cosine(query, memory, count, backend=backend)
    ref_values, ref_indices = reference.max_cosine(query, memory, count)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (batch,)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices, ref_indices)

    grad, second = _grad_and_second_order(lambda q: ops.max_cosine(q, memory, count, backend=backend)[0], query)
    ref_grad, ref_second = _grad_and_second_order(lambda q: reference.max_cosine(q, memory, count)[0], query)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(second, ref_second, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_max_cosine_half_precision_memory(backend, query_dtype):
    """bfloat16 / float16 memories: fast backends accumulate in float32, so they match the float32
    reference on the same (rounded) values closely; the bfloat16 reference itself only loosely."""
    query, memory = _inputs(5, 21, 40, seed=1)
    query = query.to(query_dtype)
    for memory_dtype in (torch.bfloat16, torch.float16):
        low = memory.to(memory_dtype)
        values, indices = ops.max_cosine(query, low, 19, backend=backend)
        assert values.dtype == query_dtype
        exact_values, exact_indices = reference.max_cosine(query.float(), low.float(), 19)
        if backend == "reference":
            torch.testing.assert_close(values.float(), exact_values, rtol=0, atol=3e-2)
        else:
            torch.testing.assert_close(values.float(), exact_values.to(query_dtype).float(), rtol=1e-5, atol=1e-5)
            assert torch.equal(indices, exact_indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_cosine_ties_go_to_the_lowest_index(backend):
    _, memory = _inputs(1, 6, 24, seed=2)
    memory[3] = memory[1]
    memory[5] = memory[1]
    query = memory[[1, 3, 2]] + 0.0
    values, indices = ops.max_cosine(query, memory, backend=backend)
    ref_values, ref_indices = reference.max_cosine(query, memory)
    assert indices.tolist() == ref_indices.tolist() == [1, 1, 2]
    torch.testing.assert_close(values, ref_values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exact_ties_go_to_the_lowest_index(backend, dtype):
    assert_exact_ties_go_to_the_lowest_index(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_most_similar_index_depends_on_the_valid_rows_only(backend):
    """Rows past count change no score, not even by rounding: a 2-row memory, whose two scores tie in exact
    arithmetic, keeps its pick whatever follows (zeros as in CosineMemory's free slots, or stale rows)."""
    g = torch.Generator().manual_seed(12)
    for _ in range(12):
        memory = torch.randn(2, 16, generator=g)
        index = int(ops.most_similar_index(memory, backend=backend))
        for rows in (4, 8, 16, 40):
            for fill in (torch.zeros(rows - 2, 16), torch.randn(rows - 2, 16, generator=g)):
                padded = torch.cat([memory, fill])
                assert int(ops.most_similar_index(padded, 2, backend=backend)) == index, rows


def test_exact_ties_without_the_extension():
    """FASTDD_NO_EXT=1 leaves fastdd._C unloaded: "auto" then runs the reference, with the same tie-breaking."""
    script = textwrap.dedent(
        """
        import warnings
        warnings.filterwarnings("ignore")
        import torch
        from backends import assert_exact_ties_go_to_the_lowest_index
        from fastdd.ops._backend import extension, resolve_backend

        assert extension() is None
        for op in ("max_cosine", "most_similar_index"):
            assert resolve_backend(op, "auto", torch.device("cpu")) == "reference"
        assert_exact_ties_go_to_the_lowest_index("auto")
        """
    )
    root = Path(__file__).parents[1]
    env = {**os.environ, "FASTDD_NO_EXT": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    features_by_query, features_by_row = _inputs(9, 9, 12, seed=11)
    query, memory = features_by_query.T[:6], features_by_row.T  # [6, 9] and [12, 9], feature stride != 1
    values, indices = ops.max_cosine(query, memory, 5, backend=backend)
    ref_values, ref_indices = reference.max_cosine(query, memory, 5)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    assert int(ops.most_similar_index(memory, backend=backend)) == int(reference.most_similar_index(memory))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_cosine_gradcheck_float64(backend):
    query, memory = _inputs(3, 6, 5, dtype=torch.float64, seed=3)
    query.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: ops.max_cosine(q, memory, 4, backend=backend)[0], (query,))
    assert torch.autograd.gradgradcheck(lambda q: ops.max_cosine(q, memory, 4, backend=backend)[0], (query,))


def test_reference_gradcheck_float64():
    query, memory = _inputs(3, 6, 5, dtype=torch.float64, seed=4)
    query.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: reference.max_cosine(q, memory, 5)[0], (query,))


# --------------------------------------------------------------------------- most_similar_index
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 33, 5), (40, 70, 37), (5, 16, 0), (33, 129, None), (1, 3, 1)], ids=str)
def test_most_similar_index_matches_reference(backend, dtype, shape):
    rows, dim, count = shape
    _, memory = _inputs(1, rows, dim, seed=5)
    memory = memory.to(dtype)
    index = ops.most_similar_index(memory, count, backend=backend)
    # the reference on the (rounded) values in float64: fast backends accumulate in float32 or wider
    expected = reference.most_similar_index(memory.double(), count)
    assert index.dtype == torch.int64 and index.dim() == 0
    assert int(index) == int(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_most_similar_index_ties_and_empty(backend):
    _, memory = _inputs(1, 5, 12, seed=6)
    doubled = torch.cat([memory, memory])  # every score appears twice: the first copy wins
    assert int(ops.most_similar_index(doubled, backend=backend)) == int(reference.most_similar_index(doubled))
    assert int(ops.most_similar_index(doubled, backend=backend)) < 5
    assert int(ops.most_similar_index(memory, 0, backend=backend)) == 0


# --------------------------------------------------------------------------- validation and compile
def test_bad_inputs_name_the_argument():
    query, memory = _inputs(2, 4, 6)
    with pytest.raises(ValueError, match="query"):
        ops.max_cosine(query[0], memory)
    with pytest.raises(ValueError, match="memory"):
        ops.max_cosine(query, memory.int())
    with pytest.raises(ValueError, match="memory"):
        ops.most_similar_index(memory[:0])
    with pytest.raises(ValueError, match="features"):
        ops.max_cosine(query[:, :5], memory)
    with pytest.raises(ValueError, match="count"):
        ops.max_cosine(query, memory, -1)
    with pytest.raises(ValueError, match="count"):
        ops.most_similar_index(memory, torch.tensor(2.0))
    with pytest.raises(ValueError, match="memory"):
        ops.most_similar_index(torch.full((3, 2), float("inf")))
    with pytest.raises(ValueError, match="backend"):
        ops.most_similar_index(memory, backend="cuda")
    with pytest.raises(ValueError, match="capacity"):
        CosineMemory(0, 6)
    with pytest.raises(ValueError, match="dim"):
        CosineMemory(4, 2.5)
    with pytest.raises(ValueError, match="policy"):
        CosineMemory(4, 6, policy="lru")
    with pytest.raises(ValueError, match="dtype"):
        CosineMemory(4, 6, dtype=torch.int32)
    mem = CosineMemory(4, 6)
    with pytest.raises(ValueError, match="z"):
        mem.add(torch.randn(2, 5))
    with pytest.raises(ValueError, match="z"):
        mem.add(torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match="z"):
        mem.add(torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match="query"):
        mem.max_cosine(torch.randn(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    from fastdd.ops._backend import forced_backend
    from fastdd.ops.cosine_memory import _max_cosine_op, _most_similar_index_op

    query, memory = _inputs(3, 7, 33)
    count = torch.tensor(5)
    checks = ("test_schema", "test_faketensor")
    with forced_backend("max_cosine", backend):
        torch.library.opcheck(_max_cosine_op, (query, memory, count), test_utils=checks)
    with forced_backend("most_similar_index", backend):
        torch.library.opcheck(_most_similar_index_op, (memory, count), test_utils=checks)


def test_torch_compile_fullgraph_of_ops_and_memory_add():
    backend = "cpp" if compiled_kernel("max_cosine", "CPU") else "reference"
    memory = CosineMemory(3, 8, policy="most_similar")
    eager = CosineMemory(3, 8, policy="most_similar")

    def step(z, query):
        memory.add(z)
        values, indices = memory.max_cosine(query, backend=backend)
        return values, indices, memory.most_similar_index(backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        z, query = torch.randn(2, 8, generator=g), torch.randn(4, 8, generator=g)
        eager.add(z)
        values, indices, popped = compiled(z, query)
        ref_values, ref_indices = reference.max_cosine(query, eager.view())
        torch.testing.assert_close(values, ref_values)
        assert torch.equal(indices, ref_indices)
        assert int(popped) == int(reference.most_similar_index(eager.view()))
        torch.testing.assert_close(memory.view(), eager.view())


def test_triton_kernels_compile_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import warnings
        warnings.filterwarnings("ignore")
        from triton_aot import ARCHS, assert_fits, compile_for_gpu
        from fastdd.ops.triton import max_cosine as K

        for arch in ARCHS:
            for mem, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
                fp64 = acc == "fp64"
                blocks = {"BLOCK_M": K.ROW_BLOCK, "BLOCK_D": K.FEATURE_BLOCK, "USE_FP64": fp64}
                rows = {"rows": "i32", "dim": "i32", "memory_stride": "i32"}
                kernels = [
                    (K.max_cosine_kernel,
                     {"query_ptr": f"*{acc}", "memory_ptr": f"*{mem}", "count_ptr": "*i64", "values_ptr": f"*{acc}",
                      "indices_ptr": "*i64", "batch": "i32", **rows, "query_stride": "i32"},
                     {"EPS": K.COS_EPS, "USE_FP64": fp64, "BLOCK_B": K.QUERY_TILE, "BLOCK_M": K.MEMORY_TILE,
                      "BLOCK_D": K.FEATURE_TILE}),
                    (K.row_inverse_norms_kernel,
                     {"memory_ptr": f"*{mem}", "count_ptr": "*i64", "inv_norm_ptr": f"*{acc}", **rows},
                     {"EPS": K.COS_EPS, **blocks}),
                    (K.unit_sum_kernel,
                     {"memory_ptr": f"*{mem}", "count_ptr": "*i64", "inv_norm_ptr": f"*{acc}", "unit_sum_ptr": f"*{acc}", **rows},
                     blocks),
                    (K.row_scores_kernel,
                     {"memory_ptr": f"*{mem}", "count_ptr": "*i64", "inv_norm_ptr": f"*{acc}", "unit_sum_ptr": f"*{acc}",
                      "scores_ptr": f"*{acc}", **rows},
                     blocks),
                ]
                for kernel, signature, constexprs in kernels:
                    res = compile_for_gpu(kernel, signature, constexprs, arch, num_warps=K.NUM_WARPS)
                    assert_fits(res)
                    print(mem, res)
        """
    )
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("KernelResources") == 2 * 3 * 4


# --------------------------------------------------------------------------- CosineMemory
def _list_cosine_matrix(rows):
    unit = [r.double() / r.double().norm().clamp_min(1e-6) for r in rows]
    return torch.stack([torch.stack([torch.dot(a, b) for b in unit]) for a in unit])


def _list_add(rows, z, capacity, policy):
    """The plain-list memories the authors' code keeps: FIFO append + pop(0); SAM append + pop argmax row sum."""
    rows.append(z)
    while len(rows) > capacity:
        rows.pop(0 if policy == "fifo" else int(_list_cosine_matrix(rows).sum(1).argmax()))


@pytest.mark.parametrize("policy", ["fifo", "most_similar"])
def test_cosine_memory_follows_a_python_list_memory(policy):
    capacity, dim = 8, 16
    g = torch.Generator().manual_seed(8)
    memory, rows = CosineMemory(capacity, dim, policy=policy), []
    for step in range(200):
        z = torch.randn(dim, generator=g)
        memory.add(z)
        _list_add(rows, z, capacity, policy)
        stored = memory.view()
        expected = torch.stack(rows)
        if policy == "fifo":
            assert torch.equal(stored, expected), step
        else:
            assert sorted(map(tuple, stored.tolist())) == sorted(map(tuple, expected.tolist())), step
        assert int(memory.count) == len(rows)
        query = torch.randn(3, dim, generator=g)
        values, indices = memory.max_cosine(query)
        list_cos = torch.stack(
            [torch.nn.functional.cosine_similarity(query.double(), r.double()[None], eps=1e-6) for r in rows]
        )
        list_values, list_best = list_cos.max(0)
        torch.testing.assert_close(values.double(), list_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(stored[indices], expected[list_best]), step
        popped = memory.most_similar_index()
        scores = _list_cosine_matrix(rows).sum(1)
        # scores equal to the best up to float32 rounding tie in exact arithmetic (e.g. both rows of a 2-row
        # memory): rounding picks among them, here in float64 as in any backend's float32
        tied = expected[scores >= scores.max() - 1e-5]
        assert any(torch.equal(stored[popped], row) for row in tied), step
    if policy == "most_similar":
        drift = (memory.unit_sum.double() - reference.normalize_rows(memory.view().double()).sum(0)).abs().max()
        assert drift < 1e-5


def test_cosine_memory_batched_add_equals_single_adds_and_reset():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(11, 6, generator=g)
    for policy in ("fifo", "most_similar"):
        batched, single = CosineMemory(4, 6, policy=policy), CosineMemory(4, 6, policy=policy)
        batched.add(z)
        for row in z:
            single.add(row)
        assert torch.equal(batched.view(), single.view())
        batched.reset()
        assert batched.view().shape == (0, 6) and int(batched.count) == 0
        assert torch.equal(batched.max_cosine(z[:2])[0], torch.zeros(2))
        batched.add(z[:3])
        assert torch.equal(batched.view(), z[:3])


def test_cosine_memory_bfloat16_buffer_and_query_gradient():
    g = torch.Generator().manual_seed(10)
    memory, rows = CosineMemory(5, 12, policy="most_similar", dtype=torch.bfloat16), []
    for _ in range(30):
        z = torch.randn(12, generator=g)
        memory.add(z)
        _list_add(rows, z.bfloat16(), 5, "most_similar")
    assert memory.unit_sum.dtype == torch.float32
    assert sorted(map(tuple, memory.view().tolist())) == sorted(map(tuple, torch.stack(rows).tolist()))
    query = torch.randn(2, 12, generator=g, requires_grad=True)
    values, indices = memory.max_cosine(query)
    (grad,) = torch.autograd.grad(values.sum(), query)
    ref_query = query.detach().requires_grad_(True)
    ref_values, _ = reference.max_cosine(ref_query, memory.view().float())
    (ref_grad,) = torch.autograd.grad(ref_values.sum(), ref_query)
    torch.testing.assert_close(values, ref_values)
    torch.testing.assert_close(grad, ref_grad)


def test_auto_runs_many_queries_as_one_matmul_on_cpu():
    """More than CPU_MATMUL_QUERIES queries: auto takes the reference's normalise + matmul (faster there on CPU);
    same values, indices and query gradient as the compiled kernel."""
    from fastdd.ops import cosine_memory

    torch.manual_seed(0)
    query = torch.randn(cosine_memory.CPU_MATMUL_QUERIES + 3, 16, requires_grad=True)
    memory = torch.randn(10, 16)
    values, indices = ops.max_cosine(query, memory, 7)
    expected_values, expected_indices = reference.max_cosine(query, memory, 7)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)
    (grad,) = torch.autograd.grad(values.sum(), query)
    (expected_grad,) = torch.autograd.grad(expected_values.sum(), query)
    torch.testing.assert_close(grad, expected_grad)
