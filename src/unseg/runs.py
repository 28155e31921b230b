"""The on-disk format of a fitted model ("run"): ``config.json`` + ``weights.safetensors``.

``config.json`` records the method (its registry name), the format version, the unseg version,
the method's dataclass config, and what the pipeline adds (backbone, tap, weights sha256,
feature size, prediction defaults, seconds per stage under ``"timings"``);
``weights.safetensors`` is the estimator's ``state_dict``. :func:`load_fitted` rebuilds the
estimator through the registry, so a run reloads and predicts exactly as it was fitted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unseg._version import __version__
from unseg.errors import UnsegError
from unseg.layout import CONFIG_FILE, WEIGHTS_FILE
from unseg.registry import MethodSpec, Output, config_from_dict, config_to_dict, get_method
from unseg.utils.io import atomic_write, make_folder, write_bytes_atomic, write_json_atomic

RUN_FORMAT_VERSION = 2  # 2: estimator state_dict, registry config, prediction defaults


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
    make_folder(run_dir)
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


TYPE_WORDS = {int: "an integer", str: "a string", dict: "an object", type(None): "null"}


def require_meta(
    meta: Mapping[str, Any], run_dir: str | Path, fields: Mapping[str, type | tuple[type, ...]]
) -> None:
    """Refuse a run whose ``config.json`` lacks one of ``fields`` or holds another type there
    (a hand-edited or damaged run), naming the field, instead of failing later on it."""
    where = Path(run_dir) / CONFIG_FILE
    for key, types in fields.items():
        if key not in meta:
            raise UnsegError(f"{where} lacks {key!r}; the run is damaged or hand-edited: refit it")
        kinds = types if isinstance(types, tuple) else (types,)
        if not isinstance(meta[key], kinds) or isinstance(meta[key], bool):
            want = " or ".join(TYPE_WORDS.get(t, t.__name__) for t in kinds)
            raise UnsegError(f"{where}: {key!r} is {meta[key]!r}, not {want}")


def save_fitted(
    run_dir: str | Path, spec: MethodSpec, estimator: Any, extra: dict[str, Any] | None = None
) -> Path:
    """Save a fitted registered ``estimator``: its config and ``state_dict`` plus ``extra``."""
    return save_run(run_dir, spec.name, config_to_dict(estimator.config),
                    estimator.state_dict(), extra)


def load_fitted(
    run_dir: str | Path,
    output: Output | None = None,
    device: str | torch.device | None = None,
) -> tuple[MethodSpec, Any, dict[str, Any]]:
    """``(spec, estimator, meta)`` of a run: the method from the registry, the estimator rebuilt
    on ``device`` from the saved config and state. ``output`` restricts the kind of method."""
    meta, tensors = load_run(run_dir)
    spec = get_method(meta["method"])
    if output is not None and spec.output != output:
        raise UnsegError(
            f"{run_dir}: this run is a '{spec.name}' model ({spec.output}), expected a "
            f"{output} model"
        )
    config = config_from_dict(spec.config, meta.get("config", {}), f"{run_dir}/{CONFIG_FILE}")
    try:
        estimator = spec.estimator.from_state(config, tensors, device)
    except UnsegError as exc:  # the estimator's own words, naming the file they are about
        raise UnsegError(f"{Path(run_dir) / WEIGHTS_FILE}: {exc}: restore it or refit") from None
    return spec, estimator, meta


def read_run_files(run_dir: str | Path) -> dict[str, bytes]:
    """The bytes of every file of the run folder ``run_dir`` (a run is flat), by name: what a
    pickled :class:`~unseg.segmenter.Segmenter` keeps of its fitted model."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UnsegError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); the Segmenter loaded "
                         "from it cannot be pickled once its run is gone")
    try:
        return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}
    except OSError as exc:
        raise UnsegError(f"{run_dir}: cannot read the run ({exc.strerror or exc})") from None


def write_run_files(files: Mapping[str, bytes], run_dir: str | Path) -> Path:
    """Write ``files`` (:func:`read_run_files`) as the run folder ``run_dir``; returns it."""
    run_dir = make_folder(run_dir)
    for name, data in files.items():
        if Path(name).name != name:
            raise UnsegError(f"not a run file name: {name!r}")
        write_bytes_atomic(run_dir / name, data)
    return run_dir
