"""The reference fastdd is held to: the authors' algorithms restated from their code where it is public (files and
lines cited below, at the commits named) and from the papers where it is not, one image at a time. The
faithfulness tests compare every method's fast path against these loops, and the sampler benchmark
(`fastdd.bench.sampler`) times them as the authors' baseline.

Deliberately plain and independent of fastdd's fast paths (nothing of fastdd.ops but its plain reference's
`unflatten_params`; no fastdd.guidance or GuidedSampler):
Python loops over checkpoints, real samples and images, fp32, autograd as the authors' code records it. They
share with fastdd only the seeded noise (`fastdd.sampling.trajectory_noise`, so both sides see the same noise)
and, where a loop says so, `GaussianDiffusion`'s float64 tables. Every loop runs on its model's device.

- Official DiT sampler (SPEC "Shared backbone"): IDDPM tables in float64 (numpy), gathered per step as float32:
  linear betas over 1000 steps, respaced to N steps by `space_timesteps`, respaced betas recomputed from ᾱ at the
  kept steps; ancestral p_sample with learned-range variance, no clipping, noise on every step but the last; the
  official `forward_with_cfg` ([cond; uncond] rows, only the first half fed (twice), CFG on eps[:, :3], the
  remaining channels row-wise); one image per call; IDDPM's loop runs under no_grad. `authors_dit_sample`.
- MGD3 (SPEC "MGD3"): the official sampler with −λ·(x̂0_cond − mode)·exp(0.5·log_variance) added to the mean on
  steps i > stop_index. `authors_dit_sample(mode=...)`.
- IGD (Algorithm 1 as the IGD code's `p_sample` computes it: miaostudy/RAE-IGD `IGD/diffusion/gaussian_diffusion.py`
  at bfd8fed, whose `sample_mp.sh` equals DD_IGD's; the same loop as Lokshaw-Chau/MinimaxDiffusion
  `diffusion/gaussian_diffusion.py` at 3a9bbbd, 2–4 lines further down): the official sampler with autograd
  recording the model forward on every step (line 650: the loop's `no_grad` is commented out); on guided steps
  (low <= t <= high, lines 479–483), after the unguided sample s of both rows (line 488):
  deviation  s[0] ← s[0] − γ·∇_{x_t[0]} cos(x_t[0], m*) (lines 489–504: `used_sample0, _ = sample.chunk(2)`; the
             shadow row never receives it), m* = argmax over a Python-list FIFO memory (cos eps 1e-6);
  influence  for each checkpoint k a separate backward of (1 − cos(∇_θk CE, G_k)) / K to x_t, CE averaged over both
             decoded rows (lines 507–527), checkpoints and real gradients copied to the device every step;
             s[0] ← s[0] − k·ρ_t·g_I[0] (lines 530–532, written into row 0 at line 556),
             ρ_t = 0.0015·√(1−ᾱ_t)·RMS(eps[0]) / RMS(g_I[0]) (line 343: `out["l2"]`).
  The memory receives the final latent of row 0 after each image.
  `authors_igd_sample`.
- DAP (SPEC "DAP", the paper's Algorithm 1; no code is public): x̃ = ancestral step with CFG from two forwards;
  x ← x̃ − γ·∇_{x_t} (1/N)·Σ_n D_K(φ(x_t), φ_n), D_K written from its kernel, φ = a DiT block output computed by
  running the blocks by hand, one real sample at a time. `authors_dap_sample`.
- IGDS (SPEC "IGDS", from the paper; no code is public): ancestral DDPM from the ADM formulas with
  GaussianDiffusion's tables, two CFG forwards, x_{t−1} = x'_{t−1} + η·∇_{x_t}(B·L), L written per image.
  `authors_igds_sample`.
- D3HR (SPEC "D3HR", generation stage): DDIM (η = 0) on diffusers' "leading" schedule from a given latent,
  CFG on all eps channels from one [cond; uncond] forward (`d3hr_eps`), tables computed in the loop.
  `authors_d3hr_generate`.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .ops.reference import unflatten_params
from .sampling import GaussianDiffusion, trajectory_noise

LATENT_COS_EPS = 1e-6
RHO_CONSTANT = 0.0015


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- diffusion tables (IDDPM)
def linear_betas(num_train_steps: int = 1000) -> np.ndarray:
    """IDDPM "linear" schedule: betas from 1e-4 to 0.02 (scaled by 1000 / num_train_steps), float64."""
    scale = 1000 / num_train_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_train_steps, dtype=np.float64)


def space_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """The kept original timesteps of a single-section respacing: round(i · (T − 1) / (N − 1)), i < N."""
    stride = (num_train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return kept


class RespacedDiffusion:
    """Gaussian diffusion tables of the IDDPM `SpacedDiffusion`, float64, indexed by respaced step t."""

    def __init__(self, num_steps: int, num_train_steps: int = 1000):
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(num_train_steps))
        self.timestep_map = space_timesteps(num_train_steps, num_steps)
        betas, last = [], 1.0
        for step in self.timestep_map:
            betas.append(1.0 - base_alphas_cumprod[step] / last)
            last = base_alphas_cumprod[step]
        betas = np.array(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_steps = num_steps
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)

    @staticmethod
    def gather(table: np.ndarray, t: int, like: Tensor) -> Tensor:
        """table[t] as a float32 scalar tensor on like's device (the official `_extract_into_tensor`)."""
        return torch.from_numpy(table).to(like.device)[t].float()

    def p_mean_variance(self, model_output: Tensor, x: Tensor, t: int) -> dict[str, Tensor]:
        """Learned-range variance, eps prediction, no clipping. model_output: [B, 2C, H, W], x: [B, C, H, W]."""
        eps, var_values = model_output.split(x.shape[1], dim=1)
        min_log = self.gather(self.posterior_log_variance_clipped, t, x)
        max_log = self.gather(self.log_betas, t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (
            self.gather(self.sqrt_recip_alphas_cumprod, t, x) * x
            - self.gather(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        )
        mean = (
            self.gather(self.posterior_mean_coef1, t, x) * pred_xstart
            + self.gather(self.posterior_mean_coef2, t, x) * x
        )
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


# --------------------------------------------------------------------------- model call (official CFG)
def forward_with_cfg(
    model: nn.Module, x: Tensor, timesteps: Tensor, y: Tensor, cfg_scale: float, cfg_channels: int = 3
) -> Tensor:
    """The official DiT `forward_with_cfg`: x [2B] = [cond; uncond], only x[:B] is fed (to both halves);
    CFG on the first cfg_channels output channels (both halves get the guided value), the rest row-wise."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half], dim=0), timesteps, y)
    guided, rest = out[:, :cfg_channels], out[:, cfg_channels:]
    cond, uncond = guided.split(len(guided) // 2, dim=0)
    half_guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)


# --------------------------------------------------------------------------- official DiT sampler, MGD3
def authors_dit_sample(
    model: nn.Module,
    label: int,
    image_index: int,
    latent_shape: Sequence[int],
    *,
    num_steps: int = 50,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    seed: int = 0,
    compat: bool = True,
    mode: Tensor | None = None,
    lam: float = 0.1,
    stop_index: int = 25,
) -> Tensor:
    """One image by the official DiT sampler (under no_grad, as IDDPM's loop); with `mode`, MGD3's loop.

    compat=True: the official 2-row loop (forward_with_cfg, CFG on eps[:, :3]), noise row r of the image's
    trajectory noise on sampler row r. compat=False: one row, CFG on all 4 eps channels in one [cond; uncond]
    forward. mode: [C, H, W] MGD3 target: on steps i > stop_index the mode term uses the conditional row's x̂0
    and is added to the mean of every row, each with its own σ (the authors' broadcast).
    -> final latent [C, H, W] (row 0).
    """
    device = model_device(model)
    tables = RespacedDiffusion(num_steps)
    rows = 2 if compat else 1
    noise = trajectory_noise(seed, label, image_index, latent_shape, num_steps, device, rows=rows)
    x = noise.initial[None].repeat(rows, 1, 1, 1)
    y = torch.tensor([label, null_class], device=device)
    with torch.no_grad():
        for i in range(num_steps - 1, -1, -1):
            t = torch.tensor([tables.timestep_map[i]] * 2, device=device)
            if compat:
                out = forward_with_cfg(model, x, t, y, cfg_scale)
            else:
                both = model(torch.cat([x, x]), t, y)
                cond, uncond = both[:1], both[1:]
                channels = x.shape[1]
                eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
                out = torch.cat([eps, cond[:, channels:]], dim=1)
            p = tables.p_mean_variance(out, x, i)
            mean = p["mean"]
            if mode is not None and i > stop_index:
                mean = mean - lam * (p["pred_xstart"][:1] - mode) * torch.exp(0.5 * p["log_variance"])
            x = mean + (torch.exp(0.5 * p["log_variance"]) * noise.steps[i] if i > 0 else 0)
    return x[0]


# --------------------------------------------------------------------------- IGD: the two guidances
def deviation_gradient(x_t: Tensor, memory: list[Tensor]) -> Tensor:
    """∇_{x_t} cos(x_t[0], m*), m* = argmax_m cos(x_t[0], m) over the memory list ([1, C, H, W] each).

    x_t: [2, C, H, W] leaf with requires_grad -> [1, C, H, W] (the caller subtracts it from row 0 only).
    """
    query = x_t[0].flatten()
    similarities = torch.stack([F.cosine_similarity(query, m.flatten(), dim=0, eps=LATENT_COS_EPS) for m in memory])
    best = int(similarities.argmax())
    (grad,) = torch.autograd.grad(similarities[best], x_t)
    return grad[0:1]


def influence_gradient(
    x_t: Tensor,
    pred_xstart: Tensor,
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    class_real_grads: Tensor,
    label: int,
) -> Tensor:
    """∇_{x_t} Σ_k (1 − cos(∇_θk mean-CE(surrogate(D(x̂0)), label), G_k)) / K, one backward per checkpoint.

    x_t: [2, C, H, W] leaf; pred_xstart: [2, C, H, W] recorded from x_t; flat_params, class_real_grads: [K, P]
    (copied to x_t's device on every call, as the authors do). -> [2, C, H, W].
    """
    images = decode(pred_xstart)
    labels = torch.full((images.shape[0],), label, device=images.device, dtype=torch.long)
    num_checkpoints = flat_params.shape[0]
    total = torch.zeros_like(x_t)
    for index in range(num_checkpoints):
        theta = flat_params[index].to(x_t.device).detach().clone().requires_grad_(True)
        real_grad = class_real_grads[index].to(x_t.device)
        logits = functional_call(surrogate, unflatten_params(surrogate, theta), (images,))
        ce = F.cross_entropy(logits, labels)
        (grad_theta,) = torch.autograd.grad(ce, theta, create_graph=True)
        loss = (1 - F.cosine_similarity(grad_theta, real_grad, dim=0)) / num_checkpoints
        (grad_x,) = torch.autograd.grad(loss, x_t, retain_graph=True)
        total = total + grad_x
    return total


def rms(t: Tensor) -> Tensor:
    return t.square().mean().sqrt()


# --------------------------------------------------------------------------- IGD: Algorithm 1
def authors_igd_sample(
    model: nn.Module,
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    real_grads: Tensor,
    classes: list[int],
    ipc: int,
    num_steps: int,
    noise_fn: Callable[[int, int], tuple[Tensor, Tensor]],
    *,
    k: float = 5.0,
    gamma: float = 120.0,
    low: int = 30,
    high: int = 45,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    cfg_channels: int = 3,
    memory_size: int = 64,
    housekeeping: bool = False,
) -> dict[tuple[int, int], Tensor]:
    """Generate ipc images per class, classes one after another, one image per model call.

    model: DiT in eval mode, forward(x, t, y) -> [B, 2C, H, W]; decode: latents [B, C, H, W] -> surrogate
    input images; surrogate: classifier whose parameters are replaced by flat_params[k] ([K, P]);
    real_grads: [num_classes, K, P] (G_k per class); noise_fn(class, i) -> (initial latent [C, H, W],
    step noise [num_steps (or num_steps − 1), 2, C, H, W]) where step noise[j] is added at loop step j
    (j = 0 is the noisiest step; the last step adds none), row 0 to the conditional row, row 1 to the shadow row.
    housekeeping: also run gc.collect() / torch.cuda.empty_cache() after every step, as the authors' loop does.
    -> {(class, i): final latent [C, H, W]} (row 0; the latent the authors decode and keep in memory).
    """
    diffusion = RespacedDiffusion(num_steps)
    results: dict[tuple[int, int], Tensor] = {}
    for label in classes:
        memory: list[Tensor] = []
        for image_index in range(ipc):
            initial, step_noise = noise_fn(label, image_index)
            x = torch.stack([initial, initial])
            y = torch.tensor([label, null_class], device=x.device)
            for loop_step, t in enumerate(reversed(range(num_steps))):
                x = p_sample_igd(
                    model,
                    diffusion,
                    x,
                    t,
                    y,
                    step_noise[loop_step] if t > 0 else None,
                    guided=low <= t <= high,
                    memory=memory,
                    decode=decode,
                    surrogate=surrogate,
                    flat_params=flat_params,
                    class_real_grads=real_grads[label],
                    label=label,
                    k=k,
                    gamma=gamma,
                    cfg_scale=cfg_scale,
                    cfg_channels=cfg_channels,
                )
                if housekeeping:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            final = x[0:1].detach()
            results[(label, image_index)] = final[0]
            memory.append(final)
            while len(memory) > memory_size:
                memory.pop(0)
    return results


def p_sample_igd(
    model: nn.Module,
    diffusion: RespacedDiffusion,
    x: Tensor,
    t: int,
    y: Tensor,
    noise: Tensor | None,
    *,
    guided: bool,
    memory: list[Tensor],
    decode: Callable[[Tensor], Tensor],
    surrogate: nn.Module,
    flat_params: Tensor,
    class_real_grads: Tensor,
    label: int,
    k: float,
    gamma: float,
    cfg_scale: float,
    cfg_channels: int,
) -> Tensor:
    """One ancestral step x_t -> x_{t−1} of the [cond; uncond] pair x: [2, C, H, W], IGD-guided when `guided`."""
    x_t = x.detach().requires_grad_(True)
    timesteps = torch.full((x.shape[0],), diffusion.timestep_map[t], device=x.device, dtype=torch.long)
    with torch.enable_grad():
        model_output = forward_with_cfg(model, x_t, timesteps, y, cfg_scale, cfg_channels)
        out = diffusion.p_mean_variance(model_output, x_t, t)
        sample = out["mean"]
        if noise is not None:
            sample = sample + torch.exp(0.5 * out["log_variance"]) * noise
        sample = sample.detach()
        if not guided:
            return sample
        if memory:  # row 0 only: used_sample0, _ = sample.chunk(2) (lines 489-502)
            sample = torch.cat([sample[:1] - gamma * deviation_gradient(x_t, memory), sample[1:]])
        grad = influence_gradient(x_t, out["pred_xstart"], decode, surrogate, flat_params, class_real_grads, label)
    alpha_bar = float(diffusion.alphas_cumprod[t])
    eps_row0, grad_row0 = out["eps"][0].detach(), grad[0]
    rho = RHO_CONSTANT * (1.0 - alpha_bar) ** 0.5 * rms(eps_row0) / rms(grad_row0)
    update = torch.zeros_like(sample)
    update[0] = k * rho * grad_row0
    return sample - update


# --------------------------------------------------------------------------- DAP
def dap_block_features(model: nn.Module, x: Tensor, timestep: int, label: int, block_index: int) -> Tensor:
    """φ: output of block `block_index` for one latent x [C, H, W], running the DiT's blocks by hand -> [T·hidden]."""
    t = torch.tensor([timestep], device=x.device)
    y = torch.tensor([label], device=x.device)
    c = model.t_embedder(t) + model.y_embedder(y)
    tokens = model.x_embedder(x[None]) + model.pos_embed
    for block in list(model.blocks)[: block_index + 1]:
        tokens = block(tokens, c)
    return tokens.flatten()


def dap_kernel(a: Tensor, b: Tensor, kernel: str, dim: int) -> Tensor:
    """K(a, b): "linear" a·b, "rbf" exp(−‖a − b‖² / 2D) (σ = √D), "poly" (a·b / D + 1)²."""
    if kernel == "linear":
        return torch.dot(a, b)
    if kernel == "rbf":
        return torch.exp(-((a - b) ** 2).sum() / (2 * dim))
    return (torch.dot(a, b) / dim + 1.0) ** 2


def dap_energy(feature: Tensor, real_list: list[Tensor], kernel: str) -> Tensor:
    """(1/N) Σ_n D_K(feature, real_n), D_K = √(K(x,x) + K(y,y) − 2K(x,y)), one real sample at a time."""
    dim = feature.shape[0]
    total = 0.0
    for real in real_list:
        squared = dap_kernel(feature, feature, kernel, dim) + dap_kernel(real, real, kernel, dim)
        squared = squared - 2 * dap_kernel(feature, real, kernel, dim)
        total = total + torch.sqrt(squared)
    return total / len(real_list)


def dap_real_features(
    model: nn.Module,
    latents: Tensor,
    labels: Tensor,
    label: int,
    block_index: int,
    t_mode: str = "zero",
    *,
    diffusion: GaussianDiffusion | None = None,
    index: int | None = None,
    seed: int = 0,
    storage: torch.dtype = torch.float32,
) -> list[Tensor]:
    """φ of the real latents of class `label` (latents [N, C, H, W], labels [N]), one at a time, stored in
    `storage` and returned as float32. t_mode "zero": at timestep 0; "noised": noised to respaced `index` of
    `diffusion` with noise from torch.Generator().manual_seed(seed + label) on the CPU."""
    class_latents = latents[labels == label]
    if t_mode == "noised":
        generator = torch.Generator().manual_seed(seed + label)
        noise = torch.randn(class_latents.shape, generator=generator).to(class_latents.device)
        alpha_bar = diffusion.alpha_bar(index)
        class_latents = math.sqrt(alpha_bar) * class_latents + math.sqrt(1 - alpha_bar) * noise
        timestep = diffusion.timestep_list[index]
    else:
        timestep = 0
    with torch.no_grad():
        return [dap_block_features(model, z, timestep, label, block_index).to(storage).float() for z in class_latents]


def authors_dap_sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    label: int,
    image_index: int,
    latents: Tensor,
    labels: Tensor,
    *,
    block_index: int,
    kernel: str = "linear",
    gamma: float = 1.0,
    t_mode: str = "zero",
    seed: int = 0,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    real_features: list[Tensor] | None = None,
) -> Tensor:
    """One image by DAP's loop: x̃ = ancestral DDPM step with CFG (two forwards, CFG on all eps channels);
    x ← x̃ − γ·∇_{x_t} energy(φ(x_t)) on every step. latents [N, C, H, W], labels [N]: the real latents;
    real_features: the class's t = 0 features (`dap_real_features`) when already computed (a real run computes
    them once per class). Noise: trajectory_noise(seed, label, image_index). -> final latent [C, H, W]."""
    device = model_device(model)
    noise = trajectory_noise(seed, label, image_index, latents.shape[1:], diffusion.num_steps, device)
    x = noise.initial
    channels = x.shape[0]
    if t_mode == "zero" and real_features is None:
        real_features = dap_real_features(model, latents, labels, label, block_index, "zero")
    for i in range(diffusion.num_steps - 1, -1, -1):
        timestep = diffusion.timestep_list[i]
        t = torch.tensor([timestep], device=device)
        with torch.no_grad():
            cond = model(x[None], t, torch.tensor([label], device=device))
            uncond = model(x[None], t, torch.tensor([null_class], device=device))
            eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
            out = diffusion.p_mean_variance(torch.cat([eps, cond[:, channels:]], dim=1), x[None], i)
            sample = out["mean"][0]
            if i > 0:
                sample = sample + torch.exp(0.5 * out["log_variance"][0]) * noise.steps[i, 0]
        if t_mode == "zero":
            reals = real_features
        else:
            reals = dap_real_features(
                model, latents, labels, label, block_index, t_mode, diffusion=diffusion, index=i, seed=seed
            )
        x_t = x.clone().requires_grad_(True)
        with torch.enable_grad():
            energy = dap_energy(dap_block_features(model, x_t, timestep, label, block_index), reals, kernel)
            (grad,) = torch.autograd.grad(energy, x_t)
        x = sample - gamma * grad
    return x


# --------------------------------------------------------------------------- IGDS
def igds_loss(
    latents: Tensor, labels: Tensor, decode: Callable[[Tensor], Tensor], estimator: nn.Module, beta: float
) -> Tensor:
    """L = E log P(ŷ=y|x) + H(Ŷ) + β E KL(σ(x̂) ‖ Q_y), one image at a time (H over the batch-mean prediction).

    latents: [B, C, H, W]; labels: [B]; estimator: an InformationEstimator (encoder, classifier, tau, class_means).
    """
    log_likelihoods, predictions, kls = [], [], []
    for latent, label in zip(latents, labels.tolist()):
        image = decode(latent[None])
        features = estimator.encoder(image)[0]
        x_hat = features / features.pow(2).sum().sqrt()
        logits = estimator.classifier(x_hat)
        probabilities = logits.exp() / logits.exp().sum()
        log_likelihoods.append(probabilities[label].log())
        predictions.append(probabilities)
        sigma = (x_hat / estimator.tau).exp() / (x_hat / estimator.tau).exp().sum()
        q = estimator.class_means[label]
        kls.append((sigma * (sigma / q).log()).sum())
    marginal = torch.stack(predictions).mean(0)
    entropy = -(marginal * marginal.log()).sum()
    return torch.stack(log_likelihoods).mean() + entropy + beta * torch.stack(kls).mean()


def authors_igds_sample(
    dit: nn.Module,
    decode: Callable[[Tensor], Tensor],
    estimator: nn.Module,
    image_ids: Sequence[tuple[int, int, int]],
    eta: float,
    beta: float,
    latent_shape: Sequence[int],
    *,
    source: str = "xstart",
    num_steps: int = 50,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
    perturbation: float = 0.0,
) -> Tensor:
    """Ancestral DDPM (learned-range variance, CFG on all eps channels, two forwards) with IGDS at every step,
    for the images image_ids [(class, image index, seed)] together (the benchmark passes one: batch 1).
    source: the estimator sees the decoded x̂0 ("xstart") or the ancestral sample x'_{t−1} ("sample").
    perturbation: x_T is multiplied by (1 + perturbation · z), z ~ N(0, I) (a conditioning check).
    -> final latents [B, C, H, W]."""
    device = model_device(dit)
    diffusion = GaussianDiffusion(num_steps)
    noises = [trajectory_noise(seed, c, i, latent_shape, num_steps, device) for c, i, seed in image_ids]
    x = torch.stack([n.initial for n in noises])
    x = x * (1 + perturbation * torch.randn(x.shape, generator=torch.Generator().manual_seed(100)).to(device))
    y = torch.tensor([c for c, _, _ in image_ids], device=device)
    batch, channels = x.shape[0], x.shape[1]
    for i in reversed(range(num_steps)):
        ab, ab_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        beta_i = 1 - ab / ab_prev
        log_posterior = float(diffusion.posterior_log_variance_clipped[i])
        with torch.enable_grad():
            x_t = x.detach().requires_grad_(True)
            t = torch.full((batch,), diffusion.timestep_list[i], device=device)
            cond, uncond = dit(x_t, t, y), dit(x_t, t, torch.full_like(y, null_class))
            eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
            fraction = (cond[:, channels:] + 1) / 2
            log_variance = fraction * math.log(beta_i) + (1 - fraction) * log_posterior
            x0 = math.sqrt(1 / ab) * x_t - math.sqrt(1 / ab - 1) * eps
            mean = beta_i * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta_i) / (1 - ab) * x_t
            noise = torch.stack([n.steps[i, 0] for n in noises]) if i > 0 else torch.zeros_like(x)
            sample = mean + torch.exp(0.5 * log_variance) * noise
            guided_latents = x0 if source == "xstart" else sample
            loss = batch * igds_loss(guided_latents, y, decode, estimator, beta)
            (gradient,) = torch.autograd.grad(loss, x_t)
        x = sample.detach() + eta * gradient
    return x


# --------------------------------------------------------------------------- D3HR
def d3hr_eps(
    model: nn.Module, x: Tensor, timestep: int, label: int, *, cfg_scale: float = 4.0, null_class: int = 1000
) -> Tensor:
    """diffusers' DiTPipeline CFG: one forward of [x; x] with labels [label; null_class], CFG on all eps channels
    (the variance channels are dropped). x: [1, C, H, W] -> eps [1, C, H, W]."""
    timesteps = torch.tensor([timestep] * 2, device=x.device)
    out = model(torch.cat([x, x]), timesteps, torch.tensor([label, null_class], device=x.device))
    channels = x.shape[1]
    cond, uncond = out[:1, :channels], out[1:, :channels]
    return uncond + cfg_scale * (cond - uncond)


def authors_d3hr_generate(
    model: nn.Module,
    x_start: Tensor,
    label: int,
    start_index: int = 31,
    *,
    num_steps: int = 50,
    cfg_scale: float = 4.0,
    null_class: int = 1000,
) -> Tensor:
    """D3HR's generation: DDIM (η = 0) from respaced index start_index down to 0 on diffusers' "leading" schedule
    (timestep k · (1000 // num_steps) at index k, ᾱ from the linear betas computed here), one image, under no_grad.

    Per step k: eps = `d3hr_eps` at timestep k·stride; x̂0 = (x − √(1−ᾱ_k)·eps) / √ᾱ_k;
    x ← √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·eps with ᾱ_prev = ᾱ at index k − 1, and 1 after index 0 (diffusers'
    set_alpha_to_one, the ᾱ fastdd uses). D3HR's own update takes ᾱ at max(1, t − stride) as the previous ᾱ
    (its last two steps end at ᾱ_1): not reproduced here; the work per step is the same. fp32 (the authors run
    the pipeline in fp16). x_start: [C, H, W] latent at start_index -> final latent [C, H, W].
    """
    alphas_cumprod = np.cumprod(1.0 - linear_betas())
    stride = len(alphas_cumprod) // num_steps
    x = x_start[None]
    with torch.no_grad():
        for k in range(start_index, -1, -1):
            eps = d3hr_eps(model, x, stride * k, label, cfg_scale=cfg_scale, null_class=null_class)
            alpha_bar = alphas_cumprod[stride * k]
            alpha_bar_prev = alphas_cumprod[stride * (k - 1)] if k > 0 else 1.0
            pred_xstart = (x - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
            x = math.sqrt(alpha_bar_prev) * pred_xstart + math.sqrt(1 - alpha_bar_prev) * eps
    return x[0]


# --------------------------------------------------------------------------- IGD: Algorithm 2, the authors' script
def authors_select_checkpoints(
    model: nn.Module,
    snapshots: Tensor,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    seed: int,
    threshold: float = 0.7,
    grad_ipc: int = 80,
) -> list[int]:
    """DD_IGD's `test_ckpts_grad_sim.py` (at e0887b3): the checkpoints its walk prints.

    Restated: the dataset keeps each class's first 500 images (ImageFolder(ipc=500), lines 160-162); one shuffled
    DataLoader (batch 500, drop_last, lines 167-174) is read once before any checkpoint: per batch, each class not
    yet holding more than grad_ipc images takes the batch's images of that class, until every class holds more
    (lines 191-209), then each class keeps its first grad_ipc (line 213); a class's gradient at a checkpoint is the
    mean-CE gradient of those images in one chunk (gap = 100, lines 219-220, 264-278); the similarity of two
    checkpoints is the mean over classes of Σ pg·rg / (‖pg‖‖rg‖ + 1e-6) (lines 237-238, 251); checkpoint 0 is the
    first reference and each checkpoint below the threshold (0.7, line 227) becomes the next (lines 224-247). The
    loader's generator is seeded with `seed` (theirs: the global one, --seed 1); with fewer than 500 images the batch
    holds them all (their loader would yield nothing).

    model: the surrogate (its parameters are replaced by each snapshot); snapshots: [E, P]; images: [N, C, H, W];
    labels: [N]. -> the kept snapshot indices.
    """
    from torch.utils.data import DataLoader, TensorDataset

    keep = torch.cat([torch.nonzero(labels == c).flatten()[:500] for c in range(num_classes)])
    loader = DataLoader(
        TensorDataset(images[keep], labels[keep]),
        batch_size=min(500, len(keep)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    grad_memory: dict[int, list[Tensor]] = {c: [] for c in range(num_classes)}
    for x, y in loader:
        for c in sorted(set(y.tolist())):
            if len(grad_memory[c]) > grad_ipc:
                continue
            grad_memory[c].extend(x[y == c].split(1))
        if min(len(v) for v in grad_memory.values()) > grad_ipc:
            break
    for c in grad_memory:
        grad_memory[c] = grad_memory[c][:grad_ipc]

    def class_grads(flat: Tensor) -> list[Tensor]:
        theta = flat.detach().clone().requires_grad_(True)
        out = []
        for c in range(num_classes):
            batch = torch.cat(grad_memory[c])
            logits = functional_call(model, unflatten_params(model, theta), (batch,))
            loss = F.cross_entropy(logits, torch.full((len(batch),), c))
            out.append(torch.autograd.grad(loss, theta)[0])
        return out

    def similarity(current: list[Tensor], previous: list[Tensor]) -> float:
        values = [
            float(torch.sum(pg * rg) / (torch.norm(pg) * torch.norm(rg) + 0.000001))
            for pg, rg in zip(current, previous)
        ]
        return sum(values) / len(values)

    kept, previous = [0], class_grads(snapshots[0])
    for index in range(1, len(snapshots)):
        current = class_grads(snapshots[index])
        if similarity(current, previous) < threshold:
            kept.append(index)
            previous = current
    return kept
