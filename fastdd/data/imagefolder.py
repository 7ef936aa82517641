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
    """(class names, [(path, class index)]) of an ImageFolder. Errors name the missing or empty folder, or an entry
    named like an image that is not a regular file."""
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
        for path in files:
            if not path.is_file():  # a FIFO or socket would block the reader; a folder named like an image
                raise ValueError(f"{path} is not a regular file (a folder, FIFO or device named like an image)")
        if not files:
            raise ValueError(f"class folder {folder} holds no images")
        samples += [(p, index) for p in files]
    return classes, samples


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale: 0..65535


def check_mode(img: Image.Image, path: str | Path) -> None:
    """ValueError for pixel formats without a known range: 32-bit integer ("I") and float ("F") images (PIL would clip
    them to 8 bits silently; 16-bit images are converted with their full range)."""
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise ValueError(
            f"cannot read image {path}: {kind} pixels (PIL mode {img.mode}) have no standard range; save it as an "
            "8- or 16-bit image"
        )


def _resize_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Resize (shorter side to image_size, bicubic) and centre-crop to image_size × image_size."""
    w, h = img.size
    scale = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def load_image(path: str | Path, image_size: int, channels: int = 3) -> torch.Tensor:
    """Resize (shorter side) + center crop to image_size; -> [channels, S, S] float32 in [-1, 1]. Any 8-bit mode is
    converted by PIL; 16-bit grayscale keeps its range (resampled in float, 65535 -> 1); 32-bit integer and float
    images are refused (`check_mode`)."""
    try:
        with Image.open(path) as img:
            check_mode(img, path)
            if img.mode in SIXTEEN_BIT_MODES:
                gray = Image.fromarray(np.asarray(img, dtype=np.float32) * (255.0 / 65535.0), mode="F")
                array = np.asarray(_resize_crop(gray, image_size), dtype=np.float32)
                array = array if channels == 1 else np.repeat(array[:, :, None], channels, axis=2)
            else:
                img = img.convert("RGB" if channels == 3 else "L")
                array = np.asarray(_resize_crop(img, image_size), dtype=np.float32)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    return (tensor / 127.5 - 1.0).clamp(-1.0, 1.0)


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
