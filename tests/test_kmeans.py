"""Cosine k-means against scikit-learn, seeding, chunking, determinism and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from unseg.errors import UnsegError
from unseg.methods.kmeans import CosineKMeans, KMeansConfig


def sphere_blobs(n: int = 3000, k: int = 6, dim: int = 16, noise: float = 0.25, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim))
    labels = rng.integers(0, k, size=n)
    x = centers[labels] + noise * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def sse(x: np.ndarray, labels: np.ndarray) -> float:
    """Euclidean within-cluster sum of squares of a partition (scikit-learn's inertia)."""
    parts = [x[labels == c] for c in np.unique(labels)]
    return float(sum(((p - p.mean(0)) ** 2).sum() for p in parts))


def test_matches_scikit_learn_inertia_within_one_percent() -> None:
    x, truth = sphere_blobs()
    ours = CosineKMeans(KMeansConfig(num_classes=6, n_init=3, seed=0)).fit(torch.from_numpy(x))
    pred = ours.predict(torch.from_numpy(x)).numpy()
    ref = KMeans(n_clusters=6, n_init=5, random_state=0).fit(x)
    # on unit vectors, a partition's Euclidean SSE is what scikit-learn minimises
    assert sse(x, pred) <= ref.inertia_ * 1.01
    assert adjusted_rand_score(ref.labels_, pred) > 0.98
    assert adjusted_rand_score(truth, pred) > 0.98


def test_inertia_is_the_cosine_cost_of_the_final_assignment() -> None:
    x, _ = sphere_blobs(n=500)
    km = CosineKMeans(KMeansConfig(num_classes=6, seed=1)).fit(torch.from_numpy(x))
    c = km.centers_.numpy()
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    brute = (1.0 - (x @ c.T).max(axis=1)).sum()
    assert km.inertia_ == pytest.approx(brute, rel=1e-4)


def test_chunking_does_not_change_the_result() -> None:
    x, _ = sphere_blobs(n=1000)
    a = CosineKMeans(KMeansConfig(num_classes=6, chunk_size=65536)).fit(torch.from_numpy(x))
    b = CosineKMeans(KMeansConfig(num_classes=6, chunk_size=97)).fit(torch.from_numpy(x))
    torch.testing.assert_close(a.centers_, b.centers_)


def test_fixed_seed_gives_identical_runs_and_scale_is_ignored() -> None:
    x, _ = sphere_blobs(n=800)
    t = torch.from_numpy(x)
    a = CosineKMeans(KMeansConfig(num_classes=5, seed=3)).fit(t)
    b = CosineKMeans(KMeansConfig(num_classes=5, seed=3)).fit(t)
    assert torch.equal(a.centers_, b.centers_)
    c = CosineKMeans(KMeansConfig(num_classes=5, seed=3)).fit(t * 7.0)
    torch.testing.assert_close(a.centers_, c.centers_)


def test_init_is_used_and_one_pass_is_one_lloyd_step() -> None:
    x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    init = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    km = CosineKMeans(KMeansConfig(num_classes=2)).fit(x, init=init, max_iter=1)
    # first pass: point 2 and 3 go to [0,1] (cos 0.995 > 0.77); points 0,1 to [1,1]
    expect = torch.nn.functional.normalize(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), dim=1)
    torch.testing.assert_close(km.centers_, expect, atol=1e-3, rtol=0)


def test_bad_input_is_a_clear_error() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(UnsegError, match="at least 2"):
        CosineKMeans(KMeansConfig(num_classes=1)).fit(x)
    with pytest.raises(UnsegError, match="larger than the number of feature vectors"):
        CosineKMeans(KMeansConfig(num_classes=11)).fit(x)
    with pytest.raises(UnsegError, match="before fit"):
        CosineKMeans().predict(x)
