"""ResNet test networks of the dataset-distillation evaluation protocols (IDC / Minimax / IGD lineage).

Architecture facts taken from that literature (not code):
- Stem chosen by image size: > 128 px: 7x7 conv (stride 1) -> norm -> ReLU -> AvgPool(4); 65-128 px: 3x3 conv
  -> norm -> ReLU -> AvgPool(2); <= 64 px: 3x3 conv -> norm -> ReLU (no pooling).
- Four stages of BasicBlocks, widths w, 2w, 4w, 8w, downsampling by 2 in stages 2-4.  Inside a block the
  downsampling is an average pool after the first conv's ReLU (never a strided conv).
- Shortcut when the shape changes: ResNetAP: 1x1 conv -> AvgPool(2) -> norm;  ResNet: strided 1x1 conv -> norm.
- "instancenorm" = GroupNorm(C, C, affine=True); convs have no bias unless norm is "none".
- Global average pool + Linear(8w -> classes).  Conv init normal(0, sqrt(2 / (k*k*out_channels))).

Assumptions / deviations, documented: a pooling window larger than the current feature map is shrunk to the
map size (the reference crashes there), so tiny inputs (e.g. 8x8 digits) work; for sizes where the reference
does not crash the result is identical.  Only BasicBlock depths (10, 18, 34) are provided.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet", "ResNetAP", "make_norm"]

_STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_NORMS = ("instancenorm", "batchnorm", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """ "instancenorm" -> GroupNorm(C, C, affine), "batchnorm" -> BatchNorm2d, "none" -> Identity."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected one of {_NORMS}, got {norm!r}")


def _avg_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Non-overlapping average pool by ``factor``; the window is clipped to the feature-map size."""
    if factor == 1:
        return x
    kernel = (min(factor, x.shape[-2]), min(factor, x.shape[-1]))
    return F.avg_pool2d(x, kernel_size=kernel, stride=kernel)


def _conv(in_channels: int, out_channels: int, kernel: int, norm: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")


class AvgPool(nn.Module):
    """Module form of the clipped average pool (used inside shortcuts)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _avg_pool(x, self.factor)


class Stem(nn.Module):
    """Size-dependent input block: conv -> norm -> ReLU -> average pool by ``pool`` (1 = none)."""

    def __init__(self, channel: int, width: int, kernel: int, pool: int, norm: str):
        super().__init__()
        self.conv = _conv(channel, width, kernel, norm)
        self.norm = make_norm(norm, width)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _avg_pool(F.relu(self.norm(self.conv(x))), self.pool)


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> [avg pool] -> conv3x3 -> norm, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, avgpool_shortcut: bool):
        super().__init__()
        self.stride = stride
        self.conv1 = _conv(in_channels, out_channels, 3, norm)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3, norm)
        self.norm2 = make_norm(norm, out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif avgpool_shortcut:
            self.shortcut = nn.Sequential(
                _conv(in_channels, out_channels, 1, norm), AvgPool(stride), make_norm(norm, out_channels)
            )
        else:
            self.shortcut = nn.Sequential(
                _conv(in_channels, out_channels, 1, norm, stride=stride), make_norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _avg_pool(F.relu(self.norm1(self.conv1(x))), self.stride)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stem_for_size(im_size: int | tuple[int, int]) -> tuple[int, int]:
    """(kernel, pool) of the stem for the given image size."""
    size = im_size if isinstance(im_size, int) else max(im_size)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"im_size: expected a positive int or (H, W), got {im_size!r}")
    if size > 128:
        return 7, 4
    if size > 64:
        return 3, 2
    return 3, 1


class _ResNetBase(nn.Module):
    def __init__(
        self,
        channel: int,
        num_classes: int,
        depth: int,
        width: int,
        norm: str,
        im_size: int | tuple[int, int],
        avgpool_shortcut: bool,
    ):
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"depth: expected one of {sorted(_STAGE_BLOCKS)}, got {depth!r}")
        for arg, value in dict(channel=channel, num_classes=num_classes, width=width).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        make_norm(norm, 1)  # validates ``norm``
        kernel, pool = _stem_for_size(im_size)
        self.stem = Stem(channel, width, kernel, pool, norm)
        stages, in_channels = [], width
        for index, num_blocks in enumerate(_STAGE_BLOCKS[depth]):
            out_channels = width * 2**index
            blocks = [
                BasicBlock(
                    in_channels if b == 0 else out_channels,
                    out_channels,
                    2 if (index > 0 and b == 0) else 1,
                    norm,
                    avgpool_shortcut,
                )
                for b in range(num_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.layers = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.feature_dim = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> globally average-pooled features [B, 8*width]."""
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes]."""
        return self.classifier(self.features(x))


class ResNetAP(_ResNetBase):
    """ResNetAP-{10,18,34}: average-pooling downsampling everywhere (shortcut: 1x1 conv -> AvgPool -> norm)."""

    def __init__(
        self,
        channel: int,
        num_classes: int,
        depth: int = 10,
        width: int = 64,
        im_size: int | tuple[int, int] = 224,
        norm: str = "instancenorm",
    ):
        super().__init__(channel, num_classes, depth, width, norm, im_size, avgpool_shortcut=True)


class ResNet(_ResNetBase):
    """ResNet-{10,18,34} of the same family; shortcut downsampling by a strided 1x1 conv -> norm."""

    def __init__(
        self,
        channel: int,
        num_classes: int,
        depth: int = 18,
        norm: str = "instancenorm",
        im_size: int | tuple[int, int] = 224,
        width: int = 64,
    ):
        super().__init__(channel, num_classes, depth, width, norm, im_size, avgpool_shortcut=False)
