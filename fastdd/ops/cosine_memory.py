"""Cosine memory ops (IGD deviation guidance, SAM memories): capture-safe, no host syncs.

`max_cosine` and `most_similar_index` are torch custom ops (`torch.ops.fastdd.*`), so
`torch.compile(fullgraph=True)` traces them; `CosineMemory` keeps a fixed buffer and a device count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import dispatch, extension, register_kernels, register_op
from ._checks import check_count, check_nonempty, check_positive_int, check_same_device, check_tensor
from .reference import COS_EPS

register_op("max_cosine", cpu=("cpp", "reference"), cuda=("triton", "cuda", "reference"))
# auto on CPU: more queries than this run as one normalise + matmul (the reference), which reuses each memory row
# across queries; the C++ kernel streams the memory per query and lost to it at B = 128, M = 1024, D = 4096
# (benchmarks/results/cosine_memory_cpu.md)
CPU_MATMUL_QUERIES = 32
register_op("most_similar_index", cpu=("cpp", "reference"), cuda=("triton", "cuda", "reference"))


def _outputs(implementation):
    """A max_cosine implementation as the op returns it: (values [B] in query's dtype, indices [B] int64)."""

    def kernel(query: Tensor, memory: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = implementation(query, memory, count)
        return values.to(query.dtype), indices.to(torch.int64)

    return kernel


def _compiled_max_cosine(query: Tensor, memory: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    extension()
    return torch.ops.fastdd_C.max_cosine(query, memory, count, COS_EPS)


def _triton_max_cosine(query: Tensor, memory: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    from .triton.max_cosine import max_cosine_triton

    return max_cosine_triton(query, memory, count)


def _compiled_most_similar_index(memory: Tensor, count: Tensor) -> Tensor:
    extension()
    return torch.ops.fastdd_C.most_similar_index(memory, count, COS_EPS)


def _triton_most_similar_index(memory: Tensor, count: Tensor) -> Tensor:
    from .triton.max_cosine import most_similar_index_triton

    return most_similar_index_triton(memory, count)


_MAX_COSINE = {
    "reference": _outputs(reference.max_cosine),
    "cpp": _outputs(_compiled_max_cosine),
    "cuda": _outputs(_compiled_max_cosine),
    "triton": _outputs(_triton_max_cosine),
}
_MOST_SIMILAR_INDEX = {
    "reference": reference.most_similar_index,
    "cpp": _compiled_most_similar_index,
    "cuda": _compiled_most_similar_index,
    "triton": _triton_most_similar_index,
}


@torch.library.custom_op("fastdd::max_cosine", mutates_args=())
def _max_cosine_op(query: Tensor, memory: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """query [B, D], memory [M, D], count 0-dim int64 -> (values [B], indices [B] int64); CPU / CUDA kernels
    below, this reference on other devices."""
    return _MAX_COSINE["reference"](query, memory, count)


@_max_cosine_op.register_fake
def _(query, memory, count):
    batch = query.shape[0]
    return query.new_empty(batch), query.new_empty(batch, dtype=torch.int64)


def _max_cosine_setup(ctx, inputs, output):
    query, memory, count = inputs
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
    return grad_query, None, None


_max_cosine_op.register_autograd(_max_cosine_backward, setup_context=_max_cosine_setup)
register_kernels(_max_cosine_op, "max_cosine", _MAX_COSINE)


def max_cosine(query: Tensor, memory: Tensor, count: Tensor | int | None = None, *, backend: str = "auto"):
    """Most similar memory row per query.

    values = max_j cos(query_b, memory_j) (norms clamped at reference.COS_EPS), 0 when no row is valid; ties go
    to the lowest index. Differentiable w.r.t. query.

    Args:
        query: [B, D].
        memory: [M, D], non-empty, on query's device; rows >= count are ignored.
        count: valid rows: None (all M), an int in [0, M], or a 0-dim integer tensor on memory's device.
        backend: "auto" (OP_BACKENDS) or an implementation to force.

    Returns:
        (values [B] in query's dtype, indices [B] int64).

    Raises:
        ValueError: if query / memory are not floating-point 2-D tensors on one device with the same D, memory
            is empty, or count is invalid.
    """
    check_tensor("query", query, ndim=2)
    check_tensor("memory", memory, ndim=2)
    check_same_device(query=query, memory=memory)
    check_nonempty("memory", memory)
    if query.shape[1] != memory.shape[1]:
        raise ValueError(f"query has D={query.shape[1]} features but memory has D={memory.shape[1]}")
    count = check_count(count, memory.shape[0], memory.device)
    if count is None:
        count = torch.full((), memory.shape[0], device=memory.device, dtype=torch.int64)  # a fill: capture-safe
    if backend == "auto" and query.device.type == "cpu" and query.shape[0] > CPU_MATMUL_QUERIES:
        values, indices = reference.max_cosine(query, memory, count)  # one matmul: see CPU_MATMUL_QUERIES
        return values.to(query.dtype), indices
    return dispatch(_max_cosine_op, "max_cosine", backend, query.device, query, memory, count)


@torch.library.custom_op("fastdd::most_similar_index", mutates_args=())
def _most_similar_index_op(memory: Tensor, count: Tensor) -> Tensor:
    """memory [M, D], count 0-dim int64 -> 0-dim int64; CPU / CUDA kernels below, this reference elsewhere."""
    return _MOST_SIMILAR_INDEX["reference"](memory, count)


@_most_similar_index_op.register_fake
def _(memory, count):
    return memory.new_empty((), dtype=torch.int64)


register_kernels(_most_similar_index_op, "most_similar_index", _MOST_SIMILAR_INDEX)


def most_similar_index(memory: Tensor, count: Tensor | int | None = None, *, backend: str = "auto") -> Tensor:
    """The valid row of memory most similar to all valid rows.

    The row with the largest summed cosine similarity to all valid rows (itself included), the lowest of tied
    rows. O(M·D): score_i = m̂_i · Σ_j m̂_j.

    Args:
        memory: [M, D], non-empty.
        count: valid rows: None (all M), an int in [0, M], or a 0-dim integer tensor on memory's device.
        backend: "auto" (OP_BACKENDS) or an implementation to force.

    Returns:
        0-dim int64 index.

    Raises:
        ValueError: if memory is not a non-empty floating-point [M, D] or count is invalid.
    """
    check_tensor("memory", memory, ndim=2)
    check_nonempty("memory", memory)
    count = check_count(count, memory.shape[0], memory.device)
    if count is None:
        count = torch.full((), memory.shape[0], device=memory.device, dtype=torch.int64)  # a fill: capture-safe
    return dispatch(_most_similar_index_op, "most_similar_index", backend, memory.device, memory, count)


POLICIES = ("fifo", "most_similar")


class CosineMemory:
    """Fixed-capacity memory of D-dim rows for cosine look-ups (IGD's FIFO memory, SAM's most-similar pop).

    Capture-safe: rows live in a preallocated `buffer` and `count` is a 0-dim int64 tensor on the device,
    so `add` never syncs with the host and works under CUDA graphs and torch.compile(fullgraph=True).

    policy="fifo": `buffer` is a ring of `capacity` rows; once full, a new row overwrites the oldest one
    (slot `head`). policy="most_similar": `buffer` has one spare row; a new row is written at slot `count`,
    and when that exceeds `capacity` the row with the largest summed cosine similarity to all rows (itself
    included; SAM's rule) is popped and the spare row moves into its slot. The scores come from `unit_sum`,
    the running sum of the normalised rows (float32, float64 for float64 buffers), so a pop costs O(M·D).

    Row indices returned by `max_cosine` / `most_similar_index` index the rows of `view()`.
    """

    def __init__(self, capacity: int, dim: int, policy: str = "fifo", device=None, dtype: torch.dtype = torch.float32):
        check_positive_int("capacity", capacity)
        check_positive_int("dim", dim)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.capacity, self.dim, self.policy = capacity, dim, policy
        slots = capacity + 1 if policy == "most_similar" else capacity
        self.buffer = torch.zeros(slots, dim, device=device, dtype=dtype)  # [slots, D]
        self.count = torch.zeros((), device=self.buffer.device, dtype=torch.int64)
        self.head = torch.zeros((), device=self.buffer.device, dtype=torch.int64)  # fifo: slot of the oldest row
        self.unit_sum = (  # most_similar: Σ of the normalised valid rows, [D]
            torch.zeros(dim, device=self.buffer.device, dtype=torch.promote_types(dtype, torch.float32))
            if policy == "most_similar"
            else None
        )

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def reset(self) -> None:
        """Empty the memory (in place, so captured graphs keep working)."""
        self.buffer.zero_()
        self.count.zero_()
        self.head.zero_()
        if self.unit_sum is not None:
            self.unit_sum.zero_()

    def add(self, z: Tensor) -> None:
        """Append z: [D] or [n, D] (n rows, in order), applying the eviction policy after each row."""
        check_tensor("z", z)
        if z.dim() not in (1, 2) or z.shape[-1] != self.dim:
            raise ValueError(f"z must have shape [{self.dim}] or [n, {self.dim}], got {tuple(z.shape)}")
        check_same_device(buffer=self.buffer, z=z)
        rows = z.detach().reshape(-1, self.dim).to(self.buffer.dtype)
        add_row = self._add_fifo if self.policy == "fifo" else self._add_most_similar
        for row in rows.unbind(0):
            add_row(row)

    def _add_fifo(self, row: Tensor) -> None:
        full = self.count >= self.capacity
        slot = torch.where(full, self.head, self.count)
        self.buffer.index_copy_(0, slot.view(1), row.unsqueeze(0))
        self.head.copy_(torch.where(full, (self.head + 1) % self.capacity, self.head))
        self.count.copy_((self.count + 1).clamp_max(self.capacity))

    def _add_most_similar(self, row: Tensor) -> None:
        slot = self.count.view(1)  # the next free row, or the spare row when full
        self.buffer.index_copy_(0, slot, row.unsqueeze(0))
        units = reference.normalize_rows(self.buffer.to(self.unit_sum.dtype))  # [capacity + 1, D]
        self.unit_sum.add_(units.index_select(0, slot).squeeze(0))
        rows = self.count + 1
        valid = torch.arange(self.capacity + 1, device=self.device) < rows
        scores = (units @ self.unit_sum).masked_fill(~valid, float("-inf"))  # Σ_j cos(row_i, row_j)
        popped = scores.argmax().view(1)  # first of equal maxima, like the reference
        over = rows > self.capacity
        self.unit_sum.sub_(torch.where(over, units.index_select(0, popped).squeeze(0), 0.0))
        # move the spare row into the popped slot (a no-op write when nothing is popped)
        kept = torch.where(over, self.buffer[self.capacity : self.capacity + 1], self.buffer.index_select(0, popped))
        self.buffer.index_copy_(0, popped, kept)
        self.count.copy_(rows - over.to(torch.int64))

    def _slot_to_position(self, slot: Tensor) -> Tensor:
        """Buffer slot -> index into view() (insertion order for fifo)."""
        if self.policy == "fifo":
            return torch.remainder(slot - self.head, self.capacity)
        return slot

    def view(self) -> Tensor:
        """The valid rows [count, D] as a new tensor, oldest first for fifo. Syncs with the host (inspection only)."""
        rows = int(self.count)
        if self.policy == "fifo":
            order = torch.remainder(self.head + torch.arange(rows, device=self.device), self.capacity)
            return self.buffer.index_select(0, order)
        return self.buffer[:rows].clone()

    def max_cosine(self, query: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
        """(values [B], indices [B]) of the most similar stored row per query [B, D]; indices index view().

        Differentiable w.r.t. query. Only the query is validated: rows were checked when added.
        """
        check_tensor("query", query, ndim=2)
        check_same_device(query=query, buffer=self.buffer)
        if query.shape[1] != self.dim:
            raise ValueError(f"query has D={query.shape[1]} features but the memory has D={self.dim}")
        values, slots = dispatch(_max_cosine_op, "max_cosine", backend, query.device, query, self.buffer, self.count)
        return values, self._slot_to_position(slots)

    def most_similar_index(self, *, backend: str = "auto") -> Tensor:
        """0-dim index (into view()) of the stored row with the largest summed cosine to all stored rows
        (0 when empty)."""
        index = dispatch(_most_similar_index_op, "most_similar_index", backend, self.device, self.buffer, self.count)
        return self._slot_to_position(index)
