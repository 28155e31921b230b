"""The label colour palette: PASCAL VOC's bit-interleaved colour map shifted by one, so class 0
is dark red (VOC's 1), class 1 green, ...; no class is black, which would hide it in overlays."""

from __future__ import annotations

import numpy as np


def label_colors(n: int = 256) -> np.ndarray:
    """RGB colours ``[n, 3]`` uint8 of labels ``0..n-1``: VOC colour ``label + 1``."""
    colors = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        value, r, g, b = label + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[label] = (r, g, b)
    return colors


def png_palette() -> list[int]:
    """The 768-entry flat palette for ``save_png_atomic(..., palette=...)``."""
    return label_colors(256).reshape(-1).tolist()
