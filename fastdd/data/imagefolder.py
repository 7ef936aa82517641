"""ImageFolder reading and atomic PNG writing with PIL (no torchvision).

Layout: ROOT/<class>/<image files>, classes sorted by folder name, files sorted by name.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .atomic import write_bytes_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".JPEG")


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(path, class index)]) of an ImageFolder. Errors name the missing or empty folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root} has no class sub-folders")
    samples = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise ValueError(f"class folder {folder} does not exist")
        files = sorted(
            p for p in folder.iterdir() if p.suffix in IMAGE_EXTENSIONS or p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"class folder {folder} holds no images")
        samples += [(p, index) for p in files]
    return classes, samples


def load_image(path: str | Path, image_size: int, channels: int = 3) -> torch.Tensor:
    """Resize (shorter side) + center crop to image_size; -> [channels, S, S] float32 in [-1, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            scale = image_size / min(w, h)
            img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(img, dtype=np.float32)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def load_image_folder(root: str | Path, image_size: int, channels: int = 3, classes: list[str] | None = None):
    """(images [N, channels, S, S] in [-1, 1], labels [N], class names)."""
    classes, samples = scan_image_folder(root, classes)
    images = torch.stack([load_image(p, image_size, channels) for p, _ in samples])
    labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
    return images, labels, classes


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> HxW (C=1) or HxWxC uint8, rounding like the authors' save path."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()


def png_bytes(image: torch.Tensor) -> bytes:
    """image [C, H, W] in [-1, 1] -> PNG file contents (deterministic for equal pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png_atomic(image: torch.Tensor, path: str | Path) -> str:
    """Write image [C, H, W] in [-1, 1] to path as PNG, atomically; returns its sha256 hex digest."""
    data = png_bytes(image)
    write_bytes_atomic(data, path)
    return hashlib.sha256(data).hexdigest()


def matches_sha256(path: str | Path, sha256: str) -> bool:
    """Whether the file at path exists and its contents have this sha256 hex digest (what a manifest records)."""
    path = Path(path)
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256
