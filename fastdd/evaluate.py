"""Evaluation of a distilled set: train a fresh network on it, report top-1 on real validation data.

Hard-label protocol of IGD (SPEC "Evaluation protocol"): AdamW lr 1e-3, wd 0.01, MultiStepLR at 2/3 and
5/6 of the epochs (×0.2), batch 64, CutMix (β = 1, p = 1), epochs by IPC (1 → 3000, ≤10 → 2000,
≤50 → 1500, ≤200 → 1000, else 500), best top-1 on the validation split, mean ± std over seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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


def cutmix(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, beta: float = 1.0):
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


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


@dataclass
class EvalResult:
    best_top1: float
    final_top1: float
    epochs: int


def train_and_evaluate(
    make_model,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    cutmix_beta: float = 1.0,
    eval_every: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Train make_model() from seed on (train_images [N,C,H,W], train_labels [N]); best and final val top-1."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs * 2 // 3, epochs * 5 // 6], gamma=0.2)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    val_images, val_labels = val_images.to(device), val_labels.to(device)
    eval_every = eval_every or max(1, epochs // 20)
    best = 0.0
    for epoch in tqdm(range(epochs), desc=f"eval seed {seed}", disable=not progress, leave=False):
        model.train()
        order = torch.as_tensor(rng.permutation(len(train_labels)), device=device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images, labels_a, labels_b, lam = cutmix(train_images[idx], train_labels[idx], rng, cutmix_beta)
            logits = model(images)
            loss = lam * F.cross_entropy(logits, labels_a) + (1 - lam) * F.cross_entropy(logits, labels_b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            best = max(best, accuracy(model, val_images, val_labels))
    final = accuracy(model, val_images, val_labels)
    return EvalResult(best_top1=max(best, final), final_top1=final, epochs=epochs)


def summarize(results: list[EvalResult]) -> dict:
    """mean ± std (population std over seeds, as in the papers' tables) of best top-1, in percent."""
    values = [100.0 * r.best_top1 for r in results]
    return {
        "top1_mean": statistics.fmean(values),
        "top1_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }
