"""Device selection and seeding: CUDA when present, CPU otherwise, deterministic given a seed."""

from __future__ import annotations

import functools
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from unseg.errors import UnsegError

_THREADS_LOCK = threading.Lock()
_THREAD_BLOCKS = 0  # cpu_threads blocks running now, in any thread
_THREADS_BEFORE = 0  # torch's thread count before the first of them


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` or ``"auto"`` picks CUDA if available.

    A device this torch build or machine cannot use (no such device type, CUDA on a CPU-only
    build or without a GPU, an index past the last GPU) is an :class:`UnsegError` naming it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UnsegError(
            f"device {str(device)!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from exc
    _check_available(dev)
    return dev


def _check_available(dev: torch.device) -> None:
    """Raise :class:`UnsegError` unless tensors can be put on ``dev``."""
    build = f"torch {torch.__version__}"
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise UnsegError(
                f"device {str(dev)!r}: CUDA is not available in this torch build ({build}, CPU "
                "only); use --device cpu, or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise UnsegError(
                f"device {str(dev)!r}: this torch build ({build}, CUDA {torch.version.cuda}) "
                "finds no usable GPU (driver or CUDA_VISIBLE_DEVICES?); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnsegError(
                f"device {str(dev)!r}: there are {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
        return
    if dev.type == "cpu":
        return
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        raise UnsegError(
            f"device {str(dev)!r} is not available in this torch build ({build}) or on this "
            "machine; use --device cpu"
        ) from exc


def load_cuda_linalg() -> None:
    """Load torch's CUDA linear-algebra library now, from the calling thread, if CUDA is in use.

    torch loads it at the first ``torch.linalg`` call on a GPU, and that load is not thread-safe:
    two threads making their first call at once fail with "lazy wrapper should be called at most
    once". Call this before threads run linear algebra on a GPU. A no-op while this process has
    not initialised CUDA (CPU runs never touch it), and after the first load.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        _load_cuda_linalg()


@functools.cache
def _load_cuda_linalg() -> None:
    torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device="cuda"))


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
    cost more than they give (they spin-wait for cores on a shared machine). torch's count is
    per thread, and a new thread takes the count last set in any thread: so when blocks overlap
    in several threads (predictions in a thread pool), the last to end restores the count from
    before the first began (a thread started inside another's block found ``n`` and restored
    it, leaving every later thread on ``n``); the others restore their own.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    global _THREAD_BLOCKS, _THREADS_BEFORE
    with _THREADS_LOCK:
        old = torch.get_num_threads()  # this thread's (the count is per thread)
        if _THREAD_BLOCKS == 0:
            _THREADS_BEFORE = old
        _THREAD_BLOCKS += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:  # a thread started inside another's block found its n: the last
            _THREAD_BLOCKS -= 1  # block out restores the count from before the first one
            torch.set_num_threads(_THREADS_BEFORE if _THREAD_BLOCKS == 0 else old)
