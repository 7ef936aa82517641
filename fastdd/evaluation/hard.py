"""IGD's hard-label evaluation protocol (the IGD paper's appendix and the authors' evaluation script): AdamW lr 1e-3,
weight decay 0.01, MultiStepLR at 2/3 and 5/6 of the epochs (×0.2), batch 64, CutMix (β = 1, p = 1) on every batch,
epochs by IPC (1 → 3000, ≤10 → 2000, ≤50 → 1500, ≤200 → 1000, else 500), best top-1 on the real validation split
(checked every epochs/20 and at the end), mean ± std over seeds.

Two engines compute it: `train_and_evaluate` trains one seed's network at a time; `train_ensemble` trains every
seed's network together as one batched ensemble (`torch.func.stack_module_state` + `vmap`: one forward and backward
per step for all seeds, each with its own initialisation, batch order and CutMix draws, the same random numbers as
the one-at-a-time engine). They compute the same protocol; float rounding differs (batched convolutions), so the
accuracies agree within seed noise, not bit for bit. The ensemble needs the training set in memory and networks
without BatchNorm running statistics; otherwise seeds run one after another.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from .common import EpochClock, EvalResult, ImageSet, epoch_batches, top1

PROTOCOL = {
    "name": "hard",
    "source": "IGD (Chen et al., ICLR 2025) evaluation protocol",
    "optimizer": "AdamW lr 1e-3, weight decay 0.01",
    "schedule": "MultiStepLR at 2/3 and 5/6 of the epochs, gamma 0.2",
    "batch_size": 64,
    "augmentation": "CutMix beta 1, probability 1",
    "labels": "the distilled images' classes (cross-entropy, mixed by CutMix's area)",
    "epochs": "by IPC: 1 -> 3000, <=10 -> 2000, <=50 -> 1500, <=200 -> 1000, else 500",
    "metric": "best top-1 on the validation set, checked every epochs/20 and at the end",
}


def epochs_for_ipc(ipc: int) -> int:
    if ipc <= 1:
        return 3000
    if ipc <= 10:
        return 2000
    if ipc <= 50:
        return 1500
    if ipc <= 200:
        return 1000
    return 500


def cutmix(images: Tensor, labels: Tensor, rng: np.random.Generator, beta: float = 1.0):
    """CutMix with λ ~ Beta(β, β), a random box and a random partner permutation.

    images: [B, C, H, W] -> (mixed images, labels, partner labels, λ = the kept area fraction).
    """
    batch, _, height, width = images.shape
    lam = rng.beta(beta, beta)
    perm = torch.as_tensor(rng.permutation(batch), device=images.device)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return mixed, labels, labels[perm], lam


def _schedule(optimizer, epochs: int):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs * 2 // 3, epochs * 5 // 6], gamma=0.2)


def train_and_evaluate(
    make_model,
    train: ImageSet,
    val: ImageSet,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    cutmix_beta: float = 1.0,
    eval_every: int | None = None,
    device: torch.device | str = "cpu",
    workers: int = 0,
    bar=None,
    clock: EpochClock | None = None,
) -> EvalResult:
    """Train make_model() from seed on `train`; best and final top-1 on `val`. bar: advanced by one per epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = _schedule(optimizer, epochs)
    eval_every = eval_every or max(1, epochs // 20)
    best = 0.0

    def accuracy() -> float:
        model.eval()
        return float(top1(lambda x: model(x)[None], val, device, workers)[0])

    for epoch in range(epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(len(train.labels)))
        for images, labels in train.batches(order, batch_size, workers):
            images, labels_a, labels_b, lam = cutmix(images.to(device), labels.to(device), rng, cutmix_beta)
            logits = model(images)
            loss = lam * F.cross_entropy(logits, labels_a) + (1 - lam) * F.cross_entropy(logits, labels_b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            best = max(best, accuracy())
        if bar is not None:
            bar.update(1)
        if clock is not None:
            clock.tick(epoch + 1)
    final = accuracy()
    return EvalResult(best_top1=max(best, final), final_top1=final, epochs=epochs)


def train_ensemble(
    make_model,
    train: ImageSet,
    val: ImageSet,
    *,
    seeds: list[int],
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    cutmix_beta: float = 1.0,
    eval_every: int | None = None,
    device: torch.device | str = "cpu",
    bar=None,
    clock: EpochClock | None = None,
) -> list[EvalResult]:
    """`train_and_evaluate` for every seed at once: the networks' parameters stacked, one vmapped forward and one
    backward of the summed losses per step (each network's gradient is its own loss's). train must be in memory.
    bar: advanced by one per epoch of all seeds."""
    device = torch.device(device)
    networks = []
    for seed in seeds:
        torch.manual_seed(seed)
        networks.append(make_model().to(device))
    params, buffers = stack_module_state(networks)
    base = copy.deepcopy(networks[0]).to("meta")
    rngs = [np.random.default_rng(seed) for seed in seeds]
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    scheduler = _schedule(optimizer, epochs)
    eval_every = eval_every or max(1, epochs // 20)
    images_all, labels_all = train.dataset.images.to(device), train.labels.to(device)

    def forward(stacked: Tensor) -> Tensor:  # [S, b, C, H, W] -> [S, b, classes]
        return torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, stacked)

    def accuracy() -> Tensor:
        for network in networks:
            network.eval()
        base.eval()
        return top1(lambda x: forward(x.expand(len(seeds), *x.shape)), val, device)

    best = torch.zeros(len(seeds), dtype=torch.float64)
    for epoch in range(epochs):
        base.train()
        orders = [torch.as_tensor(rng.permutation(len(labels_all)), device=device) for rng in rngs]
        for step_rows in zip(*(epoch_batches(order, batch_size) for order in orders)):
            mixed, first, second, keep = [], [], [], []
            for rows, rng in zip(step_rows, rngs):
                images, labels_a, labels_b, lam = cutmix(images_all[rows], labels_all[rows], rng, cutmix_beta)
                mixed.append(images)
                first.append(labels_a)
                second.append(labels_b)
                keep.append(lam)
            logits = forward(torch.stack(mixed))
            lam = torch.tensor(keep, device=device, dtype=logits.dtype)
            classes = logits.shape[-1]
            ce_a = F.cross_entropy(logits.reshape(-1, classes), torch.cat(first), reduction="none").view(len(seeds), -1)
            ce_b = F.cross_entropy(logits.reshape(-1, classes), torch.cat(second), reduction="none").view(
                len(seeds), -1
            )
            loss = (lam * ce_a.mean(1) + (1 - lam) * ce_b.mean(1)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            best = torch.maximum(best, accuracy())
        if bar is not None:
            bar.update(len(seeds))
        if clock is not None:
            clock.tick(epoch + 1)
    final = accuracy()
    best = torch.maximum(best, final)
    return [EvalResult(float(b), float(f), epochs) for b, f in zip(best, final)]


def ensemble_ready(make_model, train: ImageSet) -> bool:
    """Whether `train_ensemble` can train these networks on this set (in memory, no BatchNorm running stats)."""
    return train.in_memory and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in make_model().modules())
