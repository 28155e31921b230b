"""The report's gallery: per image a card with the image, its overlay and (when given) the
ground truth, as inline thumbnails.

A large run is shown through ``max_images`` masks spread evenly over the sorted list, so a page
for thousands of images stays a few megabytes. Semantic ground truth is coloured with the colour
of the cluster matched to each class (white: ignored pixels; light grey: a class no cluster
matched), so agreement shows as equal colours.
"""

from __future__ import annotations

import bisect
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unseg.data.image import load_image, load_label
from unseg.data.labels import label_lut, map_labels
from unseg.data.resize import resizable, resize_nearest
from unseg.errors import InputFileError
from unseg.metrics.saliency import binarize_gt
from unseg.report.outputs import RunOutputs, match_images
from unseg.report.scores import SaliencyEvaluation, SemanticEvaluation
from unseg.report.thumbs import (
    class_colors,
    colorize,
    data_uri,
    saliency_overlay,
    thumbnail,
)
from unseg.utils.overlays import overlay

logger = logging.getLogger(__name__)


@dataclass
class Gallery:
    """The gallery's HTML and what it shows."""

    html: str
    shown: int
    total: int
    with_images: int


def pick(n: int, max_items: int) -> list[int]:
    """Indices of at most ``max_items`` of ``n`` items, evenly spread and including the first."""
    if max_items <= 0 or n == 0:
        return []
    if n <= max_items:
        return list(range(n))
    return sorted({int(i) for i in np.floor(np.arange(max_items) * n / max_items)})


def _read_boxes(path: Path | None) -> dict[str, list[float] | None]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s: cannot read boxes (%s); the gallery shows none", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _try_load(path: Path | None, label: bool = False) -> np.ndarray | None:
    """The image ``[H, W, 3]`` or label map ``[H, W]`` at ``path``; None if unreadable."""
    if path is None:
        return None
    try:
        return load_label(path) if label else load_image(path)
    except InputFileError as exc:
        logger.warning("report gallery: %s", exc)
        return None


def _figure(uri: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}" loading="lazy">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fit(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return labels if labels.shape == shape else resize_nearest(labels, shape)


def _semantic_card(
    outputs: RunOutputs,
    mask: Path,
    image: np.ndarray | None,
    evaluation: SemanticEvaluation | None,
) -> tuple[list[str], str]:
    labels = load_label(mask)
    figures = []
    key = outputs.mask_key(mask)
    if image is not None:
        figures.append(_figure(data_uri(thumbnail(image)), "image"))
        shown = overlay(image, _fit(labels, image.shape[:2]).astype(np.uint8))
        figures.append(_figure(data_uri(thumbnail(shown)), "overlay"))
    else:
        stored_path = None if outputs.overlays_dir is None else outputs.overlays_dir / f"{key}.jpg"
        stored = _try_load(stored_path) if stored_path and stored_path.is_file() else None
        if stored is not None:
            figures.append(_figure(data_uri(thumbnail(stored)), "overlay"))
        else:
            figures.append(_figure(data_uri(thumbnail(colorize(labels), nearest=True), "png"),
                                   "mask"))
    score = ""
    gt_path = None if evaluation is None else evaluation.gt_files.get(evaluation.key_of(mask))
    gt = _try_load(gt_path, label=True)
    if evaluation is not None and gt is not None:
        r = evaluation.result
        lut_gt = label_lut(r.dataset)
        if lut_gt is not None:
            gt = map_labels(gt, lut_gt).numpy()
        colours = class_colors(r.assignment, r.num_classes, r.ignore_index)
        figures.append(_figure(data_uri(thumbnail(colorize(gt, colours), nearest=True), "png"),
                               "ground truth"))
        # a mask the metrics could not use (another aspect ratio) gets no score either
        scored = labels.shape == gt.shape or resizable(labels.shape, gt.shape)
        pred = _fit(labels, gt.shape).astype(np.int64)
        lut = np.full(max(256, len(r.assignment)), -1, dtype=np.int64)
        lut[: len(r.assignment)] = r.assignment
        valid = gt != r.ignore_index if r.ignore_index is not None else np.ones_like(gt, bool)
        if scored and valid.any():
            acc = float((lut[np.clip(pred, 0, lut.size - 1)] == gt)[valid].mean())
            score = f"pixel acc {100 * acc:.1f}%"
    elif evaluation is not None:
        figures.append('<figure class="absent"><div>no ground truth</div></figure>')
    return figures, score


def _saliency_card(
    outputs: RunOutputs,
    mask: Path,
    image: np.ndarray | None,
    evaluation: SaliencyEvaluation | None,
    boxes: dict[str, list[float] | None],
) -> tuple[list[str], str]:
    mask8 = load_label(mask).astype(np.uint8)
    box = boxes.get(outputs.mask_key(mask))  # boxes.json's keys: sub/name
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        box = None
    figures = []
    if image is not None:
        figures.append(_figure(data_uri(thumbnail(image)), "image"))
        prob = _fit(mask8, image.shape[:2])
        if prob.shape != mask8.shape and box is not None:
            sy, sx = prob.shape[0] / mask8.shape[0], prob.shape[1] / mask8.shape[1]
            box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        figures.append(_figure(data_uri(thumbnail(saliency_overlay(image, prob, box))),
                               "mask and box" if box is not None else "mask"))
    else:
        grey = np.repeat(mask8[..., None], 3, axis=2)
        figures.append(_figure(data_uri(thumbnail(grey), "png"), "mask"))
    score = ""
    gt_path = None if evaluation is None else evaluation.gt_files.get(evaluation.key_of(mask))
    gt = _try_load(gt_path, label=True)
    if evaluation is not None and gt is not None:
        binary = binarize_gt(gt).astype(np.uint8) * 255
        figures.append(_figure(data_uri(thumbnail(np.repeat(binary[..., None], 3, axis=2)),
                                        "png"), "ground truth"))
        iou = evaluation.image_iou.get(evaluation.key_of(mask))
        score = "" if iou is None else f"IoU {100 * iou:.1f}%"
    elif evaluation is not None:
        figures.append('<figure class="absent"><div>no ground truth</div></figure>')
    return figures, score


def render_gallery(
    outputs: RunOutputs,
    evaluation: SemanticEvaluation | SaliencyEvaluation | None,
    max_images: int,
) -> Gallery:
    """The gallery's cards for at most ``max_images`` of the run's masks (an unreadable
    mask's card replaced by the nearest one not picked)."""
    images = match_images(outputs)
    boxes = _read_boxes(outputs.boxes_file) if outputs.kind == "saliency" else {}
    built: dict[int, str] = {}
    todo = pick(len(outputs.masks), max_images)
    # an unreadable mask's card goes to the nearest mask not picked, once per picked mask at
    # most, so that the gallery shows the number asked
    spare = sorted(set(range(len(outputs.masks))) - set(todo))
    stand_ins = len(todo)
    while todo:
        i = todo.pop(0)
        mask = outputs.masks[i]
        key = outputs.mask_key(mask)
        image = _try_load(images.get(key))
        try:
            if outputs.kind == "semantic":
                sem = evaluation if isinstance(evaluation, SemanticEvaluation) else None
                figures, score = _semantic_card(outputs, mask, image, sem)
            else:
                sal = evaluation if isinstance(evaluation, SaliencyEvaluation) else None
                figures, score = _saliency_card(outputs, mask, image, sal, boxes)
        except InputFileError as exc:
            logger.warning("report gallery: skipping %s", exc)
            if spare and stand_ins:
                stand_ins -= 1
                todo.append(spare.pop(min(bisect.bisect_left(spare, i), len(spare) - 1)))
            continue
        score_html = f'<span class="score">{html.escape(score)}</span>' if score else ""
        built[i] = (
            f'<article class="card"><header><span class="name">{html.escape(key)}</span>'
            f'{score_html}</header><div class="row n{len(figures)}">{"".join(figures)}</div>'
            "</article>"
        )
    cards = [built[i] for i in sorted(built)]
    body = f'<div class="gallery">{"".join(cards)}</div>'
    return Gallery(body, len(cards), len(outputs.masks), len(images))
