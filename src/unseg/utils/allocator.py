"""Keep freed memory in the process's heap (glibc), so large tensors reuse pages already mapped.

glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB by default) with a
fresh ``mmap`` and returns them to the system when freed; each of their pages is then faulted in
and zeroed again by the next tensor of that size. A backbone's activations and the dense CRF's
``[pixels, labels]`` buffers are such blocks, allocated and freed thousands of times a run:
measured on 30 VOC2012 images (`docs/pipeline-cost.md`, fifth pass), ``segment`` spent a third of
its CPU time in the kernel on those page faults. Raising the mmap and trim thresholds keeps the
freed blocks in the heap for the next tensor. The price is resident memory that the process
keeps instead of returning: measured on 240 ECSSD images (features, image + mirror), the
extraction took 49 s instead of 91 s and peaked at 2.9 GB resident instead of 1.3 GB; over 600
images the resident memory stayed between 0.3 and 3.0 GB, with no creep.

What keeps it from creeping is :func:`release_freed_memory`, glibc's ``malloc_trim``: the
extraction calls it after each batch, the PriMaPs proposals and the prediction after each chunk
of images, and the fit once at its end. Tensors of ever-changing sizes leave the heap
fragmented, and without the trims a run's resident memory grows with its folder even though
what it holds does not: measured on 300 ECSSD images (`docs/pipeline-cost.md`, sixth pass), the
proposals, fit and prediction peaked at 2.45 GB without the stage trims and 1.57 GB with them,
for 0.3–0.5 GB of live heap.

The ``unseg`` command calls :func:`keep_freed_memory` when it starts; a Python program can call it
once itself. It leaves the allocator alone when the user has chosen one (the ``MALLOC_*``
thresholds in the environment, or another allocator in ``LD_PRELOAD``) and where the C library is
not glibc; ``UNSEG_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

from unseg.errors import UnsegError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: every tensor of a run at the pipelines' sizes stays below
OPT_OUT = "UNSEG_KEEP_FREED_MEMORY"  # "0": leave glibc's defaults
# the environment's own allocator choices: thresholds, tunables, a preloaded allocator
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                  "LD_PRELOAD")


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve and keep blocks below ``threshold`` bytes from the heap (glibc's ``mallopt``
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``) for the rest of the process.

    Returns whether the setting was applied: False where ``UNSEG_KEEP_FREED_MEMORY=0``, where
    the C library is not glibc, where the environment already chooses
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``, an
    ``LD_PRELOAD`` allocator), or where glibc refuses the value.
    """
    if not 0 < threshold < 2**31:
        raise UnsegError(
            f"allocator threshold must be between 1 and 2**31 - 1 bytes, got {threshold}")
    if os.environ.get(OPT_OUT) == "0":
        log.debug("allocator left alone: %s=0", OPT_OUT)
        return False
    chosen = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if chosen:
        log.debug("allocator left as the environment sets it (%s)", ", ".join(chosen))
        return False
    libc = glibc()
    if libc is None:
        log.debug("allocator left alone: the C library is not glibc")
        return False
    value = ctypes.c_int(int(threshold))
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, value)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, value)
    )
    log.debug("allocator: mmap and trim thresholds %d bytes: %s", threshold,
              "applied" if applied else "refused")
    return applied


def release_freed_memory() -> None:
    """Give the heap memory freed since the last call back to the system (glibc's
    ``malloc_trim(0)``, which also returns the free pages inside the heap; nothing where the C
    library is not glibc)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
