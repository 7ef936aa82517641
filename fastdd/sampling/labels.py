"""Guidances written for local class indices inside a sampler that uses the model's labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .sampler import Guidance, ImageId, StepContext


class LocalLabels(Guidance):
    """Runs a guidance written for local class indices inside a sampler that uses model labels.

    label_map: [num_model_classes + 1] long, model label -> local index (the null class and unused labels -> 0;
    only the conditional rows' labels are meaningful). image_ids already hold local class indices.
    """

    def __init__(self, inner: Guidance, label_map: Tensor):
        self.inner, self.label_map = inner, label_map
        self.requires_grad, self.low, self.high = inner.requires_grad, inner.low, inner.high

    @property
    def capturable(self) -> bool:
        return self.inner.capturable

    def active(self, index: int) -> bool:
        return self.inner.active(index)

    def capture_key(self, image_ids: Sequence[ImageId]):
        return self.inner.capture_key(image_ids)

    def step(self, ctx: StepContext) -> Tensor:
        if self.label_map.device != ctx.y.device:
            self.label_map = self.label_map.to(ctx.y.device)  # once, not a host-to-device copy per step
        local = dataclasses.replace(ctx, y=self.label_map[ctx.y])
        return self.inner.step(local)

    def begin_batch(self, labels: Tensor, image_ids: Sequence[ImageId]) -> None:
        self.inner.begin_batch(torch.tensor([c for c, _, _ in image_ids]), image_ids)

    def end_batch(self, final_latents: Tensor, labels: Tensor) -> None:
        self.inner.end_batch(final_latents, self.label_map.to(labels.device)[labels])


def label_map(class_labels: Sequence[int], num_model_classes: int) -> Tensor:
    """[num_model_classes + 1] long: model label -> local class index (others -> 0)."""
    table = torch.zeros(num_model_classes + 1, dtype=torch.long)
    table[torch.as_tensor(list(class_labels), dtype=torch.long)] = torch.arange(len(class_labels))
    return table
