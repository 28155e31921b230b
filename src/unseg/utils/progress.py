"""Progress bars that the CLI switches on; library code stays silent unless asked."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = False


def set_progress(enabled: bool) -> None:
    """Enable or disable progress bars globally (the CLI enables them)."""
    global _ENABLED
    _ENABLED = enabled


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress bars are enabled."""
    if not _ENABLED:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)
