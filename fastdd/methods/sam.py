"""`--method sam`: SAM's run wiring (the math is in `fastdd.guidance.sam`): fine-tune a DiffFit copy of the prior with
the memory losses (cached in the state folder), then sample its EMA weights with the run's sampler settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..data.atomic import computed_once, save_safetensors_atomic
from ..data.latents import EncodedBatches
from ..guidance.sam import LAMBDA_GEN, LAMBDA_REAL, POLICIES, finetune_sam, to_difffit
from ..models.dit import DiT
from ..models.vae import PixelCodec
from ..options import documented, option
from ..sampling import GaussianDiffusion, GuidedSampler
from .base import (
    Cost,
    Method,
    MethodSetup,
    Models,
    RealData,
    RunSpec,
    cache_path,
    check,
    check_pool,
    default_sample,
    read_cache,
)

SAM_EMA_PRESETS = {"digits": 0.99}  # digits: ~1.4k fine-tuning steps, so 0.9999 would keep ~87% of the prior


@documented
@dataclass(frozen=True)
class SAMOptions:
    """SAM (ICIP 2025): DiffFit fine-tuning with self-adaptive memories, then sampling (Minimax: policy fifo)."""

    epochs: int = option(8, "fine-tuning epochs over the real latents (SAM paper: 8)", flag="--sam-epochs")
    batch: int = option(8, "fine-tuning batch size (SAM paper: 8)", flag="--sam-batch")
    lr: float = option(1e-3, "AdamW learning rate (SAM paper: 1e-3, weight decay 0)", flag="--sam-lr")
    lambda_real: float = option(LAMBDA_REAL, "λ_r of L_real (SAM paper: 0.002)", flag="--sam-lambda-real")
    lambda_gen: float = option(LAMBDA_GEN, "λ_g of L_gen (SAM paper: 0.008)", flag="--sam-lambda-gen")
    capacity: int = option(64, "memory capacity per class (SAM paper: 64)", flag="--sam-capacity")
    policy: str = option(
        "most_similar", "memory pop rule: most_similar (SAM) or fifo (Minimax)", flag="--sam-policy", choices=POLICIES
    )
    ema_decay: float | None = option(
        None,
        "EMA decay of the DiffFit weights that are sampled (default 0.9999 as the authors; digits: 0.99)",
        flag="--sam-ema-decay",
    )


def build(options: SAMOptions, spec: RunSpec, models: Models, data: RealData) -> MethodSetup:
    """A sampling override: the run's sampler on the fine-tuned EMA weights."""
    prior = models.prior
    for flag, value in (
        ("--sam-epochs", options.epochs),
        ("--sam-batch", options.batch),
        ("--sam-capacity", options.capacity),
    ):
        check(value > 0, f"{flag} must be > 0, got {value}")
    check(options.lr > 0, f"--sam-lr must be > 0, got {options.lr}")
    check(options.lambda_real >= 0, f"--sam-lambda-real must be >= 0, got {options.lambda_real}")
    check(options.lambda_gen >= 0, f"--sam-lambda-gen must be >= 0, got {options.lambda_gen}")
    ema_decay = SAM_EMA_PRESETS.get(data.dataset, 0.9999) if options.ema_decay is None else options.ema_decay
    check(0 <= ema_decay <= 1, f"--sam-ema-decay must be in [0, 1], got {ema_decay}")
    check(isinstance(prior, DiT) and not prior.diffit, "--model: sam fine-tunes a fastdd DiT without DiffFit gammas")
    total = sum(data.class_counts())
    check(options.batch <= total, f"--sam-batch {options.batch} is larger than the {total} real images")
    check_pool(spec, data, 1, "SAM", ipc_bound=False)
    params = {
        "epochs": options.epochs,
        "batch_size": options.batch,
        "lr": options.lr,
        "lambda_real": options.lambda_real,
        "lambda_gen": options.lambda_gen,
        "capacity": options.capacity,
        "policy": options.policy,
        "ema_decay": ema_decay,
        "fine_tune_seed": spec.seed,
        "trained": "DiffFit subset (bias, norm, gamma, class embedding) of a copy of the prior",
    }
    steps = options.epochs * math.ceil(total / options.batch)
    cache = cache_path(spec, models, data, "sam_difffit", params)

    def fine_tune_seconds(probe, classes) -> float:
        """A step: reading and encoding its batch of real images, a forward and backward, and the loss terms, memory
        updates, AdamW and EMA on top (×2.5 the timed pieces: measured on digits; on a small folder the run's encode
        calls took 3× the probe's, interleaved with training)."""
        batch = options.batch
        return steps * 2.5 * (batch * probe.image_read(batch) + probe.encode(batch) + probe.model_train_step(batch))

    cost = Cost(state=fine_tune_seconds)
    if spec.dry_run:
        if cache.is_file():  # fine-tuned already: only sampling is left
            cost.state = None
        return MethodSetup(params=params, cost=cost)
    finetuned = to_difffit(prior)
    with computed_once(cache):  # torchrun ranks: one fine-tunes, the others read its file
        weights = read_cache(cache, lambda path: load_file(str(path)))
        if weights is not None:
            finetuned.load_state_dict(weights)
        else:
            encode = None if isinstance(models.codec, PixelCodec) else partial(models.codec.encode, sample=False)
            batches = EncodedBatches(data, models.device, encode, torch.as_tensor(models.class_labels))
            schedule = models.description.get("schedule", {})  # a diffusers pipeline's training schedule, if any
            train = {k: v for k, v in schedule.items() if k in ("num_train_steps", "train_betas")}
            diffusion = GaussianDiffusion(train.get("num_train_steps", 1000), learn_sigma=prior.learn_sigma, **train)
            result = finetune_sam(
                finetuned,
                diffusion,
                batches,
                epochs=options.epochs,
                batch_size=options.batch,
                lr=options.lr,
                lambda_real=options.lambda_real,
                lambda_gen=options.lambda_gen,
                capacity=options.capacity,
                policy=options.policy,
                ema_decay=ema_decay,
                compat=spec.compat,
                seed=spec.seed,
                progress=spec.progress,
            )
            finetuned = result.ema_model()
            save_safetensors_atomic(finetuned.state_dict(), cache)
    finetuned = finetuned.to(models.device).eval().requires_grad_(False)
    params["weights"] = str(cache)
    samplers: dict[int, GuidedSampler] = {}

    def sample(sampler, labels, ids, latent_shape, device) -> Tensor:
        if id(sampler) not in samplers:
            samplers[id(sampler)] = sampler.replace(model=finetuned)
        return default_sample(spec, samplers[id(sampler)], labels, ids, latent_shape, device)

    return MethodSetup(params=params, sample=sample, cost=cost)


METHOD = Method(
    "sam",
    SAMOptions,
    build,
    needs_data=True,
    help="SAM (ICIP 2025): DiffFit fine-tuning with self-adaptive memories, then sampling (Minimax: --sam-policy fifo)",
)
