"""Per-class state derived from the real images, computed on first use, stored per class and held for a few classes.

`ClassCache` is the one mechanism: `cache[c]` reads class c's file from the state folder (safetensors, written
atomically, so a killed run resumes at the next unfinished class and never reads a half-written one) or computes it,
and keeps at most `keep` classes in memory (least recently used dropped). Each batch of a run touches the classes of
one chunk, so a run holds the state of at most `--class-batch` classes whatever the number of classes. Under torchrun
each rank computes the classes of its own chunks.

`class_latents` is the real-latent encoding: a class's images, read in batches, through the VAE encoder (mean, or a
draw seeded per class); in pixel space the images themselves.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..progress import progress_bar
from .atomic import save_safetensors_atomic
from .real import RealData


class ClassCache(Mapping):
    """{local class: tensor} computed by compute(c) on first use.

    classes: the keys; compute(c) -> Tensor; folder: where each class is stored as <c>.safetensors (None: memory
    only); keep: classes held in memory at once (>= 1). `resident_peak` is the most classes held at any time."""

    def __init__(
        self,
        classes: Sequence[int],
        compute: Callable[[int], Tensor],
        folder: str | Path | None = None,
        keep: int = 8,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.classes, self.compute, self.keep = list(classes), compute, keep
        self.folder = None if folder is None else Path(folder)
        self._held: OrderedDict[int, Tensor] = OrderedDict()
        self.resident_peak = 0

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[int]:
        return iter(self.classes)

    def __contains__(self, class_index: object) -> bool:
        return class_index in self.classes

    def path(self, class_index: int) -> Path | None:
        return None if self.folder is None else self.folder / f"{class_index}.safetensors"

    def __getitem__(self, class_index: int) -> Tensor:
        if class_index not in self.classes:
            raise KeyError(class_index)
        if class_index in self._held:
            self._held.move_to_end(class_index)
            return self._held[class_index]
        value = self._read(class_index)
        if value is None:
            value = self.compute(class_index)
            if self.folder is not None:
                save_safetensors_atomic({"value": value.detach().cpu().contiguous()}, self.path(class_index))
        while len(self._held) >= self.keep:
            self._held.popitem(last=False)
        self._held[class_index] = value
        self.resident_peak = max(self.resident_peak, len(self._held))
        return value

    def _read(self, class_index: int) -> Tensor | None:
        path = self.path(class_index)
        if path is None or not path.is_file():
            return None
        try:
            return load_file(str(path))["value"]
        except Exception as err:  # a corrupt file (e.g. a full disk) is computed again, said on stderr
            print(f"fastdd: cached {path} is unreadable ({type(err).__name__}); computing it again", file=sys.stderr)
            path.unlink(missing_ok=True)
            return None

    def done(self, class_index: int) -> bool:
        """Whether class c is stored (so a dry run or a resume need not compute it)."""
        path = self.path(class_index)
        return path is not None and path.is_file()


def class_latents(
    data: RealData,
    class_index: int,
    codec,
    device: torch.device,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    limit: int | None = None,
) -> Tensor:
    """[n, C, h, w] latents of a class's (first `limit`) images on `device`: the codec's encoder mean, or a draw from
    `generator` (sample=True); in pixel space (`PixelCodec`) the images. Images are read batch_size at a time."""
    out = []
    with torch.no_grad():
        for images, _ in data.batches(data.class_indices(class_index, limit), batch_size):
            out.append(codec.encode(images.to(device), sample=sample, generator=generator))
    if not out:
        raise ValueError(f"--data: class {data.class_names[class_index]!r} has no real images")
    return torch.cat(out)


class EncodedBatches:
    """Training batches of a run's real images, read in a given order and encoded on the way: (latents [b, C, h, w]
    on `device`, labels [b]). encode: images [b, C, S, S] on the device -> latents (None: the images themselves);
    label_table: the label each local class is given (e.g. the model's; default: the local class). The same
    interface as `fastdd.data.dataset.TensorBatches`."""

    def __init__(
        self,
        data: RealData,
        device: torch.device,
        encode: Callable[[Tensor], Tensor] | None = None,
        label_table: Tensor | None = None,
    ):
        data.require()
        self.data, self.device, self.encode = data, device, encode
        self.table = label_table
        self.labels = data.labels if label_table is None else label_table[data.labels]

    def batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.data.batches(order, batch_size):
            images = images.to(self.device)
            if self.encode is not None:
                with torch.no_grad():
                    images = self.encode(images)
            yield images, labels if self.table is None else self.table[labels]


def encode_latents(
    codec,
    images: Tensor,
    *,
    batch_size: int = 32,
    sample: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """Codec latents of images, encoded batch by batch without autograd.

    The codec applies the latent scale (0.18215 for the SD VAE).

    Args:
        codec: the latent codec (`encode(images, sample=, generator=)`).
        images: [N, 3, H, W] in [-1, 1].
        batch_size: images per encode call (> 0).
        sample: False: the encoder mean (MGD3's modes); True: a draw of the encoder's Gaussian (D3HR).
        generator: generator of the draws (sample=True).
        progress: show a progress bar.

    Returns:
        [N, C, h, w] latents.

    Raises:
        ValueError: if batch_size <= 0 or images is not a non-empty [N, C, H, W] batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty [N, C, H, W] batch, got shape {list(images.shape)}")
    out = []
    with torch.no_grad():
        for start in progress_bar(
            range(0, images.shape[0], batch_size), disable=not progress, desc="encode", leave=False
        ):
            out.append(codec.encode(images[start : start + batch_size], sample=sample, generator=generator))
    return torch.cat(out)
