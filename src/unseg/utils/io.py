"""Atomic writes: every file unseg writes appears whole or not at all (temp file + rename); and
the reading of a JSON object file that an error names when it cannot be used."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unseg.errors import InputFileError, UnsegError

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask: read from ``/proc`` where it can be (setting it briefly would race
    with other threads creating files), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _why_not(folder: Path, exc: OSError) -> str:
    """Why ``folder`` could not be created: an ancestor that is a file, else the OS's words."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file, not a folder" if blocker is not None else str(exc.strerror)


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its parents (it may exist); an :class:`UnsegError` naming it and
    why when it cannot be (an ancestor that is a file, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnsegError(f"{folder}: cannot create this folder ({_why_not(folder, exc)})") from None
    return folder


def atomic_temp_pattern(names: str) -> re.Pattern[str]:
    """The names :func:`atomic_path` gives the temp files of files whose names match the regex
    ``names``: ``.<name>.<mkstemp's 8 random characters>.tmp``."""
    return re.compile(rf"\.(?:{names})\.[a-z0-9_]{{8}}\.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The result gets the usual mode of a new file (:func:`file_mode`), not ``mkstemp``'s 0600.
    A ``path`` that is a folder, or whose folder cannot be created, is an :class:`UnsegError`.
    """
    path = Path(path)
    if path.is_dir():
        raise UnsegError(f"{path}: is a folder, not a file; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnsegError(f"{path}: cannot create its folder {path.parent} "
                         f"({_why_not(path.parent, exc)})") from None
    tmp_path: Path | None = None
    try:  # an interrupt (Ctrl-C, SIGTERM) right after mkstemp must not leave the temp file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp_path = Path(tmp)
        os.close(fd)
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` then atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda p: p.write_bytes(data))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_json_object(path: Path, unreadable: str, not_object: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`InputFileError` naming it when it cannot be read or
    parsed (``"<unreadable> (<why>)"``) or holds another JSON value (``not_object``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"{unreadable} ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(path, not_object)
    return data


def save_png_atomic(
    path: str | Path, array: np.ndarray, palette: list[int] | None = None
) -> None:
    """Save a uint8 ``[H, W]`` (optionally palettised) or ``[H, W, 3]`` array as PNG atomically."""
    if array.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {array.dtype}")
    img = Image.fromarray(array)
    if palette is not None:
        if array.ndim != 2:
            raise ValueError("a palette needs a single-channel [H, W] array")
        img = img.convert("P")
        img.putpalette(palette)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_jpeg_atomic(path: str | Path, array: np.ndarray, quality: int = 90) -> None:
    """Save a uint8 ``[H, W, 3]`` array as JPEG atomically."""
    img = Image.fromarray(array)
    atomic_write(path, lambda p: img.save(p, format="JPEG", quality=quality))
