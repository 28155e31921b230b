"""Bookkeeping for batch runs: finished outputs are kept, bad files are reported, work goes on.

Each failed input is recorded once (the first problem found is kept) and logged at DEBUG only:
the command line prints the failures once, at the end (``failed: PATH: problem``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What a batch run did: the files it wrote and the inputs it could not process."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def fail(self, path: str | Path, problem: str) -> None:
        """Record that ``path`` could not be processed (once: a path already failed is kept
        with its first problem)."""
        path = Path(path)
        if path in self.failed_paths:
            return
        logger.debug("skipping %s: %s", path, problem)
        self.failed.append((path, problem))

    def merge(self, *others: BatchReport) -> BatchReport:
        """``self`` with the written files and the failures of ``others`` added (a path that
        failed in several keeps its first problem); returns ``self``."""
        for other in others:
            self.written.extend(other.written)
            for path, problem in other.failed:
                self.fail(path, problem)
        return self

    @property
    def failed_paths(self) -> set[Path]:
        """The inputs that failed."""
        return {p for p, _ in self.failed}

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failed
