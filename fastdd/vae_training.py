"""Train a small diffusers `AutoencoderKL` on real images (the latent digits default ships one): the real loading and
decoding code of a latent run (`fastdd.models.vae.LatentCodec`) then runs offline.

Loss: mean squared reconstruction error plus kl_weight × the KL of the encoder's Gaussian to N(0, I) (a light
regulariser, as SD's VAE; no perceptual or adversarial term). After training, the config's `scaling_factor` is set to
1 / the root mean square of the encoder-mean latents of the training images, so that scaled latents have unit variance (SD: 0.18215).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .data.real import RealData
from .progress import progress_bar

DIGITS_VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)


def build_vae(channels: int, image_size: int, block_out_channels=(32, 64, 64), layers_per_block: int = 1,
              latent_channels: int = 4, norm_num_groups: int = 8) -> nn.Module:  # fmt: skip
    """A diffusers AutoencoderKL: len(block_out_channels) levels (downsampling 2^(levels - 1))."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )


def train_vae(
    vae: nn.Module,
    data: RealData,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train vae on the real images (each step's batch read by index); sets its scaling_factor; returns it in eval
    mode."""
    data.require()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in progress_bar(range(steps), desc="vae", disable=not progress):
        rows = torch.randint(0, data.num_images, (batch_size,), generator=generator)
        images, _ = next(data.batches(rows, batch_size))
        images = images.to(device)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(latents).sample
        loss = (reconstruction - images).pow(2).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    squares, count = 0.0, 0
    with torch.no_grad():
        for images, _ in data.batches(torch.arange(data.num_images), 256):
            mean = vae.encode(images.to(device)).latent_dist.mean
            squares, count = squares + float(mean.pow(2).sum()), count + mean.numel()
    vae.register_to_config(scaling_factor=1.0 / math.sqrt(squares / count))
    return vae
