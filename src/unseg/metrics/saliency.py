"""Unsupervised saliency metrics: Acc and IoU at 0.5, maxFβ over 255 thresholds, MAE.

Definitions (docs/evaluation.md): ground truth binarised at 128 (``v >= 128``, ``v/255 > 0.5``;
a mask holding only 0 and 1 is read as binary, ``v > 0``);
predictions are foreground probabilities in [0, 1] at the ground truth's size, taken as they are
(no min-max rescaling). Thresholds ``t_k = k/255``, ``k = 0..254``, binarise ``p > t_k``; an empty
prediction has precision 1, an empty ground truth recall 1. ``curve`` mode averages P_t and R_t
over the images and maximises F over t; ``image-mean`` averages F per image and threshold.
Acc, IoU (``p > 0.5``) and MAE are averaged over images; IoU of an empty prediction against an
empty ground truth is 1.

maxFβ is computed from a 256-bin histogram per image: ``bin(p)`` is the number of thresholds
below ``p``, so ``p > t_k`` exactly when ``bin(p) > k`` and reverse cumulative sums give TP and FP
for all thresholds at once. For 8-bit inputs ``bin(v/255) = v``; for float inputs the bin is
``ceil(255 p)`` checked against the float64 thresholds, so the result equals the direct
definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FbetaMode = Literal["curve", "image-mean"]
NUM_THRESHOLDS = 255
THRESHOLDS = np.arange(NUM_THRESHOLDS, dtype=np.float64) / 255.0
BETA2 = 0.3
_THRESHOLDS_EXT = np.append(THRESHOLDS, np.inf)  # t[255] = inf: nothing lies above it
FOUND_BETA2 = 0.09  # FOUND/SelfMask code: (1 + beta**2) with beta = 0.3


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """Binary ground truth ``[H, W]`` bool from an 8-bit mask (``v >= 128``), a bool mask, or
    an integer mask holding only 0 and 1 (``v > 0``: a binary mask stored as 0/1, as CorLoc
    reads such masks; at 128 it was all background, and an empty prediction scored IoU 1)."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return gt
    if is_zero_one(gt):
        return gt > 0
    return gt >= 128


def is_zero_one(mask: np.ndarray) -> bool:
    """True for an integer mask whose values are 0 and 1 only (and at least one 1)."""
    return (np.issubdtype(mask.dtype, np.integer) and mask.size > 0 and int(mask.max()) == 1
            and int(mask.min()) >= 0)


def as_probability(pred: np.ndarray) -> np.ndarray:
    """A prediction as probabilities: uint8 ``v`` → ``v / 255`` (float64); floats unchanged."""
    pred = np.asarray(pred)
    if pred.dtype == np.uint8:
        return pred / 255.0
    if pred.dtype == bool:
        return pred.astype(np.float64)
    return pred.astype(np.float64, copy=False)


def threshold_bins(pred: np.ndarray) -> np.ndarray:
    """Per pixel, how many thresholds ``t_k`` lie strictly below ``p`` (0..255), int64 ``[H, W]``.

    ``p > t_k`` if and only if ``bin > k``. uint8 inputs are read as ``v / 255``.
    """
    pred = np.asarray(pred)
    if pred.dtype == np.uint8:
        return pred.astype(np.int64)
    p = as_probability(pred)
    bins = np.clip(np.ceil(p * 255.0), 0, 255).astype(np.int64)
    # ceil(255 p) can be off by one from the exact count where rounding meets a threshold:
    # enforce t[bins - 1] < p <= t[bins] against the float64 thresholds themselves
    bins -= (bins > 0) & (p <= _THRESHOLDS_EXT[bins - 1])
    bins += (bins < NUM_THRESHOLDS) & (p > _THRESHOLDS_EXT[bins])
    return bins


def fbeta(precision: np.ndarray, recall: np.ndarray, beta2: float) -> np.ndarray:
    """``(1+β²)PR / (β²P + R)`` elementwise, 0 where P = R = 0."""
    num = (1.0 + beta2) * precision * recall
    den = beta2 * precision + recall
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def _histograms(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground histograms ``[256]`` of the threshold bins of one image."""
    bins = threshold_bins(pred).ravel()
    fg = binarize_gt(gt).ravel()
    hist = np.bincount(bins + 256 * fg, minlength=512)
    return hist[:256], hist[256:]


def _pr_from_histograms(bg_hist: np.ndarray, fg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # predicted positives at t_k: pixels with bin > k, i.e. suffix sums from bin k+1
    tp = np.cumsum(fg_hist[::-1])[::-1][1:]
    fp = np.cumsum(bg_hist[::-1])[::-1][1:]
    pos = tp + fp
    n_fg = int(fg_hist.sum())
    precision = np.divide(tp, pos, out=np.ones(NUM_THRESHOLDS), where=pos > 0)
    recall = tp / n_fg if n_fg else np.ones(NUM_THRESHOLDS)
    return precision, recall


def precision_recall(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall ``[255]`` of one image at the thresholds ``k/255``.

    ``pred`` ``[H, W]`` uint8 (v/255) or float in [0, 1]; ``gt`` ``[H, W]`` bool or 8-bit.
    """
    return _pr_from_histograms(*_histograms(pred, gt))


def _binary_scores_uint8(bg_hist: np.ndarray, fg_hist: np.ndarray) -> tuple[float, float, float]:
    """Acc, IoU and MAE of an 8-bit prediction from its histograms (``v/255 > 0.5``: v >= 128)."""
    n = int(bg_hist.sum() + fg_hist.sum())
    tp, fp = int(fg_hist[128:].sum()), int(bg_hist[128:].sum())
    n_fg = int(fg_hist.sum())
    union = n_fg + fp
    acc = (tp + int(bg_hist[:128].sum())) / n
    iou = tp / union if union else 1.0
    v = np.arange(256)
    mae = float(fg_hist @ (255 - v) + bg_hist @ v) / 255.0 / n
    return acc, iou, mae


def binary_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """Acc and IoU of ``p > 0.5``, and MAE, for one image."""
    p = as_probability(pred)
    fg = binarize_gt(gt)
    binary = p > 0.5
    inter = np.count_nonzero(binary & fg)
    union = np.count_nonzero(binary | fg)
    acc = float(np.count_nonzero(binary == fg) / fg.size)
    iou = float(inter / union) if union else 1.0
    mae = float(np.abs(p - fg).mean())
    return acc, iou, mae


@dataclass
class SaliencyScores:
    """Dataset-level saliency scores (fractions in [0, 1])."""

    acc: float
    iou: float
    max_fbeta: float
    mae: float
    n_images: int
    fbeta_mode: str
    beta2: float
    best_threshold: float


class SaliencyMeter:
    """Streaming saliency evaluation: call :meth:`update` per image, then :meth:`scores`."""

    def __init__(self, beta2: float = BETA2, fbeta_mode: FbetaMode = "curve") -> None:
        if fbeta_mode not in ("curve", "image-mean"):
            raise ValueError(f"fbeta_mode must be 'curve' or 'image-mean', got {fbeta_mode!r}")
        if beta2 <= 0:
            raise ValueError(f"beta2 must be > 0, got {beta2}")
        self.beta2 = beta2
        self.fbeta_mode = fbeta_mode
        self.sum_precision = np.zeros(NUM_THRESHOLDS)
        self.sum_recall = np.zeros(NUM_THRESHOLDS)
        self.sum_f = np.zeros(NUM_THRESHOLDS)
        self.sum_acc = self.sum_iou = self.sum_mae = 0.0
        self.n_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` ``[H, W]`` (uint8 or float in [0, 1]), ``gt`` same shape."""
        pred = np.asarray(pred)
        if pred.shape != np.shape(gt):
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {np.shape(gt)}")
        if pred.dtype != np.uint8 and pred.size and not (
            np.isfinite(pred).all() and pred.min() >= 0 and pred.max() <= 1
        ):
            raise ValueError("float predictions must lie in [0, 1] (and not be NaN)")
        hists = _histograms(pred, gt)
        precision, recall = _pr_from_histograms(*hists)
        self.sum_precision += precision
        self.sum_recall += recall
        self.sum_f += fbeta(precision, recall, self.beta2)
        if pred.dtype == np.uint8:
            acc, iou, mae = _binary_scores_uint8(*hists)
        else:
            acc, iou, mae = binary_scores(pred, gt)
        self.sum_acc += acc
        self.sum_iou += iou
        self.sum_mae += mae
        self.n_images += 1

    def fbeta_curve(self) -> np.ndarray:
        """Fβ at each threshold ``[255]`` in the meter's mode."""
        n = max(self.n_images, 1)
        if self.fbeta_mode == "curve":
            return fbeta(self.sum_precision / n, self.sum_recall / n, self.beta2)
        return self.sum_f / n

    def scores(self) -> SaliencyScores:
        """The dataset-level scores (NaN when no image was added)."""
        n = self.n_images
        if n == 0:
            nan = float("nan")
            return SaliencyScores(nan, nan, nan, nan, 0, self.fbeta_mode, self.beta2, nan)
        curve = self.fbeta_curve()
        best = int(np.argmax(curve))
        return SaliencyScores(
            acc=self.sum_acc / n,
            iou=self.sum_iou / n,
            max_fbeta=float(curve[best]),
            mae=self.sum_mae / n,
            n_images=n,
            fbeta_mode=self.fbeta_mode,
            beta2=self.beta2,
            best_threshold=float(THRESHOLDS[best]),
        )
