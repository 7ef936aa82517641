"""Training a class-conditional DiT prior (pixel space or on VAE latents) with the IDDPM hybrid loss.

loss = MSE(ε̂, ε) + L_vb, where L_vb is the KL (in bits per dimension) between the true posterior
q(x_{t−1} | x_t, x0) and the model's p(x_{t−1} | x_t) with the mean built from a *detached* ε̂ (so L_vb only
trains the learned-range variance), as in Nichol & Dhariwal. Difference from IDDPM: at t = 0 the KL uses the
clipped posterior variance instead of a discretized decoder likelihood. Uniform t over the 1000 steps,
class dropout 0.1 (for CFG), AdamW with linear warm-up then cosine decay, EMA of the weights (what is saved and
sampled) with the usual warm-up of the decay, min(ema_decay, (1 + step) / (10 + step)), so that short runs do not
keep a large share of the random initialisation.

The digits prior shipped in the package (fastdd/assets/digits_prior.safetensors) is reproduced by

    OMP_NUM_THREADS=1 fastdd prior train --out fastdd/assets/digits_prior.safetensors

(the digits defaults of `fastdd prior train`: 16×16 pixels, DiT patch 4, hidden 96, depth 4, 4 heads, 729k
parameters, 4000 steps of batch 64, lr 2e-3, EMA 0.995, seed 0; 5.3 min on one CPU core of a shared machine;
1,500 steps gave unrecognisable digits). Bit-exactness across machines is not promised (CPU kernels and thread
counts change float rounding).

Weights are saved as safetensors in the official DiT state-dict layout with the config in the metadata,
so `load_prior` (and `fastdd.models.load_dit_checkpoint`) read them back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .data.atomic import save_safetensors_atomic
from .data.real import RealData, as_real_data
from .models.dit import DiT
from .progress import progress_bar
from .sampling.diffusion import GaussianDiffusion


def hybrid_loss(
    model: DiT, diffusion: GaussianDiffusion, x0: Tensor, labels: Tensor, generator: torch.Generator
) -> Tensor:
    """IDDPM hybrid loss of one batch. x0: [B, C, H, W] (pixels in [-1, 1] or scaled latents); labels: [B]."""
    batch, channels = x0.shape[:2]
    t = torch.randint(0, diffusion.num_train_steps, (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, t, labels)
    eps, v = output[:, :channels], output[:, channels:]
    mse = ((eps - noise) ** 2).flatten(1).mean(1)
    vb, _ = diffusion.posterior_kl_bits(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
    return (mse + vb).mean()


def train_prior(
    model: DiT,
    data: Tensor | RealData,
    labels: Tensor | None = None,
    *,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int | None = None,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> DiT:
    """Train `model` on (data [N, C, H, W], labels [N]) or a `RealData` (each step's batch read by index, so that no
    more than one batch is held); returns the EMA copy (eval mode). encode: images -> the latents the model is
    trained on (a latent prior: a VAE's scaled encoder mean); None: the images themselves.

    warmup: linear lr warm-up steps (default min(200, steps // 5))."""
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be > 0, got {steps}, {batch_size}")
    warmup = min(200, max(1, steps // 5)) if warmup is None else warmup
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    diffusion = GaussianDiffusion(num_steps=1000, num_train_steps=1000, learn_sigma=True)
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    data = as_real_data(data, labels)
    bar = progress_bar(range(steps), desc="prior", disable=not progress)
    for step in bar:
        idx = torch.randint(0, data.num_images, (batch_size,), generator=generator)
        images, batch_labels = next(data.batches(idx, batch_size))
        x0 = images.to(device)
        if encode is not None:
            with torch.no_grad():
                x0 = encode(x0)
        loss = hybrid_loss(model, diffusion, x0, batch_labels.to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def save_prior(model: DiT, path: str | Path, extra: dict | None = None) -> None:
    """Official-layout state dict + config (and any `extra` facts, e.g. the dataset) as safetensors metadata,
    written atomically."""
    metadata = {"fastdd_dit_config": json.dumps(model.config()), "fastdd_extra": json.dumps(extra or {})}
    save_safetensors_atomic(model.state_dict(), path, metadata)


def load_prior(path: str | Path, device: torch.device | str = "cpu") -> tuple[DiT, dict]:
    """(DiT in eval mode, extra metadata) from a file written by save_prior."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prior checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "fastdd_dit_config" not in metadata:
        raise ValueError(
            f"{path} has no fastdd DiT config; load official checkpoints with fastdd.models.load_dit_checkpoint"
        )
    model = DiT(**json.loads(metadata["fastdd_dit_config"]))
    from .models.dit import load_dit_checkpoint

    load_dit_checkpoint(str(path), model=model)
    return model.to(device).eval(), json.loads(metadata.get("fastdd_extra", "{}"))
