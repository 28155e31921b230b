"""Wall-clock seconds per pipeline stage (decode, backbone, proposals, fitting, refinement, ...).

Every finished block is logged at DEBUG on the ``unseg.utils.timing`` logger (``-vv``); a
command gathers the stages of all its :class:`Timings` with :func:`collect` and logs their
totals at INFO (``-v``) with :func:`log_totals`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_COLLECTORS: list[Timings] = []
_COLLECTORS_LOCK = threading.Lock()


class Timings:
    """Seconds accumulated per named stage; safe to add to from several threads."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def _accumulate(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (and to every active :func:`collect`)."""
        self._accumulate(stage, seconds)
        with _COLLECTORS_LOCK:
            collectors = [c for c in _COLLECTORS if c is not self]
        for collector in collectors:
            collector._accumulate(stage, seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block into stage ``name``; the block's seconds are logged at DEBUG."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.add(name, seconds)
            logger.debug("%s: %.3f s", name, seconds)

    def as_dict(self) -> dict[str, float]:
        """Seconds per stage (rounded to ms), in the order the stages first appeared."""
        with self._lock:
            return {k: round(v, 3) for k, v in self._seconds.items()}


@contextmanager
def collect() -> Iterator[Timings]:
    """A :class:`Timings` that receives, while the block runs, the seconds every other
    :class:`Timings` of this process adds (a command's stages, wherever they are timed)."""
    gathered = Timings()
    with _COLLECTORS_LOCK:
        _COLLECTORS.append(gathered)
    try:
        yield gathered
    finally:
        with _COLLECTORS_LOCK:
            _COLLECTORS.remove(gathered)


def log_totals(timings: Timings, what: str) -> None:
    """Log each stage of ``timings`` with its seconds at INFO, naming ``what`` they belong to."""
    for stage, seconds in timings.as_dict().items():
        logger.info("%s: stage %s took %.2f s", what, stage, seconds)
