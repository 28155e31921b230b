"""Bookkeeping for batch runs: finished outputs are kept, bad files are reported, work goes on."""

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
        """Record that ``path`` could not be processed, and log it."""
        logger.warning("skipping %s: %s", path, problem)
        self.failed.append((Path(path), problem))

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return not self.failed
