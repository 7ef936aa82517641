"""Cosine memory ops (IGD deviation guidance, SAM memories): capture-safe, no host syncs.

`max_cosine` and `most_similar_index` are torch custom ops (`torch.ops.fastdd.*`), so
`torch.compile(fullgraph=True)` traces them; `CosineMemory` keeps a fixed buffer and a device count.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import extension, register_op, resolve_backend
from ._checks import check_count, check_nonempty, check_same_device, check_tensor

register_op("max_cosine", cpu=("cpp", "reference"), cuda=("triton", "reference"))
register_op("most_similar_index", cpu=("cpp", "reference"), cuda=("triton", "reference"))


def _max_cosine_impl(query: Tensor, memory: Tensor, count: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        from .triton.max_cosine import max_cosine_triton

        return max_cosine_triton(query, memory, count)
    if backend in ("cpp", "cuda"):
        extension()
        return torch.ops.fastdd_C.max_cosine(query, memory, count)
    return reference.max_cosine(query, memory, count)


@torch.library.custom_op("fastdd::max_cosine", mutates_args=())
def _max_cosine_op(query: Tensor, memory: Tensor, count: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    values, indices = _max_cosine_impl(query.detach(), memory.detach(), count, backend)
    return values.to(query.dtype), indices.to(torch.int64)


@_max_cosine_op.register_fake
def _(query, memory, count, backend):
    batch = query.shape[0]
    return query.new_empty(batch), query.new_empty(batch, dtype=torch.int64)


def _max_cosine_setup(ctx, inputs, output):
    query, memory, count, _ = inputs
    ctx.save_for_backward(query, memory, count, output[1])


def _max_cosine_backward(ctx, grad_values, grad_indices):
    query, memory, count, indices = ctx.saved_tensors
    # The selected rows are constant: the gradient is that of cos(query, memory[indices]),
    # written with differentiable torch ops so higher-order gradients work too.
    with torch.enable_grad():
        q = query.detach().requires_grad_(True) if not query.requires_grad else query
        chosen = memory[indices].to(q.dtype)
        cos = (reference.normalize_rows(q) * reference.normalize_rows(chosen)).sum(-1)
        cos = torch.where(count > 0, cos, torch.zeros_like(cos))
        (grad_query,) = torch.autograd.grad(cos, q, grad_values, create_graph=torch.is_grad_enabled())
    return grad_query, None, None, None


_max_cosine_op.register_autograd(_max_cosine_backward, setup_context=_max_cosine_setup)


def max_cosine(query: Tensor, memory: Tensor, count: Tensor | int | None = None, *, backend: str = "auto"):
    """Most similar memory row per query: (values [B], indices [B] int64).

    query: [B, D]; memory: [M, D] (rows >= count are ignored; count: None, int, or 0-dim device tensor).
    values = max_j cos(query_b, memory_j) (eps 1e-6), 0 when no row is valid. Gradient w.r.t. query.
    """
    check_tensor("query", query, ndim=2)
    check_tensor("memory", memory, ndim=2)
    check_same_device(query=query, memory=memory)
    check_nonempty("memory", memory)
    if query.shape[1] != memory.shape[1]:
        raise ValueError(f"query has D={query.shape[1]} features but memory has D={memory.shape[1]}")
    count = check_count(count, memory.shape[0], memory.device)
    if count is None:
        count = torch.tensor(memory.shape[0], device=memory.device, dtype=torch.int64)
    return _max_cosine_op(query, memory, count, resolve_backend("max_cosine", backend, query.device))


@torch.library.custom_op("fastdd::most_similar_index", mutates_args=())
def _most_similar_index_op(memory: Tensor, count: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        from .triton.max_cosine import most_similar_index_triton

        return most_similar_index_triton(memory, count)
    if backend in ("cpp", "cuda"):
        extension()
        return torch.ops.fastdd_C.most_similar_index(memory, count)
    return reference.most_similar_index(memory, count)


@_most_similar_index_op.register_fake
def _(memory, count, backend):
    return memory.new_empty((), dtype=torch.int64)


def most_similar_index(memory: Tensor, count: Tensor | int | None = None, *, backend: str = "auto") -> Tensor:
    """0-dim int64 index of the valid row of memory [M, D] with the largest summed cosine similarity
    to all valid rows (itself included). O(M·D): score_i = m̂_i · Σ_j m̂_j."""
    check_tensor("memory", memory, ndim=2)
    check_nonempty("memory", memory)
    count = check_count(count, memory.shape[0], memory.device)
    if count is None:
        count = torch.tensor(memory.shape[0], device=memory.device, dtype=torch.int64)
    return _most_similar_index_op(memory, count, resolve_backend("most_similar_index", backend, memory.device))
