"""ResNet-18 and MobileNet-V2 with torchvision's module names and state-dict keys, written in fastdd (torchvision's
wheel does not import beside the CPU torch): a torchvision state dict (an RDED / SRe²L teacher, `{"model": ...}` as
torchvision's reference trainer saves it) loads strictly.

Architecture facts (torchvision's published models): ResNet-18 = conv1 7×7/2 (3×3/1 and no max-pool for small
images: RDED's "resnet18_modified"), bn1, ReLU, max-pool 3×3/2, layer1-4 of two BasicBlocks (64, 128, 256, 512;
stride 2 from layer2, a 1×1 conv + BN downsample where the shape changes), global average pool, fc. MobileNet-V2 =
features.0: 3×3/2 conv (32) + BN + ReLU6; 17 inverted residual blocks with (expansion t, channels c, repeats n,
stride s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1); features.18: 1×1 conv to
1280 + BN + ReLU6; global average pool; classifier = Dropout(0.2), Linear(1280, classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchvisionResNet18", "MobileNetV2", "load_torchvision_state"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet18(nn.Module):
    """torchvision's resnet18 (BatchNorm). small_input: RDED's resnet18_modified (3×3/1 conv1, no max-pool), for
    images of 64 px and less. x: [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        self.small_input = small_input
        self.conv1 = (
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            if small_input
            else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        )
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        widths, channels = (64, 128, 256, 512), 64
        for index, width in enumerate(widths, 1):
            stride = 1 if index == 1 else 2
            self.add_module(
                f"layer{index}", nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width))
            )
            channels = width
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1, relu: bool = True):
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if relu else []))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else [_conv_bn(in_channels, hidden, 1, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                         (6, 320, 1, 1))  # fmt: skip


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0). small_input: the first conv at stride 1 (images of 64 px and less).
    x: [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False):
        super().__init__()
        self.small_input = small_input
        features = [_conv_bn(in_channels, 32, 3, 1 if small_input else 2)]
        channels = 32
        for expansion, width, repeats, stride in MOBILENET_V2_SETTINGS:
            for repeat in range(repeats):
                features.append(InvertedResidual(channels, width, stride if repeat == 0 else 1, expansion))
                channels = width
        features.append(_conv_bn(channels, 1280, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def load_torchvision_state(model: nn.Module, state: dict, source: str) -> nn.Module:
    """Load a torchvision state dict (or `{"model": state}`, `module.` prefixes stripped) strictly into model;
    ValueError naming source and the first mismatching keys."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys]  # fmt: skip
    if problems:
        raise ValueError(f"{source} does not match a {type(model).__name__} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)
    return model
