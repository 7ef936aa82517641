"""Random resized crops: the crop geometry shared by the surrogate's and the IGDS estimator's augmentations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_sides(area, aspect):
    """(height, width) of a crop of the given area whose width / height is aspect; floats or tensors alike."""
    return (area / aspect) ** 0.5, (area * aspect) ** 0.5


def random_resized_crop(images: Tensor, generator: torch.Generator, scale=(0.5, 1.0), flip: bool = True) -> Tensor:
    """Per-image random crop of area fraction in `scale` (aspect 3/4–4/3), whole pixels, resized back with
    bilinear interpolation; optional horizontal flips. images: [B, C, H, W] -> [B, C, H, W].
    Draws per image, in order: area, log aspect, top, left, flip."""
    batch, _, height, width = images.shape
    out = torch.empty_like(images)
    for i in range(batch):
        area = float(torch.empty(1).uniform_(*scale, generator=generator)) * height * width
        aspect = float(torch.exp(torch.empty(1).uniform_(-0.2877, 0.2877, generator=generator)))
        crop_height, crop_width = crop_sides(area, aspect)
        h = min(height, max(1, round(crop_height)))
        w = min(width, max(1, round(crop_width)))
        top = int(torch.randint(height - h + 1, (1,), generator=generator))
        left = int(torch.randint(width - w + 1, (1,), generator=generator))
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
        if flip and bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out
