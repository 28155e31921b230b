"""``unseg evaluate``'s protocols on masks held in memory (a notebook's evaluation).

Predictions are arrays (what :meth:`unseg.Segmenter.predict` returns); ground truth is arrays, PIL
images or label files (read as ``unseg evaluate`` reads them: raw PNG values, palette indices,
alpha dropped, equal colour channels taken as one), one per image in a list (or an ``[N, H, W]``
stack); a single ``[H, W]`` map (or PIL image, or label file) is one image. Semantic ground truth
is integer class ids; a saliency mask is bool, 8-bit (binarised at 128; one holding only 0 and 1
is binary) or float in [0, 1] (above 0.5). A prediction at another size
than its ground truth is resized to it as ``unseg evaluate`` resizes a file: nearest for class ids,
bilinear for saliency maps. The dataset-specific steps of the command (COCO-Stuff / Cityscapes
label mapping and their 320 centre crop) need a dataset layout and are the command's only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from unseg.data.image import label_channel, load_label
from unseg.data.mat import is_mat
from unseg.data.resize import resize_nearest, resize_probability
from unseg.errors import UnsegError
from unseg.metrics.corloc import corloc
from unseg.metrics.saliency import BETA2, FbetaMode, SaliencyMeter, SaliencyScores
from unseg.metrics.semantic import ConfusionMatrix, MatchMode, SemanticScores, semantic_scores

PRED_IGNORE = 255  # a predicted "no label" (PriMaPs'): counted wrong, never matched
MAX_ID = 65535  # the largest predicted id scored (a stray huge id allocated a huge matrix)


def per_image(items: Any, what: str, files: bool = False) -> list[Any]:
    """``items`` as one entry per image: a list, a tuple or an array stack ``[N, H, W]`` as it
    is; one map (a 2-D array, an ``[H, W, 3|4]`` image, a PIL image, or with ``files`` a
    label file's path) as a list of one, as :meth:`~unseg.Segmenter.predict` takes one
    image. A 2-D array was iterated by rows ("1 predictions for 366 ground-truth maps")."""
    if isinstance(items, (str, os.PathLike)):
        if files and Path(items).is_file():
            return [items]
        raise UnsegError("give lists (one prediction and one ground truth per image); "
                         "for folders of files use `unseg evaluate`")
    if isinstance(items, Image.Image) or (isinstance(items, np.ndarray) and items.ndim == 2):
        return [items]
    if isinstance(items, np.ndarray) and items.ndim == 3 and items.shape[2] in (3, 4):
        return [items]  # one colour image (its channels are read, or refused, as a file's)
    if isinstance(items, np.ndarray) and items.ndim >= 3:
        return list(items)
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise UnsegError(f"{what}: expected a list (one per image, in order), got "
                         f"{type(items).__name__}")
    return list(items)


def _paired(predictions: Any, ground_truth: Any, files: bool = True) -> tuple[list, list]:
    preds = per_image(predictions, "predictions")
    truths = per_image(ground_truth, "ground truth", files=files)
    if len(preds) != len(truths):
        raise UnsegError(f"{len(preds)} predictions for {len(truths)} ground-truth "
                         "maps: give one of each per image, in the same order")
    if not preds:
        raise UnsegError("no predictions to score")
    return preds, truths


def _label_values(arr: np.ndarray, mode: str | None, i: int) -> np.ndarray:
    """A label map's values ``[H, W]`` as :func:`~unseg.data.image.load_label` reads a file:
    alpha dropped (``mode`` RGBA / LA of a PIL image; an ``H×W×4`` array), equal channels
    reduced to one; different channels are a colour-coded label image, refused."""
    if arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        alpha = mode in ("RGBA", "LA") or (mode is None and arr.shape[2] in (2, 4))
        one = label_channel(arr, alpha)
        if one is None:
            shape = (*arr.shape[:2], arr.shape[2] - alpha)
            raise UnsegError(
                f"ground truth {i}: a colour image of shape {shape}; ground truth "
                "is [H, W] class ids or a mask (a palette PNG's indices: open it without "
                ".convert('RGB'))")
        arr = one
    return arr


def _truth(item: Any, i: int) -> np.ndarray:
    """Ground truth ``i`` as its stored values ``[H, W]``."""
    if isinstance(item, (str, os.PathLike)):
        if is_mat(item):  # raw ids that only the dataset's table turns into its classes
            raise UnsegError(
                f"ground truth {i}: {item} is a Potsdam .mat label (6 fine classes): give "
                "unseg.data.datasets.Potsdam3(root)[i]['label'] (the 3 classes), or score "
                "the folder with `unseg evaluate semantic --gt POTSDAM_ROOT`")
        arr = load_label(item)
    elif isinstance(item, Image.Image):
        arr = _label_values(np.asarray(item), item.mode, i)
    else:
        arr = _label_values(np.asarray(item), None, i)
    if arr.ndim != 2:
        raise UnsegError(f"ground truth {i}: expected an [H, W] label map, got shape "
                         f"{arr.shape}")
    if not arr.size:
        raise UnsegError(f"ground truth {i}: empty map of shape {arr.shape}")
    return arr


def _class_ids(truth: np.ndarray, i: int) -> np.ndarray:
    """A semantic ground truth's integer class ids (a float map was taken as is)."""
    if not (np.issubdtype(truth.dtype, np.integer) or truth.dtype == bool):
        raise UnsegError(f"ground truth {i}: class ids must be integers, got {truth.dtype} "
                         "(labels.astype(np.uint8))")
    return truth


def _mask_truth(truth: np.ndarray, i: int) -> np.ndarray:
    """A saliency ground truth as the meter binarises it: bool as is, 8-bit at 128, float in
    [0, 1] above 0.5. A 0/1 integer mask was silently all background (below 128) and a float
    one too, so a method predicting nothing scored IoU 1: a float one is made bool here, a 0/1
    one is read as binary by :func:`~unseg.metrics.saliency.binarize_gt`."""
    if truth.dtype == bool:
        return truth
    if np.issubdtype(truth.dtype, np.floating):
        if not (np.isfinite(truth).all() and truth.min() >= 0 and truth.max() <= 1):
            raise UnsegError(f"ground truth {i}: a float mask must lie in [0, 1]")
        return truth > 0.5
    if not np.issubdtype(truth.dtype, np.integer):
        raise UnsegError(f"ground truth {i}: a mask is bool, uint8 (0/255) or float in "
                         f"[0, 1], got {truth.dtype}")
    return truth  # 8-bit, or 0/1 (read as binary by the meter's binarize_gt)


def _prediction(item: Any, i: int, integer: bool) -> np.ndarray:
    arr = np.asarray(item)
    if arr.ndim != 2:
        raise UnsegError(f"prediction {i}: expected an [H, W] map, got shape {arr.shape}")
    if not arr.size:
        raise UnsegError(f"prediction {i}: empty map of shape {arr.shape}")
    if integer and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise UnsegError(f"prediction {i}: class ids must be integers, got {arr.dtype}")
    if integer and arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if integer and arr.dtype.itemsize > 2 and int(arr.max()) > MAX_ID:
        raise UnsegError(f"prediction {i}: class ids up to {MAX_ID} are scored, got "
                         f"{int(arr.max())} (the confusion matrix has a row per id)")
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
    predictions, ground_truth = _paired(predictions, ground_truth)
    if match not in ("pixels", "iou"):
        raise UnsegError(f"match must be 'pixels' or 'iou', got {match!r}")
    for name, value in (("num_classes", num_classes), ("ignore_index", ignore_index)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer))):
            raise UnsegError(f"{name}: expected an integer or None, got {value!r}")
    truths = [_class_ids(_truth(g, i), i) for i, g in enumerate(ground_truth)]
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
    :meth:`~unseg.Segmenter.predict` returns, or float in [0, 1]) against masks (8-bit ones
    binarised at 128, bool ones as they are, float ones in [0, 1] above 0.5), averaged over
    images (``unseg evaluate saliency``'s protocol). uint8 maps that all hold only 0 and 1
    are refused: binary masks read as 8-bit probabilities would be almost background (give
    them as bool or 0/255)."""
    return saliency_scores(predictions, ground_truth, fbeta_mode, beta2, binary_check=True)


def saliency_scores(predictions: Any, ground_truth: Any, fbeta_mode: FbetaMode = "curve",
                    beta2: float = BETA2, binary_check: bool = False) -> SaliencyScores:
    """:func:`score_saliency`; ``binary_check`` refuses 8-bit maps that are all 0/1 (binary
    masks mistaken for probabilities), off for maps known to be 8-bit probabilities (those
    of :meth:`~unseg.Segmenter.predict`, which may all be faint)."""
    predictions, ground_truth = _paired(predictions, ground_truth)
    try:
        meter = SaliencyMeter(beta2=beta2, fbeta_mode=fbeta_mode)
    except ValueError as exc:
        raise UnsegError(str(exc)) from None
    maps = [_prediction(p, i, integer=False) for i, p in enumerate(predictions)]
    if (binary_check and all(m.dtype == np.uint8 for m in maps)
            and max(int(m.max()) for m in maps) == 1):
        raise UnsegError(  # `unseg evaluate` warns of such files; here the score was just ~0
            "the predictions hold only the values 0 and 1: as 8-bit maps they are v/255, "
            "almost background; give binary masks as bool (mask.astype(bool)) or 0/255")
    for i, (pred, gt) in enumerate(zip(maps, ground_truth, strict=True)):
        truth = _mask_truth(_truth(gt, i), i)
        meter.update(_probability(pred, truth.shape, i), truth)
    return meter.scores()


def score_corloc(
    boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[Sequence[float]]]
) -> float:
    """CorLoc: the fraction of images whose box ``[x0, y0, x1, y1]`` (or None: a miss) has
    IoU of at least 0.5 with one of the image's ground-truth boxes (the boxes of
    :meth:`~unseg.Segmenter.predict_boxes`; pixel edges, ``x1`` one past the last column).
    ``gt_boxes``: per image a list of boxes (``[]`` for none; an ``[N, 4]`` array)."""
    if isinstance(boxes, (str, os.PathLike)) or isinstance(gt_boxes, (str, os.PathLike)):
        raise UnsegError("give lists (one box and one list of ground-truth boxes per image); "
                         "for a boxes.json use `unseg evaluate corloc`")
    for what, items in (("boxes", boxes), ("gt_boxes", gt_boxes)):
        if not isinstance(items, (Sequence, np.ndarray)):
            raise UnsegError(f"{what}: expected a list (one per image, in order), got "
                             f"{type(items).__name__}")
    if len(boxes) != len(gt_boxes):
        raise UnsegError(f"{len(boxes)} boxes for {len(gt_boxes)} images' ground-truth boxes: "
                         "give one of each per image, in the same order")
    if not len(boxes):
        raise UnsegError("no boxes to score")
    pred = [None if b is None else _box(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
    truth = []
    for i, g in enumerate(gt_boxes):
        if g is None or isinstance(g, (str, bytes)) or not isinstance(g, (Sequence, np.ndarray)):
            raise UnsegError(f"gt_boxes[{i}]: expected a list of [x0, y0, x1, y1] boxes "
                             f"([] for none), got {g!r}")
        if len(g) and all(_is_number(v) for v in g):
            raise UnsegError(f"gt_boxes[{i}]: expected a list of boxes, got one box {list(g)}: "
                             "wrap it ([[x0, y0, x1, y1]])")
        truth.append([_box(b, f"gt_boxes[{i}][{j}]") for j, b in enumerate(g)])
    return corloc(pred, truth)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _box(box: Any, where: str) -> list[float]:
    """A box ``[x0, y0, x1, y1]`` of four finite numbers (a bad one failed inside the IoU)."""
    values = list(box) if isinstance(box, (Sequence, np.ndarray)) else None
    if (values is None or len(values) != 4 or not all(_is_number(v) for v in values)
            or not np.isfinite(np.asarray(values, dtype=np.float64)).all()):
        raise UnsegError(f"{where}: expected a box [x0, y0, x1, y1] of four finite numbers (or "
                         f"None), got {box!r}")
    return [float(v) for v in values]
