"""IGD deviation guidance G_D (SPEC "IGD" step 1): push x_t away from the most similar earlier image.

G_D(x_t) = cos(x_t, m*), m* = argmax_{m ∈ M_c} cos(x_t, m) over the class memory M_c of final latents of
earlier images of the same class (capacity 64, FIFO, or SAM's most-similar pop); the update −γ·∇G_D is
added to the sample with no adaptive scale (γ = 120 for DiT weights, 100 for Minimax weights).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..sampling.sampler import Guidance, StepContext


def deviation_gradient(x_t: Tensor, memory: Tensor, count: Tensor | int | None = None) -> Tensor:
    """∇_{x_t} max_j cos(x_t, memory_j) per row (zero where the memory is empty).

    x_t: [B, C, H, W]; memory: [M, C·H·W] rows < count valid -> [B, C, H, W]. Drop-in for other loops:
    s = s - gamma * deviation_gradient(x_t, memory).
    """
    query = x_t.detach().flatten(1).requires_grad_(True)
    with torch.enable_grad():
        values, _ = ops.max_cosine(query, memory, count)
        (grad,) = torch.autograd.grad(values.sum(), query)
    return grad.view_as(x_t)


class DeviationGuidance(Guidance):
    """G_D with one `fastdd.ops.CosineMemory` per class; memories persist across batches of the same class.

    In a batch each row queries its own class's memory (one image per class per batch keeps the
    one-at-a-time order). After each batch the final latents are added to their class memory.
    compat=True subtracts the conditional row's update from its shadow row too (the authors apply
    s ← s − γ·g_D to the whole [cond; uncond] sample).
    """

    capturable = True  # memories are updated in place; the rows' memories are fixed by the batch's classes

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        gamma: float = 120.0,
        capacity: int = 64,
        policy: str = "fifo",
        low: int = 30,
        high: int = 45,
        compat: bool = False,
        device: torch.device | str = "cpu",
    ):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.gamma, self.low, self.high, self.compat = gamma, low, high, compat
        self.memories = [
            ops.CosineMemory(capacity, dim, policy=policy, device=device, dtype=torch.float32) for _ in range(num_classes)
        ]

    def step(self, ctx: StepContext) -> Tensor:
        rows = ctx.rows
        x_t = ctx.x_t[:rows].detach()
        grads = []
        for b, (label, _, _) in enumerate(ctx.image_ids):  # host-side labels: no sync
            memory = self.memories[label]
            grads.append(deviation_gradient(x_t[b : b + 1], memory.buffer, memory.count))
        update = -self.gamma * torch.cat(grads)
        if self.compat:
            return update.repeat(ctx.x_t.shape[0] // rows, 1, 1, 1)
        return torch.cat([update, torch.zeros_like(ctx.x_t[rows:])])

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        for latent, label in zip(final_latents.detach(), labels.tolist()):
            self.memories[label].add(latent.flatten().float())
