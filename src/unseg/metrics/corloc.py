"""Single-object discovery: CorLoc.

Boxes are ``[x0, y0, x1, y1]`` in continuous pixel-edge coordinates (``x1``/``y1`` exclusive), as in
the LOST/TokenCut code: a mask box covering columns ``a..b`` is ``[a, ., b + 1, .]`` and a VOC
``bndbox`` (1-based, inclusive) becomes ``[xmin - 1, ymin - 1, xmax, ymax]``. An image is correct
when its one predicted box has IoU >= 0.5 with any ground-truth box (difficult and truncated
objects included).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

CORLOC_IOU = 0.5

Box = tuple[float, float, float, float]


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Box of the largest 4-connected component of a binary mask ``[H, W]``; None if empty.

    Ties go to the component met first in raster order.
    """
    binary = np.ascontiguousarray(np.asarray(mask).astype(bool), dtype=np.uint8)
    if not binary.any():
        return None
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=4)
    areas = stats[1:n, cv2.CC_STAT_AREA]
    x, y, w, h = stats[1 + int(np.argmax(areas)), :4]
    return (float(x), float(y), float(x + w), float(y + h))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes (0 when the union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def is_correct(box: Sequence[float] | None, gt_boxes: Sequence[Sequence[float]]) -> bool:
    """True when ``box`` has IoU >= 0.5 with any of ``gt_boxes``; a missing box is a miss."""
    if box is None:
        return False
    return any(box_iou(box, g) >= CORLOC_IOU for g in gt_boxes)


def corloc(
    boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[Sequence[float]]]
) -> float:
    """Fraction of images whose predicted box localises a ground-truth object."""
    if len(boxes) != len(gt_boxes):
        raise ValueError(f"{len(boxes)} predicted boxes for {len(gt_boxes)} images")
    if not boxes:
        return float("nan")
    return sum(is_correct(b, g) for b, g in zip(boxes, gt_boxes, strict=True)) / len(boxes)
