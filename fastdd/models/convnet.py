"""ConvNet surrogate of the dataset-distillation literature (SPEC "Surrogate ConvNet-6")."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """depth × [conv3×3 → GroupNorm(C, C) → ReLU → AvgPool2d(2)] → Linear.

    x: [B, channel, im_size, im_size] -> logits [B, num_classes]. Parameter order (and so
    `parameters_to_vector` order) is features.* then classifier.*, as in the authors' checkpoints.
    """

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 6, im_size: int = 256):
        super().__init__()
        if im_size % (2**depth) != 0:
            raise ValueError(f"im_size={im_size} must be divisible by 2**depth={2**depth}")
        layers: list[nn.Module] = []
        in_channels = channel
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=False),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        feat_size = im_size // (2**depth)
        self.classifier = nn.Linear(width * feat_size * feat_size, num_classes)

    def layers(self) -> list[nn.Module]:
        """The leaf modules in forward order (what `fastdd.ops.grad_cosine` walks)."""
        return [*self.features, nn.Flatten(), self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.reshape(out.shape[0], -1))
