"""Resizing images for the backbone and label maps for scoring.

Images: the working resolution: the short side to ``size`` unless that makes the long side
longer than ``max_side`` (then the long side is ``max_side``: a panorama gets a shorter short
side rather than a huge feature map), both sides rounded to the nearest multiple of the backbone
stride (``crop=True``: then centre-cropped to a square), bilinear with antialiasing in uint8.
Label maps: nearest neighbour, and the test of whether one size is a rescaling of another.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError

MAX_SIDE_FACTOR = 4  # the default long side of the working resolution: 4 x the short side


def resolve_max_side(size: int, max_side: int | None) -> int | None:
    """The long-side limit ``max_side`` stands for: None → ``4 * size``, 0 → no limit."""
    if max_side is None:
        return MAX_SIDE_FACTOR * size
    if max_side < 0:
        raise UnsegError(f"--max-side must be >= 0 (0: no limit), got {max_side}")
    return max_side or None


def target_size(
    height: int, width: int, size: int, stride: int, crop: bool = False,
    max_side: int | None = None,
) -> tuple[int, int]:
    """Resized ``(H, W)``: short side ``size`` with the long side at most ``max_side`` (None: no
    limit), both sides rounded to multiples of ``stride``.

    With ``crop=True`` the result is the square ``(s, s)`` with ``s = size`` rounded to stride.
    """
    def snap(x: float) -> int:
        return max(stride, math.floor(x / stride + 0.5) * stride)

    if crop:
        s = snap(size)
        return s, s
    short, long = min(height, width), max(height, width)
    if max_side is not None and long * size > max_side * short:
        return snap(height * max_side / long), snap(width * max_side / long)
    return snap(height * size / short), snap(width * size / short)


def decode_size(
    height: int, width: int, size: int, stride: int, crop: bool = False,
    max_side: int | None = None,
) -> tuple[int, int]:
    """The smallest ``(H, W)`` an ``height x width`` image may be decoded at (same aspect) so
    that :func:`resize_image` still only shrinks it: the ``min_size`` of a reduced decode."""
    th, tw = target_size(height, width, size, stride, crop, max_side)
    k = th / min(height, width) if crop else max(th / height, tw / width)
    return min(height, math.ceil(height * k)), min(width, math.ceil(width * k))


def resize_image(
    image: np.ndarray, size: int, stride: int, crop: bool = False,
    max_side: int | None = None, source_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` → uint8 ``[3, H', W']`` at :func:`target_size`.

    Bilinear with antialiasing (torch's fast uint8 path); ``crop=True`` resizes the short side
    to the square side and centre-crops. ``source_size``: the true ``(H, W)`` of an image
    decoded at a reduced scale, from which the target size is computed (default: its own).
    """
    h, w = image.shape[:2]
    pixels = torch.from_numpy(np.require(image, np.uint8, ["C", "W"]))
    x = pixels.permute(2, 0, 1).unsqueeze(0)
    sh, sw = source_size if source_size is not None else (h, w)
    th, tw = target_size(sh, sw, size, stride, crop, max_side)
    if crop:
        scale = th / min(h, w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (rh - th) // 2, (rw - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    else:
        x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(0).contiguous()


def prepare_image(
    image: np.ndarray, size: int, stride: int, crop: bool = False,
    max_side: int | None = None,
) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` → float ``[3, H', W']`` in ``[0, 1]``: :func:`resize_image` / 255."""
    return resize_image(image, size, stride, crop, max_side).float().div_(255.0)


def _scales_to(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """Some scale ``s`` makes ``src ≈ s * dst`` to within one pixel of ``src`` on both sides."""
    (sh, sw), (dh, dw) = src, dst
    return max((sh - 1) / dh, (sw - 1) / dw) <= min((sh + 1) / dh, (sw + 1) / dw)


def resizable(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """True when ``src`` ``(h, w)`` is a rescaling of ``dst`` (the same aspect ratio up to one
    pixel of rounding in the smaller or the larger of the two)."""
    if min(*src, *dst) <= 0:
        return False
    return _scales_to(src, dst) or _scales_to(dst, src)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``[h, w]`` to ``size`` ``(H, W)`` (any dtype),
    sampling source pixel ``floor(i * h / H)`` as OpenCV and PyTorch's ``nearest`` do."""
    h, w = labels.shape
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_probability(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of an 8-bit map ``[h, w]`` to probabilities
    ``[H, W]`` float64 in [0, 1]."""
    p = pred.astype(np.float64) / 255.0
    out = cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)
