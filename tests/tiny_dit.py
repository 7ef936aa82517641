"""A tiny random DiT that behaves like a denoiser, for full-run sampler tests of the guidance methods.

A random DiT predicts eps unrelated to x_t, so a 50-step trajectory inflates x by ~1/√ᾱ; adding the exact
denoiser of N(0, I) data, √(1 − ᾱ_t)·x_t, to its eps channels keeps the trajectory O(1), while the DiT part
(class-, t- and x-dependent, scaled by 0.3) keeps CFG and the learned variance channels non-trivial.
"""
from __future__ import annotations

import numpy as np
import torch

from fastdd.models import DiT

_TRAIN_ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))).float()


class DenoisingDiT(DiT):
    def forward(self, x, t, y):
        out = super().forward(x, t, y)
        channels = self.in_channels
        alpha_bar = _TRAIN_ALPHAS_CUMPROD.to(x.device)[t.long()].view(-1, 1, 1, 1)
        eps = (1 - alpha_bar).sqrt() * x + 0.3 * out[:, :channels]
        return torch.cat([eps, out[:, channels:]], dim=1)


def tiny_denoising_dit(num_classes: int, input_size: int = 8, seed: int = 0) -> DenoisingDiT:
    """DiT (patch 2, hidden 32, depth 2, learned sigma) with its zero-initialised layers randomised, eval, frozen."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    dit = DenoisingDiT(input_size=input_size, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_classes=num_classes, learn_sigma=True)  # fmt: skip
    zero_initialised = [block.adaLN_modulation[1] for block in dit.blocks]
    zero_initialised += [dit.final_layer.adaLN_modulation[1], dit.final_layer.linear]
    with torch.no_grad():
        for layer in zero_initialised:
            layer.weight.normal_(0, 0.1)
            layer.bias.normal_(0, 0.1)
    torch.random.set_rng_state(state)
    return dit.eval().requires_grad_(False)
