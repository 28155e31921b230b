"""Resizing images for the backbone and label maps for scoring.

Images: the working resolution: the short side to ``size`` unless that makes the long side
longer than ``max_side`` (then the long side is ``max_side``: a panorama gets a shorter short
side rather than a huge feature map), both sides rounded to the nearest multiple of the backbone
stride (``crop=True``: then centre-cropped to a square), bilinear with antialiasing in uint8.
Label maps: nearest neighbour, and the test of whether one size is a rescaling of another.
Class scores (logits or probabilities) to labels at another size: :func:`upsample_argmax`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError

MAX_SIDE_FACTOR = 4  # the default long side of the working resolution: 4 x the short side
TILE = 1 << 24  # float32 elements in one tile of upsampled probabilities (64 MB)
# tile columns start at multiples of this: a multiple of every CPU vector width, so each tile
# is computed as in the one-piece upsampling (its vectorised and scalar columns are the same)
_ALIGN = 64


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


def short_side_center_crop(labels: np.ndarray, size: int) -> np.ndarray:
    """A label map ``[h, w]`` resized (nearest, pixel centres: source ``floor((i + 0.5) h / H)``,
    torch's ``nearest-exact``) so its short side is ``size``, then centre-cropped to ``size x
    size``: STEGO's ``Resize(size, NEAREST)`` + ``CenterCrop(size)`` evaluation grid (PIL's
    ``NEAREST`` differs only where a source position falls exactly on a pixel edge, by its
    floating-point accumulation)."""
    h, w = labels.shape
    # torchvision's Resize(int): short side `size`, long side int(size * long / short)
    th, tw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    top, left = round((th - size) / 2), round((tw - size) / 2)
    rows = np.minimum(((np.arange(top, top + size) + 0.5) * h / th).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(left, left + size) + 0.5) * w / tw).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_probability(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of an 8-bit map ``[h, w]`` to probabilities
    ``[H, W]`` float64 in [0, 1].

    The 8-bit values are interpolated, then divided by 255: where the interpolation is exact
    (dyadic weights, e.g. a 2x upsampling) a value equal to a threshold ``k`` gives exactly
    ``k / 255``, so ``p > t_k`` is false there as it is in exact arithmetic.
    """
    out = cv2.resize(pred.astype(np.float64), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(out / 255.0, 0.0, 1.0)


def upsample_argmax(
    probs: torch.Tensor, size: tuple[int, int], tile: int = TILE
) -> np.ndarray:
    """Class ids ``[H, W]`` (uint8 when ``K <= 256``) of scores ``probs [K, h, w]`` upsampled
    bilinearly (half-pixel centres) to ``size``, without holding ``[K, H, W]``: the labels of
    ``F.interpolate(probs[None], size, mode="bilinear").argmax(1)[0]``.

    Torch's bilinear kernel interpolates along the width, then the height, each class alone;
    rows never mix in the first pass and columns never mix in the second, so the first runs on
    whole rows (classes in groups of ``tile / (h * W)``), the second on column tiles of about
    ``tile`` elements starting at multiples of 64; a running maximum joins the groups. For most
    shapes the probabilities are bitwise those of the one-piece call; for some (three classes,
    narrow maps) torch's one-piece kernel rounds the last bit differently, and a label can then
    differ only where two classes tie to within that bit. Runs on ``probs``' device; only the
    labels come to the host.
    """
    k, h, _ = probs.shape
    height, width = size
    probs = probs.detach().float()
    most = max(1, min(k, tile // (h * width)))
    groups = [range(g0, min(k, g0 + most)) for g0 in range(0, k, most)]
    cols = max(_ALIGN, tile // (len(groups[0]) * height) // _ALIGN * _ALIGN)
    labels = np.empty(size, dtype=np.uint8 if k <= 256 else np.int64)
    best = torch.empty(size, device=probs.device) if len(groups) > 1 else None
    for group in groups:
        rows = F.interpolate(probs[None, group.start : group.stop], size=(h, width),
                             mode="bilinear", align_corners=False)
        for c0 in range(0, width, cols):
            part = rows[..., c0 : c0 + cols]
            up = F.interpolate(part, size=(height, part.shape[-1]), mode="bilinear",
                               align_corners=False)[0]
            value, index = up.max(0)  # the first index of the maximum, as argmax
            out = labels[:, c0 : c0 + cols]
            if group.start == 0:
                out[...] = index.cpu().numpy()
            else:  # a later group wins where strictly larger: ties keep the first class
                assert best is not None
                better = (value > best[:, c0 : c0 + cols]).cpu().numpy()
                out[better] = index.cpu().numpy()[better] + group.start
            if best is not None:
                seen = best[:, c0 : c0 + cols]
                seen.copy_(value if group.start == 0 else torch.maximum(seen, value))
    return labels
