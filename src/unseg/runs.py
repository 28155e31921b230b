"""The on-disk format of a fitted model ("run"): ``config.json`` + ``weights.safetensors``.

``config.json`` records the method, the format version, the unseg version, the backbone and the
method's dataclass config, so a run reloads and predicts exactly as it was fitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unseg import __version__
from unseg.errors import UnsegError
from unseg.utils.io import atomic_write, write_json_atomic

RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def save_run(
    run_dir: str | Path,
    method: str,
    config: Any,
    tensors: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a run folder: ``config`` (a dataclass or dict) as JSON and ``tensors`` as safetensors.

    ``extra`` holds JSON-able facts needed at prediction time (e.g. backbone name, image size).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    meta = {
        "method": method,
        "format_version": RUN_FORMAT_VERSION,
        "unseg_version": __version__,
        "config": cfg,
        **(extra or {}),
    }
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(run_dir / WEIGHTS_FILE, lambda p: save_file(cpu, str(p)))
    write_json_atomic(run_dir / CONFIG_FILE, meta)
    return run_dir


def load_run(
    run_dir: str | Path, method: str | tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a run folder; returns ``(meta, tensors)``.

    Raises :class:`UnsegError` if the folder is not a run, is from another method (when
    ``method`` is given), or from an incompatible format version.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    w_path = run_dir / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise UnsegError(
            f"{run_dir}: not an unseg run folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnsegError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise UnsegError(f"{cfg_path}: no 'method' recorded; not an unseg run")
    if meta.get("format_version") != RUN_FORMAT_VERSION:
        raise UnsegError(
            f"{run_dir}: run format version {meta.get('format_version')!r} "
            f"(written by unseg {meta.get('unseg_version', '?')}); this unseg reads version "
            f"{RUN_FORMAT_VERSION}. Refit the model with this version."
        )
    wanted = (method,) if isinstance(method, str) else method
    if wanted is not None and meta["method"] not in wanted:
        raise UnsegError(
            f"{run_dir}: this run is a '{meta['method']}' model, expected {' or '.join(wanted)}"
        )
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types
        raise UnsegError(f"{w_path}: unreadable weights ({exc})") from None
    return meta, tensors
