"""Tiny random models and small helpers shared by the guidance and sampler tests.

A random DiT predicts eps unrelated to x_t, so a 50-step trajectory inflates x by ~1/√ᾱ; adding the exact
denoiser of N(0, I) data, √(1 − ᾱ_t)·x_t, to its eps channels keeps the trajectory O(1), while the DiT part
(class-, t- and x-dependent, scaled by 0.3) keeps CFG and the learned variance channels non-trivial.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdd.models import DiT

TINY_PIXEL_DIT = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2)

_TRAIN_ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))).float()


class DenoisingDiT(DiT):
    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        channels = self.in_channels
        alpha_bar = _TRAIN_ALPHAS_CUMPROD.to(x.device)[t.long()].view(-1, 1, 1, 1)
        eps = (1 - alpha_bar).sqrt() * x + 0.3 * out[:, :channels]
        return torch.cat([eps, out[:, channels:]], dim=1)


def randomised_dit(
    num_classes: int,
    *,
    model_class: type[DiT] = DenoisingDiT,
    input_size: int = 8,
    hidden_size: int = 32,
    depth: int = 2,
    seed: int = 0,
    restore_rng: bool = True,
    final_adaln_bias: bool = True,
    final_linear_bias: bool = True,
    **dit_kwargs,
) -> DiT:
    """A `model_class` DiT (patch 2, 4 channels, 2 heads, learned sigma) built after torch.manual_seed(seed),
    with its zero-initialised layers drawn from N(0, 0.1²) in order: each block's adaLN weight and bias, the
    final adaLN weight (and bias when `final_adaln_bias`), the final linear weight (and bias when
    `final_linear_bias`).

    The official zero init would make every block the identity and leave most parameters without gradient.
    restore_rng=False leaves the global generator where the build left it (callers that build more models
    from it afterwards depend on that). Returned in training mode with gradients on.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    dit = model_class(
        input_size=input_size,
        patch_size=2,
        in_channels=4,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=2,
        num_classes=num_classes,
        learn_sigma=True,
        **dit_kwargs,
    )
    layers = [(block.adaLN_modulation[1], True) for block in dit.blocks]
    layers += [(dit.final_layer.adaLN_modulation[1], final_adaln_bias), (dit.final_layer.linear, final_linear_bias)]
    with torch.no_grad():
        for layer, with_bias in layers:
            layer.weight.normal_(0, 0.1)
            if with_bias:
                layer.bias.normal_(0, 0.1)
    if restore_rng:
        torch.random.set_rng_state(state)
    return dit


def tiny_denoising_dit(num_classes: int, input_size: int = 8, seed: int = 0, **kwargs) -> DenoisingDiT:
    """randomised_dit (hidden 32, depth 2 unless overridden) in eval mode, frozen."""
    return randomised_dit(num_classes, input_size=input_size, seed=seed, **kwargs).eval().requires_grad_(False)


def tiny_vae():
    """A frozen 2-level diffusers AutoencoderKL (8 channels, 4 latent channels, 16×16 images), drawn from the
    global generator as it stands."""
    from diffusers import AutoencoderKL

    return (
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4,
            sample_size=16,
        )
        .eval()
        .requires_grad_(False)
    )


def share_block0_embedder(transformer) -> None:
    """Copy block 0's timestep/label embedder into every block of a diffusers DiTTransformer2DModel, as in released
    weights (diffusers keeps one copy per block; the converted facebook/DiT-XL-2-256 has them all equal)."""
    first = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)


def save_tiny_dit_pipeline(
    folder, num_classes: int, num_layers: int = 1, seed: int = 0, randomise: bool = False, **scheduler_options
):
    """A diffusers DiTPipeline saved with save_pretrained at folder: a latent DiTTransformer2DModel (2 heads × 16,
    4 -> 8 channels, 8×8 latents), `tiny_vae()` (16×16 RGB images) and a DDIMScheduler with DiT's linear betas (and
    `scheduler_options`, e.g. set_alpha_to_one=False), drawn after torch.manual_seed(seed). randomise: the
    zero-initialised adaLN and output layers drawn from N(0, 0.05²). Every block's copy of the timestep/label
    embedder equals block 0's, as in released weights."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    with torch.no_grad():
        if randomise:
            for name, param in transformer.named_parameters():
                if "norm1.linear" in name or "proj_out" in name:
                    param.normal_(0, 0.05)
        share_block0_embedder(transformer)
    scheduler_options = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False,
                         **scheduler_options}  # fmt: skip
    scheduler = DDIMScheduler(**scheduler_options)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler).save_pretrained(folder)
    return folder


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) (floor 0: a zero `expected` gives inf or nan)."""
    return float((actual - expected).detach().norm() / expected.detach().norm().clamp_min(floor))


def save_tiny_prior(path, classes: list[str], dataset: str, nan: bool = False):
    """A 16×16 pixel-space fastdd prior for `classes` (at most 10) saved at path: the shipped digits prior with the
    label embeddings of its first len(classes) digits and its null class, so that its images are pictures, not the
    saturated noise of random weights (which a run refuses); with one NaN weight if nan."""
    from fastdd.models.loading import DIGITS_PRIOR_PATH
    from fastdd.prior import load_prior, save_prior

    digits, extra = load_prior(DIGITS_PRIOR_PATH)
    config = digits.config() | {"num_classes": len(classes)}
    model = DiT(**config)
    state = digits.state_dict()
    table = state["y_embedder.embedding_table.weight"]
    state["y_embedder.embedding_table.weight"] = torch.cat([table[: len(classes)], table[-1:]])
    model.load_state_dict(state)
    if nan:
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    metadata = {**extra, "dataset": dataset, "classes": classes}
    save_prior(model, path, metadata)
    return path


def bounded_pixel_dit_(model):
    """Make a random pixel-space DiT (fastdd's or diffusers' DiTTransformer2DModel) sample pictures instead of the
    saturated noise of random weights (which a run refuses): the patch embedding copies each patch's pixels into the
    hidden dims (alternating ± copies, so a token has mean 0 and the RMS of its patch) and the output projection reads
    the first copy back as eps, so eps is the patch over its RMS (about the right noise at high t, bounded everywhere); the adaLN weights are damped to keep class dependence
    small. In place; returns the model."""
    fastdd_layout = hasattr(model, "x_embedder")
    patch_embed = model.x_embedder.proj if fastdd_layout else model.pos_embed.proj
    final = model.final_layer.linear if fastdd_layout else model.proj_out_2
    modulations = (
        [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
        if fastdd_layout
        else [b.norm1.linear for b in model.transformer_blocks] + [model.proj_out_1]
    )
    channels, p = patch_embed.weight.shape[1], patch_embed.weight.shape[2]
    out_channels = final.weight.shape[0] // (p * p)
    with torch.no_grad():
        patch_embed.weight.zero_()
        patch_embed.bias.zero_()
        final.weight.zero_()
        final.bias.zero_()
        for c in range(channels):
            for u in range(p):
                for v in range(p):
                    hidden = c * p * p + u * p + v
                    for copy in range(patch_embed.weight.shape[0] // (channels * p * p)):  # ± copies: mean 0
                        patch_embed.weight[hidden + copy * channels * p * p, c, u, v] = 10.0 * (-1.0) ** copy
                    final.weight[u * p * out_channels + v * out_channels + c, hidden] = 1.0
        for layer in modulations:
            layer.weight.mul_(0.01)
            layer.bias.mul_(0.01)
        if fastdd_layout:  # (diffusers recomputes its sin-cos table when it loads: the ×10 patch outweighs it)
            model.pos_embed.zero_()
    return model
