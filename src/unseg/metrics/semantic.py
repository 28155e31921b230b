"""Unsupervised semantic segmentation metrics: a streaming confusion matrix and Hungarian matching.

Protocol (STEGO/PriMaPs): one confusion matrix (predicted id × ground-truth class, pixel counts)
is accumulated over the whole evaluation set; ground-truth pixels equal to ``ignore_index`` are
skipped. Clusters are matched to classes once, for the whole set, with
:func:`scipy.optimize.linear_sum_assignment`, maximising either the matched pixel count
(``match="pixels"``, STEGO/PriMaPs) or the summed IoU (``match="iou"``, MaskContrast's
``linear_sum_assignment(N - IoU)``). A cluster left without a class (more clusters than classes)
counts as wrong.

Predicted "no label" pixels (a prediction equal to ``pred_ignore``, 255 by default, e.g. PriMaPs'
ignore label) and the pixels of missing predictions are *not* dropped: they go to an extra
"unassigned" row that is never matched, so they count as wrong (false negatives of their class).
In ``match="iou"`` they are in their class's union, as in MaskContrast's IoU (its
``segmentation/utils/kmeans_utils.py``), whose own predictions never hold 255 (its zero-filled
remap would score such a pixel as class 0, i.e. as background on VOC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

MatchMode = Literal["pixels", "iou"]


class ConfusionMatrix:
    """Streaming confusion matrix ``[num_pred_ids, num_classes]`` of pixel counts.

    Rows are predicted ids ``0..max id seen`` (grown as needed, so predictions may use more ids
    than there are classes); :attr:`unassigned` ``[num_classes]`` counts the valid pixels whose
    prediction is ``pred_ignore`` or missing.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = 255, pred_ignore: int | None = 255
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pred_ignore = pred_ignore
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unassigned = np.zeros(num_classes, dtype=np.int64)
        self.n_images = 0

    def _valid_gt(self, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        gt = np.asarray(gt).ravel()
        valid = None if self.ignore_index is None else gt != self.ignore_index
        labels = gt if valid is None else gt[valid]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = sorted({int(v) for v in np.unique(labels) if v < 0 or v >= self.num_classes})
            raise ValueError(
                f"ground-truth labels {bad[:10]} are outside 0..{self.num_classes - 1} "
                f"(ignore index: {self.ignore_index})"
            )
        return labels.astype(np.int64), valid

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``pred`` and ``gt`` are integer arrays of the same shape ``[H, W]``."""
        pred = np.asarray(pred)
        if pred.shape != np.shape(gt):
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {np.shape(gt)}")
        if not np.issubdtype(pred.dtype, np.integer):
            raise ValueError(f"predictions must be integer ids, got dtype {pred.dtype}")
        labels, valid = self._valid_gt(gt)
        ids = pred.ravel() if valid is None else pred.ravel()[valid]
        ids = ids.astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError("predicted ids must be >= 0")
        c = self.num_classes
        if self.pred_ignore is not None:
            none = ids == self.pred_ignore
            if none.any():
                self.unassigned += np.bincount(labels[none], minlength=c)
                ids, labels = ids[~none], labels[~none]
        if ids.size:
            rows = max(self.matrix.shape[0], int(ids.max()) + 1)
            counts = np.bincount(ids * c + labels, minlength=rows * c).reshape(rows, c)
            if rows > self.matrix.shape[0]:
                grown = np.zeros((rows, c), dtype=np.int64)
                grown[: self.matrix.shape[0]] = self.matrix
                self.matrix = grown
            self.matrix += counts
        self.n_images += 1

    def add_missing(self, gt: np.ndarray) -> None:
        """Count one image without a prediction: all its valid pixels are wrong."""
        labels, _ = self._valid_gt(gt)
        self.unassigned += np.bincount(labels, minlength=self.num_classes)
        self.n_images += 1

    @property
    def class_totals(self) -> np.ndarray:
        """Valid ground-truth pixels per class ``[num_classes]``."""
        return self.matrix.sum(axis=0) + self.unassigned


def iou_matrix(matrix: np.ndarray, class_totals: np.ndarray | None = None) -> np.ndarray:
    """IoU between every predicted id and every class ``[P, C]`` from a confusion matrix ``[P, C]``.

    ``class_totals`` (default: the column sums) are the ground-truth pixel counts per class,
    including pixels without a prediction. 0/0 gives 0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=0) if class_totals is None else np.asarray(class_totals, np.float64)
    union = matrix.sum(axis=1, keepdims=True) + totals[None, :] - matrix
    return np.divide(matrix, union, out=np.zeros_like(matrix), where=union > 0)


def hungarian_match(
    matrix: np.ndarray, match: MatchMode = "pixels", class_totals: np.ndarray | None = None
) -> np.ndarray:
    """One-to-one assignment of predicted ids to classes, ``[P]`` with -1 for unmatched ids.

    ``match="pixels"`` maximises the matched pixel count; ``"iou"`` the summed IoU. Ids that
    never occur (empty rows) are reported unmatched; they change no score either way.
    """
    matrix = np.asarray(matrix)
    if match == "pixels":
        score = matrix.astype(np.float64)
    elif match == "iou":
        score = iou_matrix(matrix, class_totals)
    else:
        raise ValueError(f"match must be 'pixels' or 'iou', got {match!r}")
    rows, cols = linear_sum_assignment(score, maximize=True)
    assignment = np.full(matrix.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    assignment[matrix.sum(axis=1) == 0] = -1
    return assignment


@dataclass
class SemanticScores:
    """Scores after matching. IoU of a class absent from both the ground truth and the matched
    prediction is NaN and left out of ``miou`` (as STEGO does)."""

    acc: float
    miou: float
    per_class_iou: list[float]
    assignment: list[int]
    n_pixels: int


def scores_from_assignment(
    matrix: np.ndarray, assignment: np.ndarray, class_totals: np.ndarray | None = None
) -> SemanticScores:
    """Pixel accuracy, mIoU and per-class IoU of a confusion matrix ``[P, C]`` under ``assignment``
    ``[P]`` (class id or -1). ``class_totals`` adds unassigned pixels (default: column sums)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    c = matrix.shape[1]
    totals = matrix.sum(axis=0) if class_totals is None else np.asarray(class_totals, np.int64)
    tp = np.zeros(c, dtype=np.int64)
    predicted = np.zeros(c, dtype=np.int64)
    for pid, cls in enumerate(assignment):
        if cls >= 0:
            tp[cls] += matrix[pid, cls]
            predicted[cls] += matrix[pid].sum()
    union = predicted + totals - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    n_pixels = int(totals.sum())
    present = ~np.isnan(iou)
    return SemanticScores(
        acc=float(tp.sum() / n_pixels) if n_pixels else float("nan"),
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        per_class_iou=[float(v) for v in iou],
        assignment=[int(v) for v in assignment],
        n_pixels=n_pixels,
    )


def semantic_scores(confusion: ConfusionMatrix, match: MatchMode = "pixels") -> SemanticScores:
    """Match once over the accumulated set and score it."""
    totals = confusion.class_totals
    assignment = hungarian_match(confusion.matrix, match, totals)
    return scores_from_assignment(confusion.matrix, assignment, totals)
