"""Process-group joining and per-rank CPU shares: a caller's own group survives our commands."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from PIL import Image

import unseg.features as features
from unseg.pipelines import semantic
from unseg.utils import dist
from unseg.utils.device import cpu_count


@pytest.fixture
def own_group(tmp_path, monkeypatch):
    """A one-process gloo group created by the caller (not by unseg)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()


def test_extract_dataset_leaves_a_group_it_did_not_create(own_group, tmp_path, monkeypatch):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")

    class Model(torch.nn.Identity):
        stride = 16

    def create(name, weights=None, device=None, **kwargs):
        return Model()

    extracted = SimpleNamespace(stats={"images": 1, "failed": 0})
    monkeypatch.setattr(features, "create_backbone", create)
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: extracted)
    assert features.extract_dataset(tmp_path, tmp_path / "cache", backbone="x") is extracted
    assert tdist.is_initialized()


def test_joined_keeps_the_callers_group(own_group):
    with dist.joined(torch.device("cpu")) as dev:
        assert dev == torch.device("cpu")
    assert tdist.is_initialized()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_crf_workers_are_shared_among_ranks(monkeypatch, world):
    monkeypatch.setattr(semantic, "cpu_count", lambda: 12)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    assert semantic.default_workers() == min(8, 12 // world)


def test_cpu_count_is_the_affinity_mask():
    assert 1 <= cpu_count() <= (__import__("os").cpu_count() or 1)
