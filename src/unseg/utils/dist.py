"""Optional multi-process runs under ``torchrun``: one process works alone with no launcher.

``torchrun --nproc_per_node=N`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``;
:func:`init_distributed` then joins the process group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the process group if launched by torchrun; return ``(rank, world_size)``.

    Without ``WORLD_SIZE`` > 1 in the environment this is a no-op returning ``(0, 1)``.
    The backend is nccl when ``device`` is CUDA (each rank uses ``cuda:LOCAL_RANK``), else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def is_main_env() -> bool:
    """True unless torchrun's environment names a rank other than 0 (usable before init)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for all processes; no-op in a single process."""
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Every ``world``-th item starting at ``rank``: disjoint shards that cover ``items``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    return list(items[rank::world])


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun process group for the block if launched by torchrun and not in one yet;
    yields this rank's device (``cuda:LOCAL_RANK`` under CUDA). Leaves the group at the end only
    if it joined it here: a caller's own group is never destroyed."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    _, world = init_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        yield device
        if joined_here and world > 1:
            barrier()  # every rank is done talking before any tears the group down (gloo aborts)
    finally:
        if joined_here and world > 1:
            cleanup()
