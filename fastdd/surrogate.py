"""Surrogate checkpoints for influence guidance: train a ConvNet trajectory on real data, pick checkpoints
with Algorithm 2, compute per-class real gradients, and save everything in one safetensors file.

Training (SPEC "Surrogate training"): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, parameters saved
after every epoch (E + 1 snapshots including epoch 0); augmentation: random resized crop (scale 0.5–1)
and, unless disabled (digits), horizontal flips.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from .data.atomic import save_safetensors_atomic
from .data.augment import random_resized_crop
from .guidance.influence import class_mean_gradient, real_gradients, select_checkpoints
from .models.convnet import ConvNet


DIGITS_SURROGATE_PATH = Path(__file__).parent / "assets" / "digits_surrogate.safetensors"


@dataclass
class SurrogateConfig:
    channel: int
    num_classes: int
    width: int = 128
    depth: int = 6
    im_size: int = 256

    def build(self) -> ConvNet:
        return ConvNet(self.channel, self.num_classes, width=self.width, depth=self.depth, im_size=self.im_size)


# the digits default (16×16 grayscale): a small ConvNet-3; the bundle shipped at DIGITS_SURROGATE_PATH is made by
#   fastdd surrogate --out fastdd/assets/digits_surrogate.safetensors
DIGITS_SURROGATE = SurrogateConfig(channel=1, num_classes=10, width=32, depth=3, im_size=16)


def surrogate_config_for(image_shape: tuple[int, int, int], num_classes: int) -> SurrogateConfig:
    """ConvNet for images of image_shape (C, S, S): ConvNet-6 width 128 when S is a multiple of 64 (SPEC), else
    the deepest ConvNet (≤ 3 pools, width 32 below 64 px) that S allows."""
    channels, size, _ = image_shape
    if size % 64 == 0:
        return SurrogateConfig(channels, num_classes, width=128, depth=6, im_size=size)
    depth = 0
    while depth < 3 and size % (2 ** (depth + 1)) == 0 and size // 2 ** (depth + 1) >= 2:
        depth += 1
    if depth == 0:
        raise ValueError(f"image size {size} is too small or odd for a ConvNet surrogate")
    return SurrogateConfig(channels, num_classes, width=128 if size >= 64 else 32, depth=depth, im_size=size)


def train_trajectory(
    config: SurrogateConfig,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 50,
    lr: float = 0.01,
    batch_size: int = 64,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Tensor:
    """Train config.build() with SGD on (images [N, C, H, W] in [-1, 1], labels [N]); -> snapshots [epochs + 1, P]."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = config.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    snapshots = [parameters_to_vector(model.parameters()).detach().cpu().clone()]
    for _ in tqdm(range(epochs), desc="surrogate epochs", disable=not progress):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = random_resized_crop(images[idx], generator, flip=flip).to(device)
            loss = F.cross_entropy(model(batch), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        snapshots.append(parameters_to_vector(model.parameters()).detach().cpu().clone())
    return torch.stack(snapshots)


def epoch_class_gradients(
    config: SurrogateConfig, snapshots: Tensor, images: Tensor, labels: Tensor, progress: bool = False, **kwargs
) -> Tensor:
    """Per-class mean gradients at every snapshot: [E + 1, num_classes, P] (input of Algorithm 2)."""
    model = config.build().eval()
    return torch.stack(
        [
            torch.stack([class_mean_gradient(model, snap, images[labels == c], c, **kwargs) for c in range(config.num_classes)])
            for snap in tqdm(snapshots, desc="algorithm 2 gradients", disable=not progress)
        ]
    )


@dataclass
class SurrogateBundle:
    """What influence guidance needs: config, flat_params [K, P], real_grads [num_classes, K, P], epochs [K]."""

    config: SurrogateConfig
    flat_params: Tensor
    real_grads: Tensor
    epochs: list[int]

    def save(self, path: str | Path) -> None:
        """Write the bundle to a safetensors file, atomically (config and epochs as JSON metadata)."""
        metadata = {"config": json.dumps(asdict(self.config)), "epochs": json.dumps(self.epochs)}
        save_safetensors_atomic({"flat_params": self.flat_params, "real_grads": self.real_grads}, path, metadata)


    @classmethod
    def load(cls, path: str | Path) -> "SurrogateBundle":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"surrogate file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path} is not a fastdd surrogate file (no config metadata)")
        tensors = load_file(str(path))
        try:
            config = SurrogateConfig(**json.loads(metadata["config"]))
            bundle = cls(config, tensors["flat_params"], tensors["real_grads"], json.loads(metadata["epochs"]))
            expected = sum(p.numel() for p in config.build().parameters())
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"surrogate file {path} is malformed ({err})") from None
        flat, real = bundle.flat_params, bundle.real_grads
        if flat.dim() != 2 or flat.shape[1] != expected:
            raise ValueError(f"surrogate file {path}: flat_params {list(flat.shape)}, the config needs [K, {expected}]")
        if real.dim() != 3 or real.shape != (config.num_classes, *flat.shape):
            raise ValueError(
                f"surrogate file {path}: real_grads {list(real.shape)}, expected [{config.num_classes}, {flat.shape[0]}, {expected}]"
            )
        return bundle


def build_surrogate_bundle(
    config: SurrogateConfig,
    snapshots: Tensor,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: list[int] | None = None,
    threshold: float = 0.7,
    max_images: int = 200,
    chunk: int = 50,
    progress: bool = False,
) -> SurrogateBundle:
    """Pick checkpoints (given `epochs`, or Algorithm 2 over all snapshots) and compute real gradients."""
    model = config.build().eval()
    if epochs is None:
        grads = epoch_class_gradients(config, snapshots, images, labels, progress, max_images=max_images, chunk=chunk)
        epochs = select_checkpoints(grads, threshold)
    flat = snapshots[epochs]
    real = real_gradients(model, flat, images, labels, config.num_classes, max_images=max_images, chunk=chunk)
    return SurrogateBundle(config, flat, real, list(epochs))


def compute_surrogate_bundle(
    config: SurrogateConfig,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 50,
    epoch_list: list[int] | None = None,
    threshold: float = 0.7,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SurrogateBundle:
    """Train the trajectory on (images [N, C, S, S] in [-1, 1], labels [N]) and build the bundle from it."""
    snapshots = train_trajectory(config, images, labels, epochs=epochs, flip=flip, seed=seed, device=device, progress=progress)
    return build_surrogate_bundle(config, snapshots, images, labels, epochs=epoch_list, threshold=threshold, progress=progress)
