"""Shared test fixtures: paths to the real data beside the repo, seeded RNGs, a tiny image set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples" / "images"


def shared_data(sub: str) -> Path:
    """Path of ``../shared/data/<sub>``; skips the calling test with a clear message if absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives beside the repo)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator."""
    return np.random.default_rng(0)
