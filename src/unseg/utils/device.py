"""Device selection and seeding: CUDA when present, CPU otherwise, deterministic given a seed."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` or ``"auto"`` picks CUDA if available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (third-party code uses the global RNG)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def cpu_threads(device: str | torch.device, n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads when ``device`` is the CPU (restored after).

    For loops of small ops, or stages already parallel across processes, where intra-op threads
    cost more than they give (they spin-wait for cores on a shared machine).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
