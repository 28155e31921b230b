"""The scratch folder of a benchmark script: the one the user named (kept), else a temporary
one removed at the end, also when the script fails.

Imported by the scripts as ``from _scratch import scratch_folder`` (``python bench/x.py`` puts
``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_folder(given: str | Path | None, prefix: str) -> Iterator[Path]:
    """``given`` (left in place), or a new temporary folder named ``prefix...`` that is deleted
    with everything in it when the block ends."""
    if given:
        yield Path(given)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
