"""``unseg evaluate``'s protocols on masks held in memory (a notebook's evaluation).

Predictions are arrays (what :meth:`unseg.Segmenter.predict` returns); ground truth is arrays,
PIL images or label files (read as ``unseg evaluate`` reads them: raw PNG values, palette
indices). A prediction at another size than its ground truth is resized to it as ``unseg
evaluate`` resizes a file: nearest for class ids, bilinear for saliency maps. The dataset-specific
steps of the command (COCO-Stuff / Cityscapes label mapping and their 320 centre crop) need a
dataset layout and are the command's only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from unseg.data.image import load_label
from unseg.data.resize import resize_nearest, resize_probability
from unseg.errors import UnsegError
from unseg.metrics.corloc import corloc
from unseg.metrics.saliency import BETA2, FbetaMode, SaliencyMeter, SaliencyScores
from unseg.metrics.semantic import ConfusionMatrix, MatchMode, SemanticScores, semantic_scores

PRED_IGNORE = 255  # a predicted "no label" (PriMaPs'): counted wrong, never matched


def _paired(predictions: Sequence[Any], ground_truth: Sequence[Any]) -> None:
    if isinstance(predictions, (str, Path)) or isinstance(ground_truth, (str, Path)):
        raise UnsegError("give lists (one prediction and one ground truth per image); "
                         "for folders of files use `unseg evaluate`")
    if len(predictions) != len(ground_truth):
        raise UnsegError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth "
                         "maps: give one of each per image, in the same order")
    if not len(predictions):
        raise UnsegError("no predictions to score")


def _truth(item: Any, i: int) -> np.ndarray:
    """Ground truth ``i`` as its stored values ``[H, W]``."""
    if isinstance(item, (str, Path)):
        return load_label(item)
    arr = np.asarray(item)
    if arr.ndim != 2:
        raise UnsegError(f"ground truth {i}: expected an [H, W] label map, got shape "
                         f"{arr.shape}")
    return arr


def _prediction(item: Any, i: int, integer: bool) -> np.ndarray:
    arr = np.asarray(item)
    if arr.ndim != 2:
        raise UnsegError(f"prediction {i}: expected an [H, W] map, got shape {arr.shape}")
    if integer and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise UnsegError(f"prediction {i}: class ids must be integers, got {arr.dtype}")
    return arr


def score_semantic(
    predictions: Sequence[Any],
    ground_truth: Sequence[Any],
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    match: MatchMode = "pixels",
) -> SemanticScores:
    """Hungarian-matched pixel accuracy and mIoU of class-id maps ``[H, W]`` against label
    maps, matched once over the whole set (``unseg evaluate semantic``'s protocol).

    ``num_classes``: the ground truth's classes (default: its largest label other than
    ``ignore_index``, plus one); ``match``: ``"pixels"`` (STEGO / PriMaPs) or ``"iou"``
    (MaskContrast). A predicted 255 counts as wrong. Scores are fractions in [0, 1].
    """
    _paired(predictions, ground_truth)
    if match not in ("pixels", "iou"):
        raise UnsegError(f"match must be 'pixels' or 'iou', got {match!r}")
    truths = [_truth(g, i) for i, g in enumerate(ground_truth)]
    if num_classes is None:
        valid = [t[t != ignore_index] if ignore_index is not None else t for t in truths]
        num_classes = max((int(v.max()) + 1 for v in valid if v.size), default=1)
    if num_classes < 1:
        raise UnsegError(f"num_classes must be at least 1, got {num_classes}")
    conf = ConfusionMatrix(num_classes, ignore_index=ignore_index, pred_ignore=PRED_IGNORE)
    for i, (pred, truth) in enumerate(zip(predictions, truths, strict=True)):
        p = _prediction(pred, i, integer=True)
        if p.shape != truth.shape:
            p = resize_nearest(p, truth.shape)
        try:
            conf.update(p, truth)
        except ValueError as exc:
            raise UnsegError(f"image {i}: {exc}") from None
    return semantic_scores(conf, match)


def _probability(p: np.ndarray, size: tuple[int, int], i: int) -> np.ndarray:
    """Saliency map ``i`` (uint8, bool or float in [0, 1]) at ``size``, as the meter takes it."""
    if p.dtype == bool:
        p = p.astype(np.uint8) * 255
    if p.dtype == np.uint8:
        return p if p.shape == size else resize_probability(p, size)
    if not np.issubdtype(p.dtype, np.floating):
        raise UnsegError(f"prediction {i}: a saliency map is uint8 (0-255), bool or float in "
                         f"[0, 1], got {p.dtype}")
    p = p.astype(np.float64)
    if p.size and not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise UnsegError(f"prediction {i}: float saliency maps must lie in [0, 1]")
    if p.shape != size:
        p = np.clip(cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_LINEAR), 0, 1)
    return p


def score_saliency(
    predictions: Sequence[Any],
    ground_truth: Sequence[Any],
    fbeta_mode: FbetaMode = "curve",
    beta2: float = BETA2,
) -> SaliencyScores:
    """Acc, IoU (at 0.5), maxFβ and MAE of saliency maps ``[H, W]`` (uint8 as the masks
    :meth:`~unseg.Segmenter.predict` returns, or float in [0, 1]) against masks (binarised at
    128), averaged over images (``unseg evaluate saliency``'s protocol)."""
    _paired(predictions, ground_truth)
    try:
        meter = SaliencyMeter(beta2=beta2, fbeta_mode=fbeta_mode)
    except ValueError as exc:
        raise UnsegError(str(exc)) from None
    for i, (pred, gt) in enumerate(zip(predictions, ground_truth, strict=True)):
        truth = _truth(gt, i)
        meter.update(_probability(_prediction(pred, i, integer=False), truth.shape, i), truth)
    return meter.scores()


def score_corloc(
    boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[Sequence[float]]]
) -> float:
    """CorLoc: the fraction of images whose box ``[x0, y0, x1, y1]`` (or None: a miss) has
    IoU of at least 0.5 with one of the image's ground-truth boxes (the boxes of
    :meth:`~unseg.Segmenter.predict_boxes`; pixel edges, ``x1`` one past the last column)."""
    _paired(boxes, gt_boxes)
    try:
        return corloc(boxes, gt_boxes)
    except ValueError as exc:
        raise UnsegError(str(exc)) from None
