"""Normalized-cut bipartition (TokenCut): planted graphs, solver cross-check, degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unseg.errors import UnsegError
from unseg.proposals.spectral import (
    SpectralConfig,
    binary_affinity,
    ncut_bipartition,
    second_eigenvector,
)


def _planted(h: int, w: int, blocks: list[tuple[slice, slice]], rng, noise: float = 0.05):
    """Features ``[8, h, w]``: background direction e0, objects direction e1, plus noise."""
    feats = np.zeros((8, h, w))
    feats[0] = 1.0
    truth = np.zeros((h, w), bool)
    for rows, cols in blocks:
        feats[:, rows, cols] = 0.0
        feats[1, rows, cols] = 1.0
        truth[rows, cols] = True
    feats += noise * rng.normal(size=feats.shape)
    return torch.from_numpy(feats).float(), truth


def test_planted_two_blocks_found(rng):
    feats, truth = _planted(12, 15, [(slice(3, 8), slice(4, 10))], rng)
    res = ncut_bipartition(feats)
    np.testing.assert_array_equal(res.mask, truth)
    assert res.seed is not None and truth[res.seed]


def test_planted_block_affinity_eigenvector_splits_blocks():
    """W = 1 inside two blocks, ε across: the 2nd eigenvector is constant on each block."""
    n_a, n_b = 5, 9
    w = np.full((n_a + n_b, n_a + n_b), 1e-5)
    w[:n_a, :n_a] = 1.0
    w[n_a:, n_a:] = 1.0
    v = second_eigenvector(w)
    assert np.ptp(v[:n_a]) < 1e-8 and np.ptp(v[n_a:]) < 1e-8
    assert np.sign(v[0]) != np.sign(v[-1])
    # D-orthogonal to the constant vector: the smaller block has the larger magnitude (the seed)
    assert abs(v[0]) > abs(v[-1])


def test_second_eigenvector_matches_normalized_laplacian(rng):
    x = rng.normal(size=(6, 20))
    w = binary_affinity(torch.from_numpy(x), 0.1, 1e-5)
    d = w.sum(axis=1)
    lsym = np.eye(20) - w / np.sqrt(d[:, None] * d[None, :])
    _, u = np.linalg.eigh(lsym)
    ref = u[:, 1] / np.sqrt(d)
    v = second_eigenvector(w)
    cos = abs(ref @ v) / (np.linalg.norm(ref) * np.linalg.norm(v))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_keeps_only_the_seed_component(rng):
    blocks = [(slice(1, 4), slice(1, 4)), (slice(8, 11), slice(10, 13))]
    feats, truth = _planted(12, 15, blocks, rng)
    res = ncut_bipartition(feats)
    first = np.zeros_like(truth)
    first[blocks[0]] = True
    second = truth & ~first
    assert np.array_equal(res.mask, first) or np.array_equal(res.mask, second)


def test_affinity_binarised_at_tau():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # columns: e0+e1 and e1 → cos = 1/sqrt(2)
    w = binary_affinity(f, 0.8, 1e-5)
    np.testing.assert_allclose(w, [[1.0, 1e-5], [1e-5, 1.0]])
    w = binary_affinity(f, 0.5, 1e-5)
    np.testing.assert_allclose(w, np.ones((2, 2)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (5, 7)])
def test_uniform_and_tiny_grids_give_empty_mask(shape):
    for feats in (torch.ones(4, *shape), torch.zeros(4, *shape)):
        res = ncut_bipartition(feats)
        assert res.mask.shape == shape and not res.mask.any()
        assert res.seed is None and np.isfinite(res.eigenvector).all()


def test_large_grid_is_pooled_and_expanded(rng):
    feats, truth = _planted(70, 90, [(slice(20, 50), slice(30, 60))], rng)
    res = ncut_bipartition(feats, SpectralConfig(max_patches=1000))
    assert res.mask.shape == (70, 90)
    iou = (res.mask & truth).sum() / (res.mask | truth).sum()
    assert iou > 0.9


def test_rejects_bad_input():
    with pytest.raises(UnsegError):
        ncut_bipartition(torch.zeros(4, 5))
    bad = torch.ones(4, 3, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(UnsegError, match="NaN"):
        ncut_bipartition(bad)
