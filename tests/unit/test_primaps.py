"""PriMaPs proposals: planted clusters, stopping rules, principal direction, filtering."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import adjusted_rand_score

from unseg.errors import UnsegError
from unseg.proposals.primaps import (
    PriMaPsConfig,
    first_principal_direction,
    gram_principal_direction,
    ids_from_argmax,
    median_filter,
    primaps_pseudo_labels,
    principal_masks,
    proposal_log_probs,
)


def planted(
    channels: int = 32, size: int = 24, noise: float = 0.15, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """Features ``[C, size, size]`` with four planted regions (uneven sizes), and the region map."""
    g = torch.Generator().manual_seed(seed)
    regions = np.zeros((size, size), dtype=np.int64)
    regions[: size // 2, size // 3 :] = 1
    regions[size // 2 :, : 2 * size // 3] = 2
    regions[size // 2 :, 2 * size // 3 :] = 3
    centers = torch.randn(4, channels, generator=g) * 2.0 + 1.0
    noise_map = noise * torch.randn(size, size, channels, generator=g)
    feats = centers[torch.from_numpy(regions)] + noise_map
    return feats.permute(2, 0, 1).contiguous(), regions


def test_planted_clusters_are_recovered_as_proposals() -> None:
    feats, regions = planted()
    props = principal_masks(feats)
    assert props.masks.ndim == 3 and props.masks.shape[1:] == regions.shape
    assert props.masks.min() >= 0 and props.masks.max() <= 1
    assert props.masks.shape[0] >= 4
    hard = props.masks.argmax(dim=0).numpy()
    covered = props.masks.sum(dim=0).numpy() > 0
    assert adjusted_rand_score(regions[covered], hard[covered]) > 0.95
    assert covered.mean() >= 0.95


def test_pseudo_labels_match_planted_regions_at_image_resolution() -> None:
    feats, regions = planted(size=16)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    labels = primaps_pseudo_labels([image], [feats], PriMaPsConfig(refine="none"))[0]
    assert labels.shape == (64, 64) and labels.dtype == torch.int64
    truth = np.kron(regions, np.ones((4, 4), dtype=np.int64))
    keep = labels.numpy() != 255
    assert keep.mean() > 0.8
    assert adjusted_rand_score(truth[keep], labels.numpy()[keep]) > 0.9


def test_coverage_rule_fires_at_95_percent() -> None:
    feats, _ = planted()
    props = principal_masks(feats)
    assert props.stop == "coverage"
    used = (props.masks > 0).any(dim=0).float().mean().item()
    assert used >= 0.95
    # one proposal fewer would not have reached the coverage
    before = (props.masks[:-1] > 0).any(dim=0).float().mean().item()
    assert before < 0.95


def test_unchanged_rule_fires_on_features_that_cannot_be_covered() -> None:
    feats, _ = planted()
    feats[:, :, :6] = 0.0  # a quarter of the positions: zero vectors never join a proposal
    props = principal_masks(feats)
    assert props.stop == "unchanged"
    used = (props.masks > 0).any(dim=0).float().mean().item()
    assert used < 0.95
    # the available set after the last proposal stayed the same for `patience` recorded
    # iterations (as the reference's three-entry mask memory), i.e. patience - 1 empty ones
    assert props.iterations == props.masks.shape[0] + PriMaPsConfig().patience - 1


def test_patience_parameter_changes_when_the_rule_fires() -> None:
    feats, _ = planted()
    feats[:, :, :6] = 0.0
    a = principal_masks(feats, PriMaPsConfig(patience=3))
    b = principal_masks(feats, PriMaPsConfig(patience=5))
    assert b.iterations == a.iterations + 2
    assert torch.equal(a.masks, b.masks)


def _spread_rows(n: int, c: int, seed: int) -> torch.Tensor:
    """``n`` random rows ``[n, c]`` off the origin (mean 5) whose spread falls from 3 in the first
    channel to 0.1 in the last: a clear first principal direction."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.linspace(3, 0.1, c) + 5.0


def _assert_first_svd_direction(x: torch.Tensor, v: torch.Tensor) -> None:
    """``v`` is (up to sign) the first right singular vector of ``x`` ``[n, c]`` centred, by
    float64 SVD."""
    xc = x.double().numpy() - x.double().numpy().mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    assert abs(float(np.dot(vt[0], v.double().numpy()))) > 1 - 1e-6


@pytest.mark.parametrize("n", [500, 20])
def test_first_principal_direction_agrees_with_exact_svd(n: int) -> None:
    x = _spread_rows(n, 48, seed=1)
    v = first_principal_direction(x)
    _assert_first_svd_direction(x, v)
    torch.manual_seed(0)
    v_ref = first_principal_direction(x, solver="lowrank", niter=100)
    assert abs(float(torch.dot(v, v_ref))) > 1 - 1e-4


def test_reanchoring_makes_anchor_a_real_feature_with_similarity_one() -> None:
    feats, _ = planted()
    masks = principal_masks(feats).masks
    # each proposal peaks at exactly 1 (its anchor) and respects the 0.4 threshold
    for m in masks:
        nz = m[m > 0]
        assert torch.isclose(nz.max(), torch.tensor(1.0))
        assert nz.min() >= 0.4 - 1e-6


def test_median_filter_matches_scipy_mirror_mode() -> None:
    g = torch.Generator().manual_seed(2)
    m = torch.rand(3, 9, 11, generator=g)
    ours = median_filter(m, 3).numpy()
    ref = np.stack([ndimage.median_filter(c, size=3, mode="mirror") for c in m.numpy()])
    np.testing.assert_allclose(ours, ref)


def test_background_channel_and_log_softmax_by_hand() -> None:
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1.0
    masks[1, 2:, :2] = 0.05  # gain 10 → 0.5
    lp = proposal_log_probs(masks, PriMaPsConfig(median_kernel=1))
    assert lp.shape == (3, 4, 4)
    level = (8 * 1.0 + 4 * 0.5) / 12  # mean of the non-zero filtered values
    bg = torch.tensor(level) - torch.stack([masks[0], masks[1] * 10]).sum(0)
    expect = torch.log_softmax(torch.stack([bg.clamp(0, 1), masks[0], masks[1] * 10]), dim=0)
    torch.testing.assert_close(lp, expect)
    assert torch.allclose(lp.exp().sum(0), torch.ones(4, 4))


def test_background_id_becomes_ignore() -> None:
    ids = ids_from_argmax(torch.tensor([[0, 1], [2, 0]]), ignore_index=255)
    assert ids.tolist() == [[255, 0], [1, 255]]


def test_crf_path_runs_and_keeps_regions() -> None:
    feats, regions = planted(size=16)
    colours = np.array([[20, 20, 20], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    image = np.ascontiguousarray(colours[np.kron(regions, np.ones((4, 4), dtype=np.int64))])
    labels = primaps_pseudo_labels([image], [feats], PriMaPsConfig(refine="crf"))[0].numpy()
    truth = np.kron(regions, np.ones((4, 4), dtype=np.int64))
    keep = labels != 255
    assert keep.mean() > 0.8
    assert adjusted_rand_score(truth[keep], labels[keep]) > 0.9


def test_bad_feature_shape_is_a_clear_error() -> None:
    with pytest.raises(UnsegError, match=r"\[C, h, w\]"):
        principal_masks(torch.zeros(4, 4))


def test_incremental_exact_solver_gives_the_reference_solvers_proposals() -> None:
    feats, _ = planted()
    fast = principal_masks(feats, PriMaPsConfig(solver="eigh"))
    torch.manual_seed(0)
    ref = principal_masks(feats, PriMaPsConfig(solver="lowrank", lowrank_niter=100))
    assert fast.masks.shape == ref.masks.shape
    torch.testing.assert_close(fast.masks, ref.masks, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [20, 3])
def test_gram_direction_agrees_with_exact_svd_when_rows_are_fewer_than_channels(n: int) -> None:
    x = _spread_rows(n, 300, seed=2)
    v = gram_principal_direction(x)
    assert abs(float(np.linalg.norm(v.double().numpy())) - 1) < 1e-6
    _assert_first_svd_direction(x, v)


def test_gram_direction_of_equal_rows_is_zero() -> None:
    assert torch.equal(gram_principal_direction(torch.ones(5, 40)), torch.zeros(40))


@pytest.mark.parametrize("channels", [200, 600])
def test_more_channels_than_positions_gives_the_reference_solvers_proposals(
    channels: int,
) -> None:
    # 16x16 = 256 positions: 200 channels switch from the covariance to the Gram matrix
    # part-way, 600 use the Gram matrix from the start
    feats, _ = planted(channels=channels, size=16)
    fast = principal_masks(feats, PriMaPsConfig(solver="eigh"))
    torch.manual_seed(0)
    ref = principal_masks(feats, PriMaPsConfig(solver="lowrank", lowrank_niter=100))
    assert fast.masks.shape == ref.masks.shape
    torch.testing.assert_close(fast.masks, ref.masks, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_first_pseudo_labels_of_a_process_on_a_gpu_from_several_threads() -> None:
    """torch loads its CUDA linear algebra at a process's first ``torch.linalg`` call on a GPU,
    and not thread-safely: threads making that first call at once used to fail ("lazy wrapper
    should be called at most once"). A fresh process, so that the load has not happened yet."""
    code = textwrap.dedent("""
        import numpy as np, torch
        from unseg.proposals.primaps import PriMaPsConfig, primaps_pseudo_labels
        g = torch.Generator().manual_seed(0)
        feats = [torch.randn(256, 10, 10, generator=g).cuda() for _ in range(8)]
        images = [np.zeros((40, 40, 3), np.uint8)] * 8
        labels = primaps_pseudo_labels(images, feats, PriMaPsConfig(refine="none"),
                                       num_workers=4)
        print(len(labels), tuple(labels[0].shape))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["8", "(40,", "40)"]
