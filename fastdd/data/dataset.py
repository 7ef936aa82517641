"""Real images as `torch.utils.data` datasets, read in bounded batches: an ImageFolder decoded on access (by the
DataLoader's worker processes), or images already in memory (the digits split).

`load_batches(dataset, indices, batch_size, workers)` yields (images, labels) of `indices` in their order, one batch
at a time: no code path holds more than one batch of decoded images unless it stacks them itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .imagefolder import load_image


class FolderImages(Dataset):
    """ImageFolder images decoded on access. item i -> (image [C, S, S] float32 in [-1, 1], local class).

    samples: [(path, local class)] in dataset order; image_size: S (resize + centre crop); channels: 1 or 3."""

    def __init__(self, samples: Sequence[tuple[Path, int]], image_size: int, channels: int):
        self.paths = [str(p) for p, _ in samples]
        self.classes = torch.tensor([c for _, c in samples], dtype=torch.long)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return load_image(self.paths[index], self.image_size, self.channels), int(self.classes[index])


class TensorImages(Dataset):
    """Images already in memory (a small built-in split such as digits). images: [N, C, S, S]; labels: [N]."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.classes = images, labels.long()

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.classes[index])


def load_batches(
    dataset: Dataset, indices: Sequence[int] | Tensor, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images [b, C, S, S], labels [b]) of `indices`, in their order, batch_size at a time (`read_batches`)."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    batches = [indices[s : s + batch_size].tolist() for s in range(0, len(indices), batch_size)]
    return read_batches(dataset, batches, workers, pin_memory)


def read_batches(
    dataset: Dataset, batches: Sequence[Sequence[int]], workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """(images [b, C, S, S], labels [b]) of each list of indices in `batches`, in order.

    In-memory images are sliced directly; an ImageFolder is decoded by a DataLoader with up to `workers` worker
    processes (none for a single batch: starting workers would cost more than decoding it), pinned when asked.
    """
    if isinstance(dataset, TensorImages):
        for rows in batches:
            rows = torch.as_tensor(rows, dtype=torch.long)
            yield dataset.images[rows], dataset.classes[rows]
        return
    batches = [list(b) for b in batches]
    workers = min(workers, len(batches)) if len(batches) > 1 else 0
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory)
    yield from loader


class TensorBatches:
    """Training batches of tensors already in memory. images: [N, ...]; labels: [N]."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.long)

    def batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) of `order`'s indices, batch_size at a time, in that order."""
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield self.images[rows], self.labels[rows]
