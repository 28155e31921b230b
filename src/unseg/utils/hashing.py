"""Content hashes: of files (streamed) and of JSON-able settings (cache keys)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the bytes of ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def settings_key(settings: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``settings`` as sorted-key JSON."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
