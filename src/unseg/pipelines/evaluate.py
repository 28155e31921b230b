"""`unseg evaluate`: match prediction files to ground truth by stem, read them, score them.

One function per task (:func:`evaluate_semantic`, :func:`evaluate_saliency`,
:func:`evaluate_corloc`), each returning a result dataclass with :meth:`to_dict`. Ground truth
may be a plain folder or a dataset root in its official layout (``unseg.data.layouts``).

Missing or extra predictions and predictions that cannot be used (unreadable, or a size that is
not a rescaling of the ground truth's) raise :class:`~unseg.errors.UnsegError` listing the files,
unless ``allow_missing`` is set: then missing/unusable predictions count as all wrong (semantic),
an all-zero map (saliency) or a miss (CorLoc), extra ones are ignored, and all are reported.
Ground-truth problems (unreadable files, labels >= K other than the ignore index) always raise.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unseg.data.image import load_label
from unseg.data.labels import CLASS_NAMES, label_lut, map_labels
from unseg.data.layouts import IGNORE_INDEX, DatasetLayout
from unseg.data.resize import (
    resizable,
    resize_nearest,
    resize_probability,
    short_side_center_crop,
)
from unseg.data.voc import parse_voc_xml
from unseg.errors import InputFileError, ManyFilesError, UnsegError
from unseg.layout import BOXES_FILE
from unseg.metrics.corloc import is_correct, largest_component_box
from unseg.metrics.saliency import BETA2, FbetaMode, SaliencyMeter, SaliencyScores, is_zero_one
from unseg.metrics.semantic import ConfusionMatrix, MatchMode, semantic_scores
from unseg.pipelines.pairing import Pairing, gt_files, pair_files
from unseg.utils.io import read_json_object
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)



@dataclass
class _Problems:
    """Predictions that could not be used (path and reason), each reported once: logged as a
    warning when they are scored as wrong (``allow_missing``), else in the error."""

    allow_missing: bool
    unusable: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, problem: str) -> None:
        if self.allow_missing:
            logger.warning("cannot use %s: %s", path, problem)
        self.unusable.append((path, problem))


def _unusable_error(problems: _Problems, limit: int = 10) -> UnsegError:
    shown = "; ".join(f"{p}: {m}" for p, m in problems.unusable[:limit])
    more = len(problems.unusable) - limit
    return UnsegError(
        f"unusable predictions: {shown}{f' (and {more} more)' if more > 0 else ''} "
        "(use --allow-missing to count them as wrong)"
    )


def _load_pred(path: Path, gt_shape: tuple[int, int], problems: _Problems) -> np.ndarray | None:
    try:
        pred = load_label(path)
    except InputFileError as exc:
        problems.add(path, exc.problem)
        return None
    if pred.shape != gt_shape and not resizable(pred.shape, gt_shape):
        problems.add(path, _unresizable(pred.shape, gt_shape, "ground truth"))
        return None
    return pred


def _unresizable(shape: tuple[int, ...], target: tuple[int, int], what: str) -> str:
    """Why a prediction of ``shape`` (h, w) is refused against ``target``; a hint when it is
    the target transposed (typically a photo with an EXIF rotation: unseg's masks follow the
    displayed orientation, a ground truth may follow the stored one)."""
    message = (f"prediction size cannot be resized to the {what}'s "
               f"({shape[1]}x{shape[0]} vs {target[1]}x{target[0]})")
    if resizable((shape[1], shape[0]), target):
        message += (f"; it is the {what}'s transposed: is the photo EXIF-rotated? unseg's "
                    f"masks follow its displayed orientation; rotate the {what} to match")
    return message


LOSSY_SUFFIXES = (".jpg", ".jpeg")


def _warn_lossy(pairing: Pairing) -> None:
    """Warn when label-map predictions are JPEG files: compression changes class ids at region
    edges, so they are scored lower than the maps that were saved."""
    lossy = sorted(str(p) for p in pairing.pred.values() if p.suffix.lower() in LOSSY_SUFFIXES)
    if lossy:
        logger.warning(
            "%d prediction(s) are JPEG files (%s%s): JPEG compression changes class ids at "
            "region edges, which lowers the scores; save label maps as PNG",
            len(lossy), ", ".join(lossy[:3]), ", ..." if len(lossy) > 3 else "",
        )


# --------------------------------------------------------------------------- semantic


def eval_grid(
    labels: np.ndarray, pred: np.ndarray | None, layout: DatasetLayout | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Ground truth and prediction (already at the ground truth's size) on the grid the
    dataset's protocol scores: short side 320 and centre crop for COCO-Stuff-27 / Cityscapes-27 /
    Potsdam-3 (docs/evaluation.md, "Resolution"), else unchanged (full label resolution)."""
    if layout is None or layout.eval_crop is None:
        return labels, pred
    crop = layout.eval_crop
    return (short_side_center_crop(labels, crop),
            None if pred is None else short_side_center_crop(pred, crop))


@dataclass
class SemanticResult:
    """``unseg evaluate semantic`` output; rates are fractions in [0, 1]."""

    acc: float
    miou: float
    per_class_iou: list[float | None]
    assignment: list[int]
    n_images: int
    num_classes: int
    ignore_index: int | None
    match: str
    n_missing: int = 0
    missing: list[str] = field(default_factory=list)
    n_extra: int = 0
    dataset: str | None = None
    class_names: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (absent classes have IoU ``None``)."""
        return asdict(self)


def evaluate_semantic(
    pred: str | Path,
    gt: str | Path,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    match: MatchMode = "pixels",
    allow_missing: bool = False,
    pairing: Pairing | None = None,
) -> SemanticResult:
    """:func:`semantic_confusion`'s scores (its docstring says how they are computed)."""
    return semantic_confusion(pred, gt, num_classes, ignore_index, match, allow_missing,
                              pairing)[0]


def semantic_confusion(
    pred: str | Path,
    gt: str | Path,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    match: MatchMode = "pixels",
    allow_missing: bool = False,
    pairing: Pairing | None = None,
) -> tuple[SemanticResult, ConfusionMatrix]:
    """Hungarian-matched pixel accuracy and mIoU of label PNGs in ``pred`` against ``gt``.

    ``num_classes`` defaults to the dataset layout's; COCO-Stuff and Cityscapes ground truth is
    mapped to their 27 classes, Potsdam's (``gt/*.mat``) to its 3, as in STEGO. Predictions are
    resized (nearest) to the ground truth's size, and both to STEGO's 320x320 centre crop for
    COCO-Stuff / Cityscapes / Potsdam (:func:`eval_grid`); a predicted 255 ("no label", e.g.
    PriMaPs') counts as wrong whatever the ground truth's ``ignore_index`` (CamVid's 11 is a
    cluster id like any other in the predictions; see :mod:`unseg.metrics.semantic`).
    ``pairing``: the caller's :func:`pair_files` of ``pred`` and ``gt`` (not paired, nor its
    missing files warned about, again). Returns the scores and the confusion matrix they were
    matched on (the report draws it).
    """
    pairing = pairing or pair_files(pred, gt, "semantic", allow_missing)
    _warn_lossy(pairing)
    if num_classes is None:
        if pairing.layout is None or pairing.layout.num_classes is None:
            raise UnsegError("give --num-classes (the ground truth is not a known dataset layout)")
        num_classes = pairing.layout.num_classes
    if num_classes < 1:
        raise UnsegError(f"--num-classes must be >= 1, got {num_classes}")
    lut = label_lut(None if pairing.layout is None else pairing.layout.name)
    if lut is not None and ignore_index != IGNORE_INDEX:
        raise UnsegError(f"{pairing.layout.name} maps void labels to {IGNORE_INDEX}; "
                         f"--ignore-index must be {IGNORE_INDEX}")
    conf = ConfusionMatrix(num_classes, ignore_index=ignore_index, pred_ignore=IGNORE_INDEX)
    problems = _Problems(allow_missing)
    bad_gt: list[Path] = []
    missing = list(pairing.missing)
    for stem, gt_path in progress(
        pairing.gt.items(), total=len(pairing.gt), desc="semantic", unit="img"
    ):
        labels = load_label(gt_path)
        if lut is not None:
            labels = map_labels(labels, lut).numpy()
        valid = labels if ignore_index is None else labels[labels != ignore_index]
        if valid.size and (valid.min() < 0 or valid.max() >= num_classes):
            bad_gt.append(gt_path)
            continue
        if bad_gt:
            continue
        pred_path = pairing.pred.get(stem)
        p = None if pred_path is None else _load_pred(pred_path, labels.shape, problems)
        if p is not None and p.shape != labels.shape:
            p = resize_nearest(p, labels.shape)
        labels, p = eval_grid(labels, p, pairing.layout)
        if p is None:
            if pred_path is not None:
                missing.append(stem)
            conf.add_missing(labels)
            continue
        conf.update(p, labels)
    if bad_gt:
        raise ManyFilesError(
            f"ground-truth labels >= {num_classes} (other than the ignore index {ignore_index})",
            bad_gt,
        )
    if problems.unusable and not allow_missing:
        raise _unusable_error(problems)
    scores = semantic_scores(conf, match)
    dataset = None if pairing.layout is None else pairing.layout.name
    names = CLASS_NAMES.get(dataset or "")
    result = SemanticResult(
        acc=scores.acc,
        miou=scores.miou,
        per_class_iou=[None if np.isnan(v) else v for v in scores.per_class_iou],
        assignment=scores.assignment,
        n_images=conf.n_images,
        num_classes=num_classes,
        ignore_index=ignore_index,
        match=match,
        n_missing=len(missing),
        missing=missing,
        n_extra=len(pairing.extra),
        dataset=dataset,
        class_names=list(names) if names is not None and len(names) == num_classes else None,
    )
    return result, conf


# --------------------------------------------------------------------------- saliency


@dataclass
class SaliencyResult(SaliencyScores):
    """``unseg evaluate saliency`` output: the metric's scores (fractions in [0, 1]) and what
    the file matching found."""

    n_missing: int = 0
    missing: list[str] = field(default_factory=list)
    n_extra: int = 0
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _as_8bit(pred: np.ndarray, path: Path) -> np.ndarray:
    if pred.dtype == np.uint8:
        return pred
    if pred.dtype == bool:
        return pred.astype(np.uint8) * 255
    if np.issubdtype(pred.dtype, np.integer) and pred.min() >= 0 and pred.max() <= 255:
        return pred.astype(np.uint8)
    raise InputFileError(path, f"saliency predictions must be 8-bit (0-255), got {pred.dtype}")


def evaluate_saliency(
    pred: str | Path,
    gt: str | Path,
    fbeta_mode: FbetaMode = "curve",
    beta2: float = BETA2,
    allow_missing: bool = False,
    pairing: Pairing | None = None,
) -> SaliencyResult:
    """Acc, IoU, maxFβ and MAE of 8-bit saliency PNGs in ``pred`` against masks in ``gt``.

    Predictions are ``v / 255`` as they are (no min-max rescaling), resized bilinearly to the
    ground truth's size when they differ; ground truth is binarised at 128. ``pairing``: as
    :func:`evaluate_semantic`'s.
    """
    pairing = pairing or pair_files(pred, gt, "saliency", allow_missing)
    meter = SaliencyMeter(beta2=beta2, fbeta_mode=fbeta_mode)
    problems = _Problems(allow_missing)
    missing = list(pairing.missing)
    n_binary01 = n_graded = 0  # predictions whose largest value is 1 / above 1
    n_gt01 = 0  # ground-truth masks stored as 0/1
    for stem, gt_path in progress(
        pairing.gt.items(), total=len(pairing.gt), desc="saliency", unit="img"
    ):
        mask = load_label(gt_path)
        n_gt01 += is_zero_one(mask)
        pred_path = pairing.pred.get(stem)
        p = None if pred_path is None else _load_pred(pred_path, mask.shape, problems)
        if p is not None:
            try:
                p = _as_8bit(p, pred_path)
            except InputFileError as exc:
                problems.add(pred_path, exc.problem)
                p = None
        if p is None:
            if pred_path is not None:
                missing.append(stem)
            p = np.zeros(mask.shape, dtype=np.uint8)
        else:
            n_binary01 += bool(p.max() == 1)
            n_graded += bool(p.max() > 1)
            if p.shape != mask.shape:
                p = resize_probability(p, mask.shape)
        meter.update(p, mask)
    if problems.unusable and not allow_missing:
        raise _unusable_error(problems)
    if n_gt01:
        logger.info("%d ground-truth mask(s) hold only the values 0 and 1: read as binary "
                    "(foreground 1)", n_gt01)
    if n_binary01 and not n_graded:  # 0/1 masks; a few near-empty maps among 8-bit ones are not
        logger.warning(
            "%d prediction(s) hold only the values 0 and 1: they are read as v/255 (almost "
            "background); save binary masks as 0/255", n_binary01,
        )
    return SaliencyResult(
        **asdict(meter.scores()),
        n_missing=len(missing), missing=missing, n_extra=len(pairing.extra),
        dataset=None if pairing.layout is None else pairing.layout.name,
    )


# --------------------------------------------------------------------------- CorLoc


@dataclass
class CorLocResult:
    """``unseg evaluate corloc`` output; ``corloc`` is a fraction in [0, 1]."""

    corloc: float
    n_images: int
    n_correct: int
    source: str
    n_missing: int = 0
    missing: list[str] = field(default_factory=list)
    n_extra: int = 0
    dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _read_boxes_json(path: Path) -> dict[str, list[float] | None]:
    data = read_json_object(path, "cannot read boxes JSON",
                            "must map image stem -> [x0, y0, x1, y1]")
    bad = [
        k for k, v in data.items()
        if v is not None and not (
            isinstance(v, list) and len(v) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        )
    ]
    if bad:
        raise InputFileError(
            path, f"{len(bad)} entries are not [x0, y0, x1, y1] or null: {', '.join(bad[:10])}"
        )
    return data


def _by_image_stem(boxes: dict[str, list[float] | None],
                   path: Path) -> dict[str, list[float] | None]:
    """``boxes.json``'s entries by image stem: ``discover`` keys nested inputs by their path
    (``sub/name``), the annotations are one flat folder of ``name.xml``."""
    out: dict[str, list[float] | None] = {}
    repeated: list[str] = []
    for key, box in boxes.items():
        stem = key.rsplit("/", 1)[-1]
        if stem in out:
            repeated.append(key)
        out[stem] = box
    if repeated:
        raise InputFileError(path, f"{len(repeated)} image name(s) repeat in sub-folders, and "
                             f"the annotations pair by name: {', '.join(repeated[:10])}")
    return out


def _mask_box(pred_path: Path, size: tuple[int, int], problems: _Problems) -> list[float] | None:
    """Box of the largest component of a mask, rescaled to the annotation's ``size`` (h, w)."""
    try:
        mask = load_label(pred_path)
    except InputFileError as exc:
        problems.add(pred_path, f"unreadable prediction ({exc.problem})")
        return None
    if mask.shape != size and not resizable(mask.shape, size):
        problems.add(pred_path, _unresizable(mask.shape, size, "annotation"))
        return None
    binary = mask > 0 if mask.size and mask.max() <= 1 else mask >= 128
    box = largest_component_box(binary)
    if box is None:
        return None
    sy, sx = size[0] / mask.shape[0], size[1] / mask.shape[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def evaluate_corloc(
    pred: str | Path, annotations: str | Path, allow_missing: bool = False
) -> CorLocResult:
    """CorLoc of one box per image against VOC XML annotations.

    ``pred`` is a folder of masks (the box of each mask's largest connected component, with
    8-bit foreground ``>= 128``, or ``> 0`` for 0/1 masks), or a ``boxes.json`` (the file or a
    folder holding it) mapping image stem → ``[x0, y0, x1, y1]`` (pixel-edge coordinates,
    ``x1``/``y1`` exclusive) or ``null``. Empty masks and ``null`` boxes are misses.
    """
    pred = Path(pred)
    json_path = pred if pred.is_file() else pred / BOXES_FILE
    boxes: dict[str, list[float] | None] | None = None
    if json_path.is_file():
        gt_map, layout = gt_files(Path(annotations), "boxes")
        boxes = _read_boxes_json(json_path)
        if not any("/" in key for key in gt_map):  # else both keyed by path: cats/001
            boxes = _by_image_stem(boxes, json_path)
        missing = [s for s in gt_map if s not in boxes]
        extra = sorted(s for s in boxes if s not in gt_map)
        if (missing or extra) and not allow_missing:
            parts = []
            if missing:
                parts.append(f"{json_path}: no box for {len(missing)} image(s): "
                             f"{', '.join(missing[:10])}")
            if extra:
                parts.append(f"{json_path}: {len(extra)} box(es) for images without annotation: "
                             f"{', '.join(extra[:10])}")
            raise UnsegError("; ".join(parts) + " (use --allow-missing to score anyway)")
        pairing = Pairing(gt_map, {}, layout, missing, extra)
    else:
        pairing = pair_files(pred, annotations, "boxes", allow_missing)
    problems = _Problems(allow_missing)
    missing = list(pairing.missing)
    n_correct = 0
    for stem, xml_path in progress(
        pairing.gt.items(), total=len(pairing.gt), desc="corloc", unit="img"
    ):
        (height, width), gt_boxes, _ = parse_voc_xml(xml_path)
        if boxes is not None:
            box = boxes.get(stem)
        else:
            pred_path = pairing.pred.get(stem)
            box = None
            if pred_path is not None:
                before = len(problems.unusable)
                box = _mask_box(pred_path, (height, width), problems)
                if len(problems.unusable) > before:
                    missing.append(stem)
        if is_correct(box, gt_boxes):
            n_correct += 1
    if problems.unusable and not allow_missing:
        raise _unusable_error(problems)
    n = len(pairing.gt)
    return CorLocResult(
        corloc=n_correct / n if n else float("nan"),
        n_images=n,
        n_correct=n_correct,
        source=BOXES_FILE if boxes is not None else "masks",
        n_missing=len(missing),
        missing=missing,
        n_extra=len(pairing.extra),
        dataset=None if pairing.layout is None else pairing.layout.name,
    )
