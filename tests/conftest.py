"""Shared test fixtures: paths to the real data beside the repo, seeded RNGs, a tiny image set,
a stand-in backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unseg.backbones.base import Backbone, BackboneSpec

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


class ColourPatches(Backbone):
    """Stand-in backbone (stride 16, 6 channels): the mean normalised colour of each patch and
    its negation, so patches of different colours have negative cosine similarity."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        self.proj = torch.nn.Conv2d(3, 6, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.cat([torch.eye(3), -torch.eye(3)]).view(6, 3, 1, 1))

    def _features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return self.proj(F.avg_pool2d(x, 16))
