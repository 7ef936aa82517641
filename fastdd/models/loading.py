"""Load the generator a run samples from: a fastdd prior, an official DiT checkpoint or a diffusers DiT, with its codec.

`--model`: a fastdd prior (.safetensors from `fastdd prior train`, pixel space), an official DiT checkpoint (.pt /
.pth / .safetensors) or a diffusers DiT (hub id or folder); default: the bundled digits prior without --data, else
facebook/DiT-XL-2-256. `--vae`: mse | ema | none | NAME_OR_PATH for latent models.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

DIGITS_PRIOR_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_prior.safetensors"
DEFAULT_DIT = "facebook/DiT-XL-2-256"


def file_digest(path: Path, limit: int = 200 * 2**20) -> str:
    """sha256 of a file up to `limit` bytes (else 'size:<bytes>'), so a changed checkpoint is noticed on resume."""
    size = path.stat().st_size
    if size > limit:
        return f"size:{size}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_fastdd_prior(path: Path) -> bool:
    """Whether a file is a fastdd prior (a safetensors file with fastdd's DiT config in its metadata)."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "fastdd_dit_config" in (f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"--model {path} is not a readable safetensors file ({err})") from None


def load_generator(model: str | None, vae: str | None, data: str | None, device: torch.device,
                   precision: str = "fp32") -> tuple[nn.Module, object, dict]:  # fmt: skip
    """(DiT in eval mode without gradients, codec, description for the manifest) for --model / --vae; `data` (the
    --data folder or None) picks the default model."""
    from ..prior import load_prior
    from .vae import LatentCodec, PixelCodec

    spec = model or (str(DIGITS_PRIOR_PATH) if data is None else DEFAULT_DIT)
    path = Path(spec)
    if model is None and data is None and not path.is_file():
        raise ValueError(f"the bundled digits prior {path} is missing; make it with `fastdd prior train --out {path}`")
    description = {"model": spec if model else ("bundled digits prior" if data is None else spec)}
    if path.is_file():
        description["model_sha256"] = file_digest(path)
    if path.is_file() and is_fastdd_prior(path):
        try:
            network, extra = load_prior(path, device)
        except (RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"--model {path}: checkpoint does not match its DiT config ({err})") from None
        if vae not in (None, "none"):
            raise ValueError(f"--vae: {path} is a pixel-space prior; it takes no VAE")
        codec = PixelCodec(network.in_channels)
        description.update(prior_extra=extra)
    else:
        from .dit import load_diffusers_dit, load_dit_checkpoint

        if not path.exists() and (path.suffix in (".pt", ".pth", ".safetensors", ".bin") or spec.startswith((".", "/"))):
            raise ValueError(f"--model {spec} does not exist")
        try:
            if path.is_file():
                network = load_dit_checkpoint(str(path), strict=False, device=device)
            else:
                network = load_diffusers_dit(spec).to(device)
        except (OSError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"--model {spec}: cannot load a DiT ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None  # fmt: skip
        vae = vae or "mse"
        codec = PixelCodec(network.in_channels) if vae == "none" else LatentCodec.from_pretrained(
            vae, device=device, channels_last=device.type == "cuda", precision=precision)
        description.update(vae=vae)
        extra = {}
    if codec.latent_channels != network.in_channels:
        raise ValueError(f"--model {spec} takes {network.in_channels} channels, the VAE makes {codec.latent_channels}")
    return network.eval().requires_grad_(False), codec, description | {"extra": extra}
