"""Semantic metrics: confusion matrix, Hungarian matching (pixels / IoU) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, jaccard_score

from unseg.metrics.semantic import (
    ConfusionMatrix,
    hungarian_match,
    iou_matrix,
    scores_from_assignment,
    semantic_scores,
)


def _random_case(rng: np.random.Generator, n_pred: int, n_cls: int, shape=(3, 17, 13)):
    gt = rng.integers(0, n_cls, size=shape)
    # correlated prediction: a random relabelling of gt, corrupted on 40% of pixels
    perm = rng.permutation(max(n_pred, n_cls))[:n_cls] % n_pred
    pred = perm[gt]
    noise = rng.random(shape) < 0.4
    pred[noise] = rng.integers(0, n_pred, size=int(noise.sum()))
    return pred, gt


def _accumulate(pred: np.ndarray, gt: np.ndarray, n_cls: int, **kw) -> ConfusionMatrix:
    conf = ConfusionMatrix(n_cls, **kw)
    for p, g in zip(pred, gt, strict=True):
        conf.update(p, g)
    return conf


def _brute_force(score: np.ndarray) -> float:
    """Best total ``score`` ``[P, C]`` over every one-to-one matching (all permutations)."""
    n_pred, n_cls = score.shape
    if n_pred >= n_cls:  # each class picks a distinct cluster
        perms = itertools.permutations(range(n_pred), n_cls)
        pairs = (list(zip(p, range(n_cls), strict=True)) for p in perms)
    else:  # each cluster picks a distinct class
        perms = itertools.permutations(range(n_cls), n_pred)
        pairs = (list(zip(range(n_pred), c, strict=True)) for c in perms)
    return max(sum(score[p, c] for p, c in match) for match in pairs)


@pytest.mark.parametrize(("n_pred", "n_cls"), [(3, 3), (4, 4), (5, 5), (6, 4), (7, 3), (3, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_pixels_matches_brute_force(n_pred: int, n_cls: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred, gt = _random_case(rng, n_pred, n_cls)
    conf = _accumulate(pred, gt, n_cls)
    m = conf.matrix[:n_pred]
    best = _brute_force(m.astype(float))
    scores = semantic_scores(conf, "pixels")
    assert scores.acc == pytest.approx(best / gt.size, abs=1e-12)
    matched = [c for c in scores.assignment if c >= 0]
    assert len(matched) == len(set(matched)) == min(n_pred, n_cls)


@pytest.mark.parametrize(("n_pred", "n_cls"), [(3, 3), (5, 5), (6, 4), (3, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_hungarian_iou_matches_brute_force(n_pred: int, n_cls: int, seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    pred, gt = _random_case(rng, n_pred, n_cls)
    conf = _accumulate(pred, gt, n_cls)
    m = conf.matrix[:n_pred]
    iou = iou_matrix(m)
    best = _brute_force(iou)
    assignment = hungarian_match(m, "iou")
    got = sum(iou[p, c] for p, c in enumerate(assignment) if c >= 0)
    assert got == pytest.approx(best, abs=1e-12)
    # with a one-to-one matching, per-class IoU after matching is exactly the matched IoU
    scores = scores_from_assignment(m, assignment)
    for p, c in enumerate(assignment):
        if c >= 0:
            assert scores.per_class_iou[c] == pytest.approx(iou[p, c])


def test_iou_matrix_matches_direct_definition(rng: np.random.Generator) -> None:
    pred, gt = _random_case(rng, 5, 4)
    m = _accumulate(pred, gt, 4).matrix[:5]
    for p in range(5):
        for c in range(4):
            inter = np.sum((pred == p) & (gt == c))
            union = np.sum((pred == p) | (gt == c))
            assert iou_matrix(m)[p, c] == pytest.approx(inter / union)


@pytest.mark.parametrize("k", [3, 21, 27])
def test_relabelled_ground_truth_scores_one(k: int, rng: np.random.Generator) -> None:
    gt = rng.integers(0, k, size=(4, 40, 30)).astype(np.uint8)
    gt[:, :3] = 255
    perm = rng.permutation(k)
    pred = perm[gt.clip(0, k - 1)].astype(np.uint8)  # ignore pixels get some label: never counted
    for match in ("pixels", "iou"):
        s = semantic_scores(_accumulate(pred, gt, k), match)
        assert s.acc == 1.0
        assert s.miou == 1.0
        assert s.per_class_iou == [1.0] * k
        assert [s.assignment[perm[c]] for c in range(k)] == list(range(k))


def test_ignore_pixels_never_count(rng: np.random.Generator) -> None:
    pred, gt = _random_case(rng, 4, 4)
    gt = gt.astype(np.int64)
    ignore = rng.random(gt.shape) < 0.3
    gt[ignore] = 255
    a = semantic_scores(_accumulate(pred, gt, 4))
    pred2 = pred.copy()
    pred2[ignore] = rng.integers(0, 4, size=int(ignore.sum()))
    b = semantic_scores(_accumulate(pred2, gt, 4))
    assert a == b
    assert a.n_pixels == int((~ignore).sum())


def test_more_clusters_than_classes_hand_computed() -> None:
    # 2 classes; class 0 is split into clusters 0 and 2, cluster 1 is class 1
    gt = np.array([[0, 0, 0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 2, 1, 1]])
    conf = _accumulate(pred[None], gt[None], 2)
    s = semantic_scores(conf)
    assert s.assignment == [0, 1, -1]
    assert s.acc == pytest.approx(5 / 6)
    # class 0: TP 3, FN 1 (the unmatched cluster 2) → 3/4; class 1: 1.0
    assert s.per_class_iou == pytest.approx([0.75, 1.0])
    assert s.miou == pytest.approx(0.875)


def test_hand_computed_miou() -> None:
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[1, 1, 1], [0, 2, 0]])
    # best matching: cluster 1→0 (2 px), cluster 2→2 (1 px), cluster 0→1 (1 px): acc 4/6
    s = semantic_scores(_accumulate(pred[None], gt[None], 3))
    assert s.assignment == [1, 0, 2]
    assert s.acc == pytest.approx(4 / 6)
    # class 0: pred {0,1,2} gt {0,1} → 2/3; class 1: pred {3,5} gt {2,3} → 1/3;
    # class 2: pred {4} gt {4,5} → 1/2
    assert s.per_class_iou == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert s.miou == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)


def test_predicted_ignore_id_counts_as_wrong() -> None:
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 255, 1, 1]])
    s = semantic_scores(_accumulate(pred[None], gt[None], 2))
    assert s.acc == pytest.approx(3 / 4)
    assert s.per_class_iou == pytest.approx([0.5, 1.0])
    assert len(s.assignment) == 2  # id 255 is not a cluster


def test_missing_image_counts_all_pixels_wrong() -> None:
    conf = ConfusionMatrix(2)
    conf.update(np.array([[0, 1]]), np.array([[0, 1]]))
    conf.add_missing(np.array([[0, 255, 1, 1]]))
    s = semantic_scores(conf)
    assert conf.n_images == 2
    assert s.acc == pytest.approx(2 / 5)
    assert s.per_class_iou == pytest.approx([1 / 2, 1 / 3])


def test_matches_sklearn_after_remapping(rng: np.random.Generator) -> None:
    pred, gt = _random_case(rng, 6, 5, shape=(2, 31, 29))
    conf = _accumulate(pred, gt, 5)
    np.testing.assert_array_equal(
        conf.matrix, confusion_matrix(pred.ravel(), gt.ravel(), labels=range(6))[:, :5]
    )
    s = semantic_scores(conf)
    lut = np.array(s.assignment)
    mapped = lut[pred.ravel()]  # -1 for unmatched clusters: wrong for every class
    ref = jaccard_score(gt.ravel(), mapped, labels=range(5), average=None, zero_division=0)
    assert s.per_class_iou == pytest.approx(ref.tolist())
    assert s.acc == pytest.approx(np.mean(mapped == gt.ravel()))


def test_absent_class_is_nan_and_left_out() -> None:
    gt = np.array([[0, 0, 1, 1]])
    s = semantic_scores(_accumulate(gt[None], gt[None], 3))
    assert np.isnan(s.per_class_iou[2])
    assert s.miou == 1.0


def test_streaming_equals_one_shot(rng: np.random.Generator) -> None:
    pred, gt = _random_case(rng, 5, 4)
    one = ConfusionMatrix(4)
    one.update(pred.reshape(-1, pred.shape[-1]), gt.reshape(-1, gt.shape[-1]))
    np.testing.assert_array_equal(_accumulate(pred, gt, 4).matrix, one.matrix)


def test_bad_inputs_raise() -> None:
    conf = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        conf.update(np.zeros((2, 2), int), np.full((2, 2), 3))
    with pytest.raises(ValueError, match="shape"):
        conf.update(np.zeros((2, 3), int), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        conf.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="match"):
        hungarian_match(np.eye(2), "nope")  # type: ignore[arg-type]
