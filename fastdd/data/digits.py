"""scikit-learn's bundled digits: the offline default dataset (ships with every scikit-learn install).

1,797 grayscale 8×8 images of 10 digit classes. fastdd's fixed split: `train_test_split(test_size=0.25,
random_state=0, stratify=labels)`, i.e. 1,347 train / 450 test images. Images are upsampled bilinearly
to `image_size` (16 by default) and mapped from [0, 16] to [-1, 1]; shape [N, 1, S, S].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_IMAGE_SIZE = 16


def load_digits_split(split: str = "train", image_size: int = DIGITS_IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, image_size, image_size] in [-1, 1] float32, labels [N] int64) of the fixed split."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    if split != "all":
        index = torch.arange(len(labels))
        train_idx, test_idx = train_test_split(index.numpy(), test_size=0.25, random_state=0, stratify=labels.numpy())
        keep = torch.as_tensor(train_idx if split == "train" else test_idx)
        images, labels = images[keep], labels[keep]
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), labels
