"""Small models in the real formats and synthetic ImageFolders that the benchmarks build offline (the tests have
their own in tests/tiny_dit.py: benchmarks do not import tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tiny_pipeline(folder: Path, classes: int) -> None:
    """A DiTPipeline-format folder: a 2-block latent DiT (hidden 64) and a 2-level AutoencoderKL (32² <-> 4×16×16)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=classes,
    )
    with torch.no_grad():  # released weights hold one timestep/label embedder, copied in every block
        for block in transformer.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=32,
    )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(folder)


def image_folder(root: Path, classes: int, per_class: int) -> None:
    """`classes` folders of `per_class` JPEGs (a class-dependent colour plus noise, 40×48)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.array([60 * c, 255 - 60 * c, 128], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.JPEG")
