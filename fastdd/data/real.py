"""The real images a method reads: an ImageFolder (--data) or the scikit-learn digits train split, read in bounded
batches (`fastdd.data.dataset`), never all at once.

What a run keeps of them: the labels of every image (from the folder listing, one integer each), and at any moment at
most one batch of decoded images or one class's images (a class's first 200 for IGD's real gradients), plus the
per-class state it derives from them (`fastdd.data.latents`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .dataset import FolderImages, TensorImages, load_batches, read_batches
from .digits import DIGITS_CLASSES, load_digits_split
from .imagefolder import check_mode, scan_image_folder


@dataclass
class RealData:
    """The class list and, when there is real data, its images, read in batches.

    class_names: one per local class; dataset: "digits", "imagenette", "imagewoof", "imagenet1k" or "custom";
    source: the images (None: no real data; a method that needs some refuses); labels: [N] local class of every
    image, in dataset order (class-major, files sorted within a class); fingerprint: a hash of what the images are
    (each file's path, size and mtime, or the digits split), which every cache of real-data state is keyed by;
    workers: DataLoader worker processes that decode images; pin_memory: pinned batches (CUDA)."""

    class_names: list[str]
    dataset: str
    description: str
    fingerprint: str = "none"
    source: Dataset | None = None
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    workers: int = 0
    pin_memory: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def class_counts(self) -> list[int]:
        """Real images per local class."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def class_indices(self, class_index: int, limit: int | None = None) -> Tensor:
        """Dataset indices of a class's images (its first `limit`), in dataset order."""
        return torch.nonzero(self.labels == class_index).flatten()[:limit]

    def require(self) -> Dataset:
        """The images (ValueError naming --data when the run has none)."""
        if self.source is None:
            raise ValueError("--data: this method needs real images of the classes")
        return self.source

    def batches(self, indices: Sequence[int] | Tensor, batch_size: int = 64) -> Iterator[tuple[Tensor, Tensor]]:
        """(images [b, C, S, S] in [-1, 1], local labels [b]) of `indices`, in their order, batch_size at a time."""
        return load_batches(self.require(), indices, batch_size, self.workers, self.pin_memory)

    def read(self, batches: Sequence[Sequence[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, local labels) of each list of indices in `batches` (e.g. a rank's shares, `rank_batches`)."""
        return read_batches(self.require(), batches, self.workers, self.pin_memory)

    def images(self, indices: Sequence[int] | Tensor, batch_size: int = 64) -> Tensor:
        """The images of `indices` stacked [n, C, S, S] (for a bounded set: a class's first images, a chunk)."""
        return torch.cat([images for images, _ in self.batches(indices, batch_size)])

    def class_images(self, class_index: int, limit: int | None = None) -> Tensor:
        """[n, C, S, S]: the first `limit` images of a class (all of it without a limit)."""
        return self.images(self.class_indices(class_index, limit))


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime in ns) of a file: what a data fingerprint records of it (cheap next to reading it)."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def fingerprint_of(value) -> str:
    """sha256 of a JSON-able value (sorted keys): how fastdd fingerprints what data and caches depend on."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def real_data(
    data: str | None,
    dataset: str,
    class_names: list[str],
    image_shape: tuple[int, int, int],
    verify: bool = True,
    workers: int = 0,
    pin_memory: bool = False,
) -> RealData:
    """Real images of the classes at the decoded image size: --data (checked now: folders exist and hold images;
    with verify, every image opens: pass False to let the reader name an unreadable image when it meets it), or the
    digits train split. Without either, a method that reads images is refused (`RealData.require`)."""
    channels, size, _ = image_shape
    if data is not None:
        _, samples = scan_image_folder(data, class_names)
        if verify:
            from PIL import Image, UnidentifiedImageError

            for path, _ in samples:
                try:
                    with Image.open(path) as img:
                        check_mode(img, path)
                        img.verify()
                except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                    raise ValueError(f"--data: cannot read image {path} ({err})") from None
                except ValueError as err:
                    raise ValueError(f"--data: {err}") from None
        listing = [(str(Path(path).relative_to(data)), *file_stamp(path)) for path, _ in samples]
        fingerprint = fingerprint_of({"folder": listing, "image_shape": list(image_shape)})
        source = FolderImages(samples, size, channels)
        description = f"{data} ({len(samples)} images)"
        return RealData(class_names, dataset, description, fingerprint, source, source.classes, workers, pin_memory)
    if dataset == "digits":
        positions = {name: i for i, name in enumerate(DIGITS_CLASSES)}
        images, labels = load_digits_split("train", size)
        keep = [positions[n] for n in class_names]
        mask = torch.isin(labels, torch.tensor(keep))
        local = torch.tensor([keep.index(int(v)) for v in labels[mask]], dtype=torch.long)
        fingerprint = fingerprint_of({"digits": "train", "classes": class_names, "image_shape": list(image_shape)})
        source = TensorImages(images[mask], local)
        return RealData(class_names, dataset, "digits train split", fingerprint, source, local)
    return RealData(class_names, dataset, "none")


def as_real_data(images: Tensor | RealData, labels: Tensor | None = None) -> RealData:
    """`images` as a RealData: itself, or images [N, C, S, S] in memory with labels [N] (local classes 0..C-1)."""
    if isinstance(images, RealData):
        return images
    labels = torch.as_tensor(labels, dtype=torch.long)
    names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return RealData(names, "custom", "images in memory", source=TensorImages(images, labels), labels=labels)
