"""Where a benchmark ran: the one ``machine`` block every script under ``bench/`` prints.

Imported by the scripts as ``from _machine import machine`` (``python bench/x.py`` puts
``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import torch

from unseg.utils.allocator import keep_freed_memory


def _memory_gb() -> float | None:
    """Total memory from ``/proc/meminfo``, or None where there is none."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in lines if line.startswith("MemTotal:")), None)
    return None if kib is None else round(kib / 2**20, 1)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Platform, CPUs, memory, torch and its threads, the device (its name on CUDA) and the load
    average at the call (the scripts call it as they print, i.e. at the end of the run)."""
    dev = torch.device(device)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "load_average": load_average(),
    }


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--glibc-defaults``: run without the malloc setting the ``unseg`` command applies."""
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc thresholds alone (the `unseg` command raises "
                             "them: unseg.utils.allocator)")


def keep_memory_as_the_command(args: argparse.Namespace) -> bool:
    """Apply the command's malloc setting unless ``--glibc-defaults``; whether it applied."""
    return False if args.glibc_defaults else keep_freed_memory()
