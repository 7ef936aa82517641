"""The real images a method reads: an ImageFolder (--data) or the scikit-learn digits train split, loaded on use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .digits import DIGITS_CLASSES, load_digits_split
from .imagefolder import load_image_folder, scan_image_folder


@dataclass
class RealData:
    """The class list and the real images of its classes, loaded on first use.

    class_names: one per local class; dataset: "digits", "imagenette", "imagewoof" or "custom"; loader() ->
    (images [N, C, S, S] in [-1, 1] at the decoded image size, labels [N] local class indices)."""

    class_names: list[str]
    dataset: str
    loader: Callable[[], tuple[Tensor, Tensor]]
    description: str
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


def real_data(data: str | None, dataset: str, class_names: list[str], image_shape: tuple[int, int, int],
              verify: bool = True) -> RealData:  # fmt: skip
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
                        img.verify()
                except (OSError, UnidentifiedImageError) as err:
                    raise ValueError(f"--data: cannot read image {path} ({err})") from None

        def load_folder():
            images, labels, _ = load_image_folder(data, size, channels, classes=class_names)
            return images, labels

        return RealData(class_names, dataset, load_folder, f"{data} ({len(samples)} images)")
    if dataset == "digits":
        positions = {name: i for i, name in enumerate(DIGITS_CLASSES)}

        def load_digits():
            images, labels = load_digits_split("train", size)
            keep = [positions[n] for n in class_names]
            mask = torch.isin(labels, torch.tensor(keep))
            local = torch.tensor([keep.index(int(v)) for v in labels[mask]])
            return images[mask], local

        return RealData(class_names, dataset, load_digits, "digits train split")

    def missing():
        raise ValueError("--data: this method needs real images of the classes")

    return RealData(class_names, dataset, missing, "none")
