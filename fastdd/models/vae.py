"""Latent codecs: the Stable-Diffusion VAE (diffusers ``AutoencoderKL``) and an identity pixel codec.

Both share one interface so that samplers and guidance code can run in latent or in pixel space:
``encode(images [-1, 1] [B, 3, H, W]) -> latents`` and ``decode(latents) -> images [-1, 1]``,
plus ``latent_channels`` and ``downsample`` (spatial factor between images and latents).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .precision import check_precision, mixed_precision

__all__ = ["LatentCodec", "PixelCodec", "load_vae", "VAE_ALIASES", "SD_VAE_SCALE"]

SD_VAE_SCALE = 0.18215
VAE_ALIASES = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}


def check_vae_folder(folder: str) -> None:
    """ValueError unless `folder` holds an AutoencoderKL config and weights (diffusers would otherwise build a VAE
    with random weights from a foreign folder and only warn)."""
    import glob
    import json

    config = os.path.join(folder, "config.json")
    try:
        with open(config) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, ValueError):
        class_name = None
    if class_name != "AutoencoderKL":
        raise ValueError(f"{folder} is not a diffusers AutoencoderKL folder ({config}: _class_name {class_name!r})")
    if not glob.glob(os.path.join(folder, "diffusion_pytorch_model*")):
        raise ValueError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors or .bin)")


def load_vae(
    name_or_path: str = "stabilityai/sd-vae-ft-mse",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    subfolder: str | None = None,
) -> nn.Module:
    """``AutoencoderKL.from_pretrained`` in eval mode with frozen parameters (gradients still flow to inputs).

    name_or_path: hub id, the aliases ``"mse"`` / ``"ema"``, a local folder saved with ``save_pretrained``, or a
    pipeline folder containing ``vae/`` (picked automatically unless ``subfolder`` is given).
    """
    from diffusers import AutoencoderKL

    name_or_path = VAE_ALIASES.get(name_or_path, name_or_path)
    if subfolder is None and os.path.isfile(os.path.join(name_or_path, "vae", "config.json")):
        subfolder = "vae"
    if os.path.isdir(name_or_path):
        check_vae_folder(os.path.join(name_or_path, subfolder or ""))
    from .dit import quiet_diffusers

    try:
        with quiet_diffusers():
            vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load an AutoencoderKL from {name_or_path!r}: {first_line}") from None
    return vae.to(device).eval().requires_grad_(False)


class LatentCodec:
    """VAE codec with the SD latent scaling: latents = scale * VAE-encoder sample.

    vae: a diffusers ``AutoencoderKL``. scale: latent scale factor (default: the VAE config's
    ``scaling_factor``, 0.18215 for the SD VAEs). channels_last: run the VAE in channels-last memory
    format (faster convolutions on GPU); outputs are returned contiguous. precision="bf16": decode under bf16
    autocast (see fastdd.models.precision).
    Outputs have the dtype of the inputs; the VAE runs in its own dtype.
    """

    def __init__(
        self, vae: nn.Module, scale: float | None = None, channels_last: bool = False, precision: str = "fp32"
    ):
        self.vae = vae
        self.precision = check_precision(precision)
        self.scale = float(scale if scale is not None else getattr(vae.config, "scaling_factor", SD_VAE_SCALE))
        self.channels_last = channels_last
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_channels = int(vae.config.in_channels)
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "stabilityai/sd-vae-ft-mse",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        scale: float | None = None,
        channels_last: bool = False,
        precision: str = "fp32",
    ) -> LatentCodec:
        return cls(
            load_vae(name_or_path, dtype=dtype, device=device),
            scale=scale,
            channels_last=channels_last,
            precision=precision,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images: [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8] (scaled).

        sample=True draws from the encoder's Gaussian (``latent_dist.sample``); False uses its mean.
        """
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"images: expected [B, {self.image_channels}, H, W], got {list(images.shape)}")
        dist = self.vae.encode(self._prepare(images)).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mode()
        return (latents * self.scale).to(images.dtype).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, 4, h, w] (scaled) -> images [B, 3, 8h, 8w], nominally in [-1, 1] (not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents: expected [B, {self.latent_channels}, h, w], got {list(latents.shape)}")
        decode = mixed_precision(lambda z: self.vae.decode(self._prepare(z / self.scale)).sample, self.precision)
        return decode(latents).to(latents.dtype).contiguous()


class PixelCodec:
    """Identity codec for a pixel-space prior: latents are the images themselves."""

    scale = 1.0
    downsample = 1

    def __init__(self, channels: int = 3):
        self.latent_channels = channels
        self.image_channels = channels

    def encode(
        self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images: [B, C, H, W] -> the same tensor (``sample`` and ``generator`` are ignored)."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"images: expected [B, {self.image_channels}, H, W], got {list(images.shape)}")
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, C, H, W] -> the same tensor."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents: expected [B, {self.latent_channels}, H, W], got {list(latents.shape)}")
        return latents
