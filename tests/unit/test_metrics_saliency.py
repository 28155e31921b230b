"""Saliency metrics: hand-computed cases, a direct per-threshold loop, and pysodmetrics on ECSSD."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from unseg.data.image import load_label
from unseg.metrics.saliency import (
    THRESHOLDS,
    SaliencyMeter,
    binary_scores,
    fbeta,
    precision_recall,
    threshold_bins,
)


def _direct_pr(p: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The definition: binarise ``p > k/255`` for each threshold, count."""
    fg = gt >= 128
    precision, recall = [], []
    for t in np.arange(255) / 255.0:
        b = p > t
        tp = np.count_nonzero(b & fg)
        precision.append(tp / b.sum() if b.any() else 1.0)
        recall.append(tp / fg.sum() if fg.any() else 1.0)
    return np.array(precision), np.array(recall)


def test_thresholds_are_k_over_255() -> None:
    assert THRESHOLDS.shape == (255,)
    assert THRESHOLDS[0] == 0.0
    assert THRESHOLDS[-1] == 254 / 255


def test_uint8_bins_are_the_values() -> None:
    v = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(threshold_bins(v), v)
    # v/255 > k/255 exactly when v > k
    np.testing.assert_array_equal(threshold_bins(v / 255.0), v)


def test_float_bins_equal_a_search_in_the_thresholds(rng: np.random.Generator) -> None:
    t = np.arange(255) / 255.0
    vals = np.concatenate([
        rng.random(200_000), t, np.nextafter(t, 2), np.nextafter(t, -1), [0.0, 1.0],
        t.astype(np.float32).astype(np.float64), np.arange(256) / 255.0 * (1 - 1e-16),
    ])
    vals = np.clip(vals, 0, 1)
    np.testing.assert_array_equal(threshold_bins(vals), np.searchsorted(t, vals, side="left"))


def test_histogram_equals_direct_loop_for_resized_float_predictions(
    rng: np.random.Generator,
) -> None:
    gt = np.zeros((37, 53), np.uint8)
    gt[8:30, 10:40] = 255
    small = rng.integers(0, 256, size=(13, 19)).astype(np.float64) / 255.0
    p = np.clip(cv2.resize(small, (53, 37), interpolation=cv2.INTER_LINEAR), 0, 1)
    # values exactly on thresholds and one ulp either side of them
    k = rng.integers(0, 255, size=60)
    edge = np.concatenate([k / 255.0, np.nextafter(k / 255.0, 2), np.nextafter(k / 255.0, -1)])
    p.flat[: edge.size] = np.clip(edge, 0, 1)
    for pred in (p, p.astype(np.float32)):
        got_p, got_r = precision_recall(pred, gt)
        ref_p, ref_r = _direct_pr(pred.astype(np.float64), gt)
        np.testing.assert_array_equal(got_p, ref_p)
        np.testing.assert_array_equal(got_r, ref_r)


def test_hand_computed_soft_prediction() -> None:
    gt = np.array([[255, 255, 0, 0]], np.uint8)
    pred = np.array([[200, 100, 150, 0]], np.uint8)
    precision, recall = precision_recall(pred, gt)
    # t < 100/255: predicted {200, 100, 150} → P 2/3, R 1
    assert precision[0] == pytest.approx(2 / 3) and recall[0] == 1.0
    assert precision[99] == pytest.approx(2 / 3)
    # 100/255 <= t < 150/255: {200, 150} → P 1/2, R 1/2
    assert precision[100] == pytest.approx(1 / 2) and recall[100] == pytest.approx(1 / 2)
    # 150/255 <= t < 200/255: {200} → P 1, R 1/2
    assert precision[150] == 1.0 and recall[199] == pytest.approx(1 / 2)
    # t >= 200/255: empty prediction → precision 1, recall 0
    assert precision[200] == 1.0 and recall[254] == 0.0
    f = fbeta(precision, recall, 0.3)
    assert f[0] == pytest.approx(1.3 * (2 / 3) / (0.3 * 2 / 3 + 1))
    assert f[150] == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
    assert f[100] == pytest.approx(0.5)
    assert f.max() == pytest.approx(0.8125)  # P 1, R 1/2
    acc, iou, mae = binary_scores(pred, gt)  # p > 0.5: {200, 150}
    assert acc == pytest.approx(2 / 4)
    assert iou == pytest.approx(1 / 3)
    assert mae == pytest.approx((55 + 155 + 150 + 0) / 255 / 4)


def test_empty_prediction_and_empty_ground_truth() -> None:
    gt = np.array([[255, 0, 0, 0]], np.uint8)
    precision, recall = precision_recall(np.zeros((1, 4), np.uint8), gt)
    assert (precision == 1.0).all() and (recall == 0.0).all()
    assert (fbeta(precision, recall, 0.3) == 0.0).all()
    assert binary_scores(np.zeros((1, 4), np.uint8), gt) == (0.75, 0.0, 0.25)
    empty_gt = np.zeros((1, 4), np.uint8)
    precision, recall = precision_recall(np.array([[0, 0, 9, 0]], np.uint8), empty_gt)
    assert (recall == 1.0).all()
    assert precision[0] == 0.0 and precision[9] == 1.0
    # both empty at 0.5: IoU 1 (perfect agreement)
    assert binary_scores(np.zeros((1, 4), np.uint8), empty_gt) == (1.0, 1.0, 0.0)


def test_modes_and_beta2_variant_hand_computed() -> None:
    # image A: perfect at every threshold below 255/255; image B: always empty prediction
    gt_a, pred_a = np.array([[255, 0]], np.uint8), np.array([[255, 0]], np.uint8)
    gt_b, pred_b = np.array([[255, 0]], np.uint8), np.array([[0, 0]], np.uint8)
    curve, mean, found = (
        SaliencyMeter(fbeta_mode="curve"),
        SaliencyMeter(fbeta_mode="image-mean"),
        SaliencyMeter(beta2=0.09, fbeta_mode="curve"),
    )
    for meter in (curve, mean, found):
        meter.update(pred_a, gt_a)
        meter.update(pred_b, gt_b)
    # curve: mean P = (1 + 1)/2 = 1, mean R = (1 + 0)/2 = 0.5 → F = 1.3*0.5/(0.3 + 0.5)
    assert curve.scores().max_fbeta == pytest.approx(1.3 * 0.5 / 0.8)
    # image-mean: F_A = 1, F_B = 0 → 0.5
    assert mean.scores().max_fbeta == pytest.approx(0.5)
    # FOUND/SelfMask β² = 0.09: 1.09*0.5/(0.09 + 0.5)
    assert found.scores().max_fbeta == pytest.approx(1.09 * 0.5 / 0.59)
    s = curve.scores()
    assert (s.acc, s.iou, s.mae, s.n_images) == (pytest.approx(0.75), 0.5, 0.25, 2)
    assert (s.fbeta_mode, s.beta2) == ("curve", 0.3)


def test_predictions_are_not_rescaled() -> None:
    gt = np.array([[255, 0]], np.uint8)
    low = np.array([[100, 50]], np.uint8)  # min-max rescaling would make this perfect
    acc, iou, mae = binary_scores(low, gt)
    assert (acc, iou) == (0.5, 0.0)
    assert mae == pytest.approx((155 / 255 + 50 / 255) / 2)


def test_meter_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        SaliencyMeter().update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SaliencyMeter().update(np.full((2, 2), np.nan), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SaliencyMeter().update(np.full((2, 2), 2.0), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="fbeta_mode"):
        SaliencyMeter(fbeta_mode="max")  # type: ignore[arg-type]


def _perturb(gt: np.ndarray, rng: np.random.Generator, soft: bool) -> np.ndarray:
    """A never-empty prediction holding both 0 and 255 (so min-max rescaling is a no-op)."""
    h, w = gt.shape
    fg = (gt >= 128).astype(np.uint8)
    kernel = np.ones((int(rng.integers(3, 15)),) * 2, np.uint8)
    fg = cv2.dilate(fg, kernel) if rng.random() < 0.5 else cv2.erode(fg, kernel)
    fg = np.roll(fg, (int(rng.integers(-20, 20)), int(rng.integers(-20, 20))), axis=(0, 1))
    flip = rng.random((h, w)) < 0.02
    fg[flip] = 1 - fg[flip]
    pred = fg.astype(np.uint8) * 255
    if soft:
        blur = cv2.GaussianBlur(pred.astype(np.float64), (0, 0), float(rng.uniform(1, 6)))
        noise = rng.normal(0, 25, size=(h, w))
        pred = np.clip(np.round(blur + noise), 0, 255).astype(np.uint8)
    pred[0, 0], pred[-1, -1] = 0, 255
    return pred


@pytest.mark.realdata
@pytest.mark.parametrize("soft", [False, True])
def test_against_pysodmetrics_on_ecssd(shared_data, soft: bool) -> None:
    py_sod_metrics = pytest.importorskip("py_sod_metrics")
    root = shared_data("ECSSD")
    masks = sorted((root / "ground_truth_mask").glob("*.png"))[::10]
    rng = np.random.default_rng(1 if soft else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm, fm09 = py_sod_metrics.Fmeasure(), py_sod_metrics.Fmeasure(beta=0.09)
    mae = py_sod_metrics.MAE()
    curve, mean = SaliencyMeter(), SaliencyMeter(fbeta_mode="image-mean")
    found, found_mean = SaliencyMeter(beta2=0.09), SaliencyMeter(0.09, "image-mean")
    for path in masks:
        gt = load_label(path)
        pred = _perturb(gt, rng, soft)
        for m in (fm, fm09, mae):
            m.step(pred=pred, gt=gt)
        for m in (curve, mean, found, found_mean):
            m.update(pred, gt)
    ref = fm.get_results()
    # pysodmetrics index i is the threshold v >= 255 - i; ours k is v > k, i.e. index 254 - k
    # (its extra index 255, "every pixel positive", is not one of the 255 thresholds)
    ref_image_mean = ref["fm"]["curve"][:255][::-1]
    ref_curve = fbeta(ref["pr"]["p"][:255][::-1], ref["pr"]["r"][:255][::-1], 0.3)
    np.testing.assert_allclose(mean.fbeta_curve(), ref_image_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.fbeta_curve(), ref_curve, rtol=0, atol=1e-12)
    assert mean.scores().max_fbeta == pytest.approx(ref_image_mean.max(), abs=1e-12)
    assert curve.scores().max_fbeta == pytest.approx(ref_curve.max(), abs=1e-12)
    assert found.scores().max_fbeta == pytest.approx(
        fbeta(ref["pr"]["p"][:255], ref["pr"]["r"][:255], 0.09).max(), abs=1e-12
    )
    np.testing.assert_allclose(
        found_mean.fbeta_curve(), fm09.get_results()["fm"]["curve"][:255][::-1], atol=1e-12
    )
    assert curve.scores().mae == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert curve.scores().max_fbeta < 1.0  # the perturbation really perturbs



def test_uint8_histogram_path_equals_direct_scores(rng: np.random.Generator) -> None:
    for _ in range(20):
        gt = (rng.random((23, 31)) < rng.uniform(0, 1)).astype(np.uint8) * 255
        pred = rng.integers(0, 256, size=gt.shape).astype(np.uint8)
        if rng.random() < 0.3:
            pred = np.where(rng.random(gt.shape) < 0.5, 0, 255).astype(np.uint8)
        fast, direct = SaliencyMeter(), SaliencyMeter()
        fast.update(pred, gt)  # uint8: Acc/IoU/MAE from the histograms
        direct.update(pred / 255.0, gt)  # float: the direct definitions
        a, b = fast.scores(), direct.scores()
        assert (a.acc, a.iou) == (b.acc, b.iou)
        assert a.mae == pytest.approx(b.mae, abs=1e-12)
        assert a.max_fbeta == b.max_fbeta
