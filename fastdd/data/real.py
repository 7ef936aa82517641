"""The real images a method reads: an ImageFolder (--data) or the scikit-learn digits train split, loaded on use."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .digits import DIGITS_CLASSES, load_digits_split
from .imagefolder import check_mode, load_image_folder, scan_image_folder


@dataclass
class RealData:
    """The class list and the real images of its classes, loaded on first use.

    class_names: one per local class; dataset: "digits", "imagenette", "imagewoof" or "custom"; loader() ->
    (images [N, C, S, S] in [-1, 1] at the decoded image size, labels [N] local class indices); fingerprint: a hash
    of what the images are (each file's path, size and mtime, or the digits split), which every cache of real-data
    state is keyed by."""

    class_names: list[str]
    dataset: str
    loader: Callable[[], tuple[Tensor, Tensor]]
    description: str
    fingerprint: str = "none"
    _cache: tuple[Tensor, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self) -> tuple[Tensor, Tensor]:
        if self._cache is None:
            self._cache = self.loader()
        return self._cache

    def class_counts(self) -> list[int]:
        """Real images per local class."""
        return torch.bincount(self.load()[1], minlength=self.num_classes).tolist()


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, mtime in ns) of a file: what a data fingerprint records of it (cheap next to reading it)."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def fingerprint_of(value) -> str:
    """sha256 of a JSON-able value (sorted keys): how fastdd fingerprints what data and caches depend on."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def real_data(
    data: str | None, dataset: str, class_names: list[str], image_shape: tuple[int, int, int], verify: bool = True
) -> RealData:
    """Real images of the classes at the decoded image size: --data (checked now: folders exist and hold images;
    with verify, every image opens: pass False when the caller loads them at once, which names an unreadable image
    itself), or the digits train split; loaded on first use. Without either, load() raises ValueError."""
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

        def load_folder():
            images, labels, _ = load_image_folder(data, size, channels, classes=class_names)
            return images, labels

        listing = [(str(Path(path).relative_to(data)), *file_stamp(path)) for path, _ in samples]
        fingerprint = fingerprint_of({"folder": listing, "image_shape": list(image_shape)})
        return RealData(class_names, dataset, load_folder, f"{data} ({len(samples)} images)", fingerprint)
    if dataset == "digits":
        positions = {name: i for i, name in enumerate(DIGITS_CLASSES)}

        def load_digits():
            images, labels = load_digits_split("train", size)
            keep = [positions[n] for n in class_names]
            mask = torch.isin(labels, torch.tensor(keep))
            local = torch.tensor([keep.index(int(v)) for v in labels[mask]])
            return images[mask], local

        fingerprint = fingerprint_of({"digits": "train", "classes": class_names, "image_shape": list(image_shape)})
        return RealData(class_names, dataset, load_digits, "digits train split", fingerprint)

    def missing():
        raise ValueError("--data: this method needs real images of the classes")

    return RealData(class_names, dataset, missing, "none")
