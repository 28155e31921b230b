"""Progress bars that the CLI switches on; library code stays silent unless asked.

Loops over images count images (``unit="img"``) so that tqdm shows a rate and an ETA per image,
also where the work is done in chunks (:func:`chunked`) or batches (:func:`progress_bar`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = False


class Bar(Protocol):
    """What a progress bar offers its loop: ``update(n)`` after ``n`` more items are done."""

    def update(self, n: float | None = 1) -> bool | None:
        """Count ``n`` more items as done."""


class _Silent:
    """The bar of a disabled progress display: counts nothing, shows nothing."""

    def update(self, n: float | None = 1) -> bool | None:
        """Ignore ``n``."""
        return None


def set_progress(enabled: bool = True) -> None:
    """Show (or hide) progress bars on stderr for every long loop of this process, as the
    commands show them: images decoded and passed through the backbone, proposals, fitting,
    prediction (``unseg.set_progress()``; tqdm's notebook bars where ipywidgets is installed).
    Off by default in a program; the CLI switches them on."""
    global _ENABLED
    if not isinstance(enabled, bool):  # "no" would have switched them on
        raise TypeError(f"set_progress takes True or False, got {enabled!r}")
    _ENABLED = enabled


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str | None = None, unit: str = "it"
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress bars are enabled; ``unit``
    names what one item is (``"img"`` for a loop over images)."""
    if not _ENABLED:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


@contextmanager
def progress_bar(
    total: int, desc: str | None = None, unit: str = "img", show: bool = True
) -> Iterator[Bar]:
    """A bar of ``total`` items that the block advances with ``bar.update(n)`` (e.g. once per
    batch by the batch's number of images); silent when progress bars are disabled or ``show``
    is false (e.g. on torchrun ranks other than the first)."""
    if not (_ENABLED and show):
        yield _Silent()
        return
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield bar


def chunked(items: Sequence[T], size: int, desc: str | None = None) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` items; the bar counts the items
    (``unit="img"``), each chunk when the loop's body has finished it."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    with progress_bar(len(items), desc) as bar:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield chunk
            bar.update(len(chunk))
