"""Overlays: an image blended with its label colours, for looking at results."""

from __future__ import annotations

import numpy as np

from unseg.utils.palette import label_colors


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend uint8 RGB ``image [H, W, 3]`` with the colours of ``labels [H, W]`` (ids < 256).

    Returns uint8 ``[H, W, 3]``: ``(1 - alpha) * image + alpha * colour``.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colors = label_colors(256)[np.clip(labels, 0, 255).astype(np.intp)].astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
