"""Processes under torchrun: the environment, and data-parallel training with `DistributedDataParallel`.

`fastdd distill` splits its work by class chunks (`pipeline.batches_for_rank`) so its output does not depend on the
number of ranks. The standalone training commands (`fastdd surrogate`, `fastdd teacher`) train data-parallel: each
rank reads its share of every batch (`rank_batches`) and DDP averages the gradients, so a rank holds 1/world of a
batch. Their result depends on the number of ranks through float rounding (a mean of per-rank means) and the
per-rank augmentation draws, as any DDP training does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    """The torch device of a --device option (default: cuda when available, else cpu); under torchrun, CUDA ranks
    take their local GPU. ValueError naming --device when it does not exist."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available")
        if world > 1 and device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def group_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size) with the default process group initialised under torchrun (NCCL on CUDA, else gloo) and
    destroyed at the end; (0, 1) and nothing initialised for one process."""
    import torch.distributed as dist

    rank, world, _ = distributed_env()
    if world == 1 or dist.is_initialized():
        yield group_rank()
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`DistributedDataParallel(model)` in a process group of more than one rank; the model itself otherwise."""
    if group_rank()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_batches(order: Tensor, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's share of each batch of `order` (batch_size consecutive indices; every world-th one from the
    rank's position). Every rank gets the same number of non-empty batches: a last batch of fewer than `world`
    indices is dropped when world > 1. world = 1: the batches themselves."""
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if world > 1 and batches and len(batches[-1]) < world:
        batches.pop()
    return [batch[rank::world].tolist() for batch in batches]


def is_main_process() -> bool:
    """Whether this process writes shared outputs (rank 0, or the only process)."""
    return group_rank()[0] == 0
