"""Training augmentations: random resized crops (the crop geometry shared by the surrogate's and the IGDS estimator's
augmentations) and the surrogate trajectory's photometric noise."""

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


# ImageNet's RGB principal components (AlexNet's lighting noise, as fb.resnet.torch and IDC's data.py use them)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
GRAY = (0.299, 0.587, 0.114)


def color_jitter_lighting(images: Tensor, generator: torch.Generator, jitter: float = 0.4, lighting: float = 0.1):
    """The surrogate trajectory's photometric augmentation (SPEC: ColorJitter(0.4), lighting noise 0.1; the
    fb.resnet.torch recipe IDC's data.py uses): per RGB image, brightness, contrast and saturation in a random order,
    each blending with black / the mean gray / the pixel's gray by α ~ U(1 − jitter, 1 + jitter), then AlexNet's
    lighting noise (ImageNet's principal components scaled by N(0, lighting) draws), on [0, 1] values, unclipped.
    images: [B, 3, H, W] in [-1, 1] -> [B, 3, H, W]. Draws per image, in order: the order, three α, three noise."""
    gray_weights = torch.tensor(GRAY, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    eigval = torch.tensor(IMAGENET_EIGVAL)
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        x = (images[i : i + 1] + 1) / 2
        order = torch.randperm(3, generator=generator).tolist()
        alphas = torch.empty(3).uniform_(1 - jitter, 1 + jitter, generator=generator).tolist()
        for op, alpha in zip(order, alphas):
            gray = (x * gray_weights).sum(1, keepdim=True)
            target = (0.0, gray.mean(), gray)[op]  # brightness, contrast, saturation
            x = x * alpha + target * (1 - alpha)
        noise = torch.empty(3).normal_(0, lighting, generator=generator)
        shift = (eigvec * (noise * eigval)).sum(1).to(images)
        out[i] = (x + shift.view(1, 3, 1, 1))[0] * 2 - 1
    return out
