"""The report's numbers: ``unseg evaluate``'s scores plus what the charts need.

The headline scores come from :mod:`unseg.pipelines.evaluate` unchanged (missing predictions
allowed and counted, as ``--allow-missing``). The charts need more than those results hold, so one
extra pass over the same file pairs accumulates, for semantic runs, the cluster x class confusion
matrix (:class:`unseg.metrics.semantic.ConfusionMatrix`, whose Hungarian matching reproduces the
scores), and for saliency runs the pixel confusion at ``p > 0.5`` and every image's IoU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unseg.data.image import load_label
from unseg.data.resize import resizable, resize_probability
from unseg.errors import InputFileError, UnsegError
from unseg.metrics.saliency import as_probability, binarize_gt, binary_scores
from unseg.metrics.semantic import MatchMode
from unseg.pipelines.evaluate import (
    CorLocResult,
    SaliencyResult,
    SemanticResult,
    evaluate_corloc,
    evaluate_saliency,
    semantic_confusion,
)
from unseg.pipelines.pairing import Pairing, pair_files
from unseg.report.outputs import RunOutputs


class _Paired:
    """What the gallery asks of an evaluation: the ground truth of each prediction file."""

    pred_keys: dict[Path, str]

    def key_of(self, mask: Path) -> str:
        """The key of the prediction ``mask`` in ``gt_files`` (its stem, or its path relative
        to the masks folder when the ground truth pairs by path)."""
        return self.pred_keys.get(mask, mask.stem)


@dataclass
class SemanticEvaluation(_Paired):
    """Semantic scores, the confusion matrix ``[P, C]`` (predicted id x class) with the pixels
    of no or missing prediction per class ``[C]``, and the ground truth file of each stem."""

    result: SemanticResult
    confusion: np.ndarray
    unassigned: np.ndarray
    gt_files: dict[str, Path]
    pred_keys: dict[Path, str] = field(default_factory=dict)


@dataclass
class SaliencyEvaluation(_Paired):
    """Saliency scores, the pixel confusion ``[2, 2]`` (rows: ground truth background,
    foreground; columns: prediction ``p <= 0.5``, ``p > 0.5``), each image's IoU, and the
    ground-truth file of each stem."""

    result: SaliencyResult
    pixel_confusion: np.ndarray
    image_iou: dict[str, float]
    gt_files: dict[str, Path]
    pred_keys: dict[Path, str] = field(default_factory=dict)


def _prediction(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        pred = load_label(path)
    except InputFileError:
        return None
    if pred.shape != shape and not resizable(pred.shape, shape):
        return None
    return pred


def _keys(pairing: Pairing) -> dict[Path, str]:
    """Each paired prediction file's key."""
    return {path: key for key, path in pairing.pred.items()}


def _infer_num_classes(gt_files: dict[str, Path], ignore_index: int | None) -> int:
    top = -1
    for path in gt_files.values():
        labels = load_label(path)
        valid = labels if ignore_index is None else labels[labels != ignore_index]
        if valid.size:
            top = max(top, int(valid.max()))
    if top < 0:
        raise UnsegError("the ground truth holds no labelled pixel; give --num-classes")
    return top + 1


def evaluate_semantic_run(
    masks_dir: Path,
    gt: str | Path,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    match: MatchMode = "pixels",
) -> SemanticEvaluation:
    """Scores and confusion matrix of the label PNGs in ``masks_dir`` against ``gt``.

    ``num_classes`` defaults to the dataset layout's, else to the largest ground-truth label + 1.
    """
    pairing = pair_files(masks_dir, gt, "semantic", allow_missing=True)
    if num_classes is None:
        layout_k = None if pairing.layout is None else pairing.layout.num_classes
        num_classes = layout_k or _infer_num_classes(pairing.gt, ignore_index)
    result, conf = semantic_confusion(masks_dir, gt, num_classes, ignore_index, match,
                                      allow_missing=True, pairing=pairing)
    return SemanticEvaluation(result, conf.matrix, conf.unassigned, dict(pairing.gt),
                              _keys(pairing))


def evaluate_saliency_run(masks_dir: Path, gt: str | Path) -> SaliencyEvaluation:
    """Scores, pixel confusion and per-image IoU of the 8-bit masks in ``masks_dir``."""
    pairing = pair_files(masks_dir, gt, "saliency", allow_missing=True)
    result = evaluate_saliency(masks_dir, gt, allow_missing=True, pairing=pairing)
    confusion = np.zeros((2, 2), dtype=np.int64)
    image_iou: dict[str, float] = {}
    for stem, gt_path in pairing.gt.items():
        mask = load_label(gt_path)
        pred = _prediction(pairing.pred.get(stem), mask.shape)
        if pred is None:
            pred = np.zeros(mask.shape, dtype=np.uint8)
        elif pred.shape != mask.shape:
            pred = resize_probability(pred, mask.shape)
        elif pred.dtype != np.uint8:
            pred = np.clip(pred, 0, 255).astype(np.uint8)
        fg = binarize_gt(mask).ravel()
        positive = (as_probability(pred) > 0.5).ravel()
        confusion += np.bincount(2 * fg + positive, minlength=4).reshape(2, 2)
        image_iou[stem] = binary_scores(pred, mask)[1]
    return SaliencyEvaluation(result, confusion, image_iou, dict(pairing.gt), _keys(pairing))


def evaluate_boxes(outputs: RunOutputs, annotations: str | Path) -> CorLocResult:
    """CorLoc of the run's ``boxes.json`` (else of its masks) against VOC annotations."""
    source = outputs.boxes_file or outputs.masks_dir
    if source is None:
        raise UnsegError(f"{outputs.output_dir}: no boxes.json and no masks to take boxes from")
    return evaluate_corloc(source, annotations, allow_missing=True)
