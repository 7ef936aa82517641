"""MTT-style surrogate training trajectories (``replay_buffer_<n>.pt``).

Layout: a list of trajectories, each a list of snapshots (one per epoch, epoch 0 = initialisation), each a
list of parameter tensors in ``model.parameters()`` order.  Flattening a snapshot concatenates the flattened
tensors, i.e. ``torch.nn.utils.parameters_to_vector`` order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["load_replay_buffer", "snapshot_to_flat", "select_snapshots", "check_against_model"]

Snapshot = list[torch.Tensor]
Trajectory = list[Snapshot]


def _shape_difference(shapes: list[torch.Size], reference: list[torch.Size]) -> str:
    if len(shapes) != len(reference):
        return f"{len(shapes)} tensors instead of {len(reference)}"
    index = next(i for i, (a, b) in enumerate(zip(shapes, reference)) if a != b)
    return f"tensor {index} has shape {list(shapes[index])} instead of {list(reference[index])}"


def _validate(buffer, name: str) -> list[Trajectory]:
    if not isinstance(buffer, (list, tuple)) or len(buffer) == 0:
        raise ValueError(f"{name}: expected a non-empty list of trajectories, got {type(buffer).__name__}")
    reference: list[torch.Size] | None = None
    result = []
    for traj_index, trajectory in enumerate(buffer):
        if not isinstance(trajectory, (list, tuple)) or len(trajectory) == 0:
            raise ValueError(f"{name}: trajectory {traj_index} is not a non-empty list of snapshots")
        snapshots = []
        for snap_index, snapshot in enumerate(trajectory):
            where = f"{name}: trajectory {traj_index}, snapshot {snap_index}"
            if not isinstance(snapshot, (list, tuple)) or len(snapshot) == 0:
                raise ValueError(f"{where} is not a non-empty list of parameter tensors")
            if not all(isinstance(p, torch.Tensor) for p in snapshot):
                raise ValueError(f"{where} contains a non-tensor entry")
            shapes = [p.shape for p in snapshot]
            if reference is None:
                reference = shapes
            elif shapes != reference:
                raise ValueError(
                    f"{where} does not match trajectory 0, snapshot 0: {_shape_difference(shapes, reference)}"
                )
            snapshots.append(list(snapshot))
        result.append(snapshots)
    return result


def load_replay_buffer(path: str | os.PathLike) -> list[Trajectory]:
    """Loads and validates ``replay_buffer_<n>.pt`` (``torch.load(weights_only=True)``, tensors on CPU).

    Every snapshot must hold the same list of parameter shapes; violations raise ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: replay buffer not found: {path}")
    try:
        buffer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file or non-tensor pickles
        raise ValueError(f"{path}: cannot read replay buffer: {error}") from error
    return _validate(buffer, path)


def snapshot_to_flat(snapshot: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of parameter tensors -> one flat vector [P] (parameters_to_vector order)."""
    if len(snapshot) == 0 or not all(isinstance(p, torch.Tensor) for p in snapshot):
        raise ValueError("snapshot: expected a non-empty list of tensors")
    return torch.cat([p.reshape(-1) for p in snapshot])


def select_snapshots(buffer: Sequence[Trajectory], epochs: Sequence[int], trajectory: int = 0) -> torch.Tensor:
    """Flat parameters of the given epochs of one trajectory: [K, P] (K = len(epochs))."""
    if not 0 <= trajectory < len(buffer):
        raise ValueError(f"trajectory: expected 0..{len(buffer) - 1}, got {trajectory}")
    snapshots = buffer[trajectory]
    epochs = list(epochs)
    if len(epochs) == 0:
        raise ValueError("epochs: expected at least one epoch")
    bad = [e for e in epochs if not isinstance(e, int) or not 0 <= e < len(snapshots)]
    if bad:
        raise ValueError(f"epochs: {bad} out of range 0..{len(snapshots) - 1} for trajectory {trajectory}")
    return torch.stack([snapshot_to_flat(snapshots[e]) for e in epochs])


def check_against_model(flat: torch.Tensor, model: nn.Module) -> None:
    """Raises ValueError unless ``flat`` ([P] or [K, P]) has one entry per parameter of ``model``."""
    expected = sum(p.numel() for p in model.parameters())
    if flat.ndim not in (1, 2) or flat.shape[-1] != expected:
        raise ValueError(
            f"flat: shape {list(flat.shape)} does not match {type(model).__name__} with "
            f"{expected} parameters (expected [K, {expected}])"
        )
