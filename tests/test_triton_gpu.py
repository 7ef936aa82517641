"""The Triton kernels compiled for and run on a real GPU (CUDA tensors), against the PyTorch reference.

The other Triton tests run the same kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, tests/conftest.py) and
compile them ahead of time for sm_80 / sm_90; this module is the check that the compiled kernels compute the same on
a GPU. Needs a GPU and TRITON_INTERPRET unset or 0 (benchmarks/gpu/run_all.sh sets it); skipped otherwise.
"""

import pytest
import torch

from fastdd import ops
from fastdd.ops import reference
from fastdd.ops._backend import backend_usable, triton_interpreted

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_interpreted() or not backend_usable("triton", DEVICE, "max_cosine"),
    reason="needs a GPU, Triton, and TRITON_INTERPRET unset or 0",
)
MERCER_PARAMS = {"linear": {}, "rbf": {"sigma": 4.0}, "poly": {"degree": 3, "coef0": 0.5}}
# (B, N, D): ragged against the Triton tiles (16-64 x rows, 32 y rows, 32 features), and one large D
MERCER_SHAPES = [(3, 37, 50), (1, 5, 16), (17, 70, 129), (8, 512, 4096)]
# (B, M, D, count): B > 1 spans query tiles; count = None (all rows), a partial count, 0 (empty memory)
COSINE_SHAPES = [(1, 64, 4096, None), (16, 64, 512, 37), (3, 7, 33, 5), (2, 5, 16, 0), (17, 33, 129, None)]


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE, dtype)


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    weights = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("kernel", sorted(MERCER_PARAMS))
@pytest.mark.parametrize("shape", MERCER_SHAPES, ids=str)
def test_mercer_distance_on_the_gpu_matches_reference_with_gradients(kernel, shape):
    batch, rows, dim = shape
    x, y = _randn(batch, dim, seed=0), _randn(rows, dim, seed=1)
    params = MERCER_PARAMS[kernel]
    if kernel == "rbf":  # σ ~ √D keeps exp(-‖x - y‖² / 2σ²) and its gradient away from float32 underflow
        params = {"sigma": max(params["sigma"], dim**0.5)}
    out, grad = _value_and_grad(lambda v: ops.mercer_distance(v, y, kernel, backend="triton", **params), x)
    ref, ref_grad = _value_and_grad(lambda v: reference.mercer_distance(v, y.double(), kernel, **params), x.double())
    assert out.device.type == DEVICE.type and out.dtype == torch.float32 and out.shape == (batch,)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


def test_mercer_distance_on_the_gpu_with_bfloat16_y():
    x, y = _randn(8, 256, seed=2), _randn(300, 256, seed=3, dtype=torch.bfloat16)
    out = ops.mercer_distance(x, y, "linear", backend="triton")
    torch.testing.assert_close(out.double(), reference.mercer_distance(x.double(), y.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", COSINE_SHAPES, ids=str)
def test_cosine_memory_ops_on_the_gpu_match_reference(shape):
    batch, rows, dim, count = shape
    query, memory = _randn(batch, dim, seed=4), _randn(rows, dim, seed=5)
    count = None if count is None else torch.tensor(count, device=DEVICE)
    values, indices = ops.max_cosine(query, memory, count, backend="triton")
    ref_values, ref_indices = reference.max_cosine(query.double(), memory.double(), count)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    assert torch.equal(indices, ref_indices)
    _, grad = _value_and_grad(lambda q: ops.max_cosine(q, memory, count, backend="triton")[0], query)
    _, ref_grad = _value_and_grad(lambda q: reference.max_cosine(q, memory.double(), count)[0], query.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    index = ops.most_similar_index(memory, count, backend="triton")
    assert int(index) == int(reference.most_similar_index(memory.double(), count))


@pytest.mark.parametrize("config", [(64, 1, 8), (300, 5, 16), (4096, 10, 100)], ids=str)
def test_group_sampling_on_the_gpu_returns_its_best_scored_group(config):
    dim, ipc, n_candidates = config
    mean, std = 0.5 + _randn(dim, seed=6), 0.3 + _randn(dim, seed=7).abs()
    weights = (1.0, 0.8, 0.3)
    group, score = ops.group_sampling(mean, std, ipc, n_candidates, seed=1234, weights=weights, backend="triton")
    again, _ = ops.group_sampling(mean, std, ipc, n_candidates, seed=1234, weights=weights, backend="triton")
    other, _ = ops.group_sampling(mean, std, ipc, n_candidates, seed=1235, weights=weights, backend="triton")
    assert group.shape == (ipc, dim) and group.device.type == DEVICE.type and torch.isfinite(group).all()
    assert torch.equal(group, again) and not torch.equal(group, other)
    expected = reference.group_score(group[None].double(), mean.double(), std.double(), weights)[0]
    torch.testing.assert_close(score.double(), expected, rtol=1e-4, atol=1e-5)  # float32 in the kernel
