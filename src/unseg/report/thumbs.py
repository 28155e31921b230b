"""Inline pictures for the report: thumbnails, label colouring, saliency overlays, data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from unseg.utils.palette import label_colors

THUMB_SIDE = 240
JPEG_QUALITY = 82
IGNORE_COLOR = (255, 255, 255)  # not a palette colour
UNMATCHED_COLOR = (200, 200, 200)  # not a palette colour
SALIENCY_COLOR = np.array([230, 25, 75], dtype=np.float32)
BOX_COLOR = (255, 225, 25)


def thumbnail(array: np.ndarray, max_side: int = THUMB_SIDE, nearest: bool = False) -> np.ndarray:
    """Shrink uint8 ``[H, W, 3]`` (or ``[H, W]``) so its longer side is at most ``max_side``.

    ``nearest`` keeps label colours exact; otherwise area-averaging (Pillow's reduce + Lanczos).
    Never enlarges.
    """
    h, w = array.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(array).resize(size, resample=resample, reducing_gap=2.0))


def data_uri(array: np.ndarray, fmt: str = "jpeg", quality: int = JPEG_QUALITY) -> str:
    """``data:image/...;base64,...`` of uint8 ``[H, W, 3]`` or ``[H, W]`` as JPEG or PNG."""
    return bytes_uri(encode(array, fmt, quality), fmt)


def encode(array: np.ndarray, fmt: str = "jpeg", quality: int = JPEG_QUALITY) -> bytes:
    """The bytes of uint8 ``[H, W, 3]`` or ``[H, W]`` encoded as ``"jpeg"`` or ``"png"``."""
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be 'jpeg' or 'png', got {fmt!r}")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def bytes_uri(data: bytes, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,...`` of encoded image bytes."""
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def colorize(labels: np.ndarray, colors: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of a label map ``[H, W]`` (ids < 256) under ``colors [256, 3]``
    (default: the PNG palette)."""
    table = label_colors(256) if colors is None else colors
    return table[np.clip(labels, 0, 255).astype(np.intp)]


def class_colors(
    assignment: Sequence[int], num_classes: int, ignore_index: int | None
) -> np.ndarray:
    """Colours ``[256, 3]`` for ground-truth class ids: each class takes the palette colour of the
    cluster matched to it (``assignment[cluster] = class``), unmatched classes light grey, the
    ignore index white (neither is a palette colour), so ground truth and prediction look alike
    where they agree."""
    palette = label_colors(256)
    table = np.tile(np.array(UNMATCHED_COLOR, dtype=np.uint8), (256, 1))
    for cluster, cls in enumerate(assignment):
        if 0 <= cls < num_classes and cluster < 256:
            table[cls] = palette[cluster]
    if ignore_index is not None and 0 <= ignore_index < 256:
        table[ignore_index] = IGNORE_COLOR
    return table


def saliency_overlay(
    image: np.ndarray, mask8: np.ndarray, box: Sequence[float] | None = None, alpha: float = 0.6
) -> np.ndarray:
    """``image [H, W, 3]`` tinted by the foreground probability ``mask8 / 255`` ``[H, W]``, with
    the object's ``[x0, y0, x1, y1]`` box outlined when given. Returns uint8 ``[H, W, 3]``."""
    if image.shape[:2] != mask8.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask8.shape} differ in size")
    weight = alpha * (mask8.astype(np.float32) / 255.0)[..., None]
    out = (1.0 - weight) * image.astype(np.float32) + weight * SALIENCY_COLOR
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if box is not None:
        thick = max(2, round(max(image.shape[:2]) / 120))
        x0, y0, x1, y1 = (round(v) for v in box)
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), BOX_COLOR, thick)
    return out
