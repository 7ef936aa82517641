"""RDED's soft-label evaluation protocol (IGD's ImageNet-1K Table 2 and DAP's ImageNet-1K results use it), restated
from the RDED authors' code (LINs-lab/RDED at 31f9117: `validation/main.py`, `argument.py`, `validation/utils.py`;
line numbers of that commit):

- every training batch is augmented per image (ShufflePatches(factor): the image's factor × factor patches shuffled,
  `validation/utils.py` 164-188; RandomResizedCrop(input size, scale (1/factor, 1)); horizontal flip; ImageNet
  mean / std normalisation; `validation/main.py` 111-126), then CutMix (β = 1, every batch, `validation/utils.py`
  138-161) on the normalised batch; the teacher labels the mixed batch it sees (no stored labels, `main.py` 207-216);
- the loss is KLDivLoss(batchmean) of log_softmax(student / T) against softmax(teacher / T), T = 20 for CutMix
  (`argument.py` 270-274), no T² factor and no hard-label term (`main.py` 202-228);
- AdamW betas (0.9, 0.999), weight decay 0.01 on weights of more than one dimension only (`validation/utils.py`
  67-84), lr 1e-3 (ConvNets, ResNets), 2.5e-3 (MobileNet-V2) (`argument.py` 276-306); LambdaLR
  0.5·(1 + cos(π·epoch / epochs / 2)) stepped per epoch, no warm-up (a quarter cosine: the lr ends near half,
  `main.py` 95-102); 300 epochs (`argument.py` 114, every script);
- batch size by IPC: 10 for IPC 1, 50 for IPC 10, 100 for IPC 50, doubled for 100 or more classes, at most
  IPC × classes (`argument.py` 234-262; other IPC: 50);
- validation: Resize(input · 8 / 7) + CenterCrop(input), at epochs e with e % 10 == 9 after 80% of the epochs and at
  the last; the best top-1 is reported (`main.py` 146-192).

Differences, stated: the distilled images are read at their own size and augmented at `input_size` (default 224
for images of 224 px and more, else the images' size: RDED's 224 px ImageNet-family setting); grayscale images are
normalised with mean 0.5, std 0.5; RDED validates Nette / Woof on the first 50 images per class only (their quick
check), fastdd on the whole --real-val folder; their NumPy draws (CutMix) are unseeded, fastdd's seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import crop_sides
from .common import EpochClock, EvalResult, ImageSet, top1
from .hard import cutmix

PROTOCOL = {
    "name": "soft",
    "source": "RDED (Sun et al., CVPR 2024) validation/main.py, LINs-lab/RDED at 31f9117",
    "optimizer": "AdamW betas (0.9, 0.999), weight decay 0.01 on >1-dim weights; lr 1e-3 (2.5e-3 mobilenetv2)",
    "schedule": "LambdaLR 0.5*(1+cos(pi*epoch/epochs/2)) per epoch, no warm-up",
    "epochs": 300,
    "batch_size": "by IPC: 1 -> 10, 10 -> 50, 50 -> 100 (x2 for >= 100 classes), at most IPC x classes",
    "augmentation": "ShufflePatches(factor), RandomResizedCrop(input, scale (1/factor, 1)), flip, normalise, CutMix "
    "beta 1 p 1",
    "labels": "teacher softmax(logits / T) on every mixed batch, KLDivLoss(batchmean) of log_softmax(student / T)",
    "temperature": 20,
    "metric": "best top-1 at epochs e % 10 == 9 after 80% and at the last; val Resize(input*8/7) + CenterCrop",
}
RDED_EPOCHS, RDED_TEMPERATURE, RDED_FACTOR = 300, 20.0, 2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rded_batch_size(ipc: int, num_classes: int) -> int:
    """RDED's adaptive batch size (argument.py 234-262)."""
    size = {1: 10, 10: 50, 50: 100}.get(ipc, 50)
    if num_classes >= 100:
        size *= 2
    return max(1, min(size, ipc * num_classes))


def rded_lr(arch: str) -> float:
    return 2.5e-3 if arch == "mobilenetv2" else 1e-3


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """RDED's loss: KLDivLoss(reduction="batchmean")(log_softmax(student / T), softmax(teacher / T)), no T²."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    )


def normalise(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> RDED's input: [0, 1] then ImageNet mean / std (RGB), or mean 0.5 / std 0.5 (grayscale)."""
    unit = (images + 1) / 2
    if images.shape[1] != 3:
        return (unit - 0.5) / 0.5
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (unit - mean) / std


def shuffle_patches(image: Tensor, factor: int, rng: np.random.Generator) -> Tensor:
    """RDED's ShufflePatches: the factor column strips shuffled, then the factor row strips. image: [C, H, W]."""
    if factor <= 1:
        return image
    columns = list(torch.tensor_split(image, factor, dim=2))
    image = torch.cat([columns[i] for i in rng.permutation(factor)], dim=2)
    rows = list(torch.tensor_split(image, factor, dim=1))
    return torch.cat([rows[i] for i in rng.permutation(factor)], dim=1)


def train_augment(
    images: Tensor, size: int, factor: int, rng: np.random.Generator, shuffle: bool = True, flip: bool = True
) -> Tensor:
    """Per image: ShufflePatches(factor) (when shuffle), RandomResizedCrop(size, scale (1/factor, 1), ratio
    (3/4, 4/3)), a horizontal flip with probability 1/2 (when flip). images: [B, C, H, W] in [-1, 1] ->
    [B, C, size, size]."""
    out = []
    height, width = images.shape[-2:]
    for image in images:
        image = shuffle_patches(image, factor, rng) if shuffle else image
        area = height * width * rng.uniform(1.0 / factor, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_h, crop_w = crop_sides(area, aspect)
        crop_h, crop_w = max(1, min(height, round(crop_h))), max(1, min(width, round(crop_w)))
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        crop = image[:, top : top + crop_h, left : left + crop_w][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(crop.flip(-1) if flip and rng.random() < 0.5 else crop)
    return torch.stack(out)


def validation_view(images: Tensor, size: int) -> Tensor:
    """RDED's Resize(size · 8 / 7) + CenterCrop(size) of [B, C, H, W] in [-1, 1]."""
    resize = size // 7 * 8
    if images.shape[-1] != resize or images.shape[-2] != resize:
        images = F.interpolate(images, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
    offset = (resize - size) // 2
    return images[:, :, offset : offset + size, offset : offset + size]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """RDED's get_parameters: weight decay on parameters named 'weight' with more than one dimension only."""
    decay = [p for n, p in model.named_parameters() if "weight" in n and p.dim() > 1]
    other = [p for n, p in model.named_parameters() if not ("weight" in n and p.dim() > 1)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def validation_epochs(epochs: int) -> list[int]:
    """The epochs (0-based) RDED validates at: e % 10 == 9 after 80% of the epochs, and the last."""
    return sorted({e for e in range(epochs) if e % 10 == 9 and e > epochs * 0.8} | {epochs - 1})


def train_soft(
    make_model,
    teacher: nn.Module,
    train: ImageSet,
    val: ImageSet,
    *,
    seed: int,
    epochs: int = RDED_EPOCHS,
    batch_size: int,
    lr: float,
    input_size: int,
    temperature: float = RDED_TEMPERATURE,
    factor: int = RDED_FACTOR,
    weight_decay: float = 0.01,
    device: torch.device | str = "cpu",
    workers: int = 0,
    bar=None,
    clock: EpochClock | None = None,
) -> EvalResult:
    """One seed of the soft-label protocol: a fresh make_model() trained on `train` relabelled by `teacher` (logits
    over the run's classes) batch by batch; best and final top-1 on `val`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    student = make_model().to(device)
    teacher = teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(student, weight_decay), lr=lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs / 2)) if e <= epochs else 0.0
    )
    checks = set(validation_epochs(epochs))
    best = 0.0

    def accuracy() -> float:
        student.eval()
        view = lambda x: student(normalise(validation_view(x, input_size)))[None]  # noqa: E731
        return float(top1(view, val, device, workers)[0])

    final = 0.0
    for epoch in range(epochs):
        student.train()
        order = torch.as_tensor(rng.permutation(len(train.labels)))
        for images, labels in train.batches(order, batch_size, workers):
            images = normalise(train_augment(images, input_size, factor, rng).to(device))
            mixed, _, _, _ = cutmix(images, labels.to(device), rng)
            with torch.no_grad():
                targets = teacher(mixed)
            loss = soft_loss(student(mixed), targets, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if epoch in checks:
            final = accuracy()
            best = max(best, final)
        if bar is not None:
            bar.update(1)
        if clock is not None:
            clock.tick(epoch + 1)
    return EvalResult(best_top1=best, final_top1=final, epochs=epochs)
