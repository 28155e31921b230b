"""Cosine k-means against scikit-learn, seeding, chunking, determinism and bad input; the
semantic k-means method under the estimator contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans as SkKMeans
from sklearn.metrics import adjusted_rand_score

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, SemanticEstimator
from unseg.methods.kmeans import CosineKMeans, KMeans, KMeansConfig


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
    ref = SkKMeans(n_clusters=6, n_init=5, random_state=0).fit(x)
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


@pytest.mark.parametrize("field", ["n_init", "max_iter", "chunk_size"])
def test_a_count_below_one_is_refused_with_the_config(field: str) -> None:
    """`--n-init 0` ended in an AssertionError after the features, `--chunk-size 0` in a
    ValueError from range(), `--max-iter 0` fitted the k-means++ seeds without a single
    iteration: all are refused when the config is made."""
    with pytest.raises(UnsegError, match=f"{field} must be at least 1, got 0"):
        KMeansConfig(**{field: 0})


def test_a_negative_tolerance_is_refused_and_zero_kept() -> None:
    """`--tol -1` was taken silently (the iterations then never stop early)."""
    with pytest.raises(UnsegError, match="tol must be at least 0, got -1"):
        KMeansConfig(tol=-1.0)
    assert KMeansConfig(tol=0.0).tol == 0.0


def feature_maps(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """``n`` maps ``[8, 5, 6]`` of three planted directions plus noise, far from the origin."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g) + 4.0
    return [
        centers[torch.randint(0, 3, (5, 6), generator=g)].permute(2, 0, 1)
        + 0.2 * torch.randn(8, 5, 6, generator=g)
        for _ in range(n)
    ]


def test_kmeans_method_clusters_every_feature_vector_like_the_row_clusterer() -> None:
    maps = feature_maps()
    cfg = KMeansConfig(num_classes=3, seed=2)
    model = KMeans(cfg).fit(FitInputs(maps))
    assert isinstance(model, SemanticEstimator)
    rows = torch.cat([m.reshape(8, -1).T for m in maps])
    ref = CosineKMeans(cfg).fit(rows)
    torch.testing.assert_close(model.prototypes_, ref.centers_)
    assert model.history_ == [ref.inertia_]
    # logits: cosine of each (upsampled) feature vector to each centre, by brute force
    f = maps[1]
    up = torch.nn.functional.interpolate(f[None], scale_factor=2, mode="bilinear")[0]
    c = ref.centers_.numpy()
    x = up.numpy().reshape(8, -1).T
    unit = c / np.linalg.norm(c, axis=1)[:, None]
    brute = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ unit.T
    np.testing.assert_allclose(model.logits(f, 2).numpy().reshape(3, -1).T, brute, atol=1e-5)
    pred = model.predict(f, (5, 6))
    assert torch.equal(pred.reshape(-1), ref.predict(f.reshape(8, -1).T))


def test_kmeans_center_subtracts_the_fitted_mean_everywhere() -> None:
    maps = feature_maps()
    model = KMeans(KMeansConfig(num_classes=3, center=True)).fit(FitInputs(maps))
    stacked = np.concatenate([m.numpy().reshape(8, -1) for m in maps], axis=1)
    np.testing.assert_allclose(model.mean_.numpy(), stacked.mean(1), rtol=1e-5)
    centred = [m - model.mean_[:, None, None] for m in maps]
    plain = KMeans(KMeansConfig(num_classes=3)).fit(FitInputs(centred))
    torch.testing.assert_close(model.prototypes_, plain.prototypes_)
    torch.testing.assert_close(model.logits(maps[0], 2), plain.logits(centred[0], 2))
    assert "mean" not in plain.state_dict()


def test_kmeans_state_round_trip_predicts_identically(tmp_path) -> None:
    maps = feature_maps()
    cfg = KMeansConfig(num_classes=3, center=True)
    model = KMeans(cfg).fit(FitInputs(maps))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = KMeans.from_state(cfg, load_file(str(tmp_path / "w.safetensors")), device="cpu")
    for m in maps:
        assert torch.equal(again.logits(m, 3), model.logits(m, 3))
        assert torch.equal(again.predict(m, (11, 13)), model.predict(m, (11, 13)))
    with pytest.raises(UnsegError, match="lacks tensor 'mean'"):
        KMeans.from_state(cfg, {"prototypes": model.prototypes_})
    with pytest.raises(UnsegError, match="do not fit K=4"):
        KMeans.from_state(KMeansConfig(num_classes=4), model.state_dict())
    nan = {**model.state_dict(), "prototypes": model.prototypes_.clone().fill_(float("nan"))}
    with pytest.raises(UnsegError, match="'prototypes' holds NaN or infinite values"):
        KMeans.from_state(cfg, nan)
    with pytest.raises(UnsegError, match=r"mean \(5,\) does not fit the 8-channel prototypes"):
        KMeans.from_state(cfg, {**model.state_dict(), "mean": torch.zeros(5)})
    with pytest.raises(UnsegError, match="k-means: 5-channel features, but the prototypes are "
                                         "8-channel"):
        again.predict(maps[0][:5], (5, 6))
    with pytest.raises(UnsegError, match="before fit"):
        KMeans().predict(maps[0], (5, 6))
    with pytest.raises(UnsegError, match="at least one feature map"):
        KMeans().fit(FitInputs([]))
