"""The guided filter (He, Sun and Tang, ECCV 2010 / TPAMI 2013) with a grey guide.

Batched and O(pixels) whatever the radius. Two implementations of the same box sums, chosen by
the input: plain torch ops (cumulative sums and slices; differentiable, any device) when a tensor
needs a gradient or lives off the CPU, else OpenCV's ``boxFilter`` on channel-last arrays (about
5x faster on the CPU, the same numbers to float32 rounding; ``tests/unit/test_guided_filter.py``
checks one against the other). ``subsample > 1`` is the *fast guided filter* (He and Sun 2015):
the coefficients ``a, b`` are fitted on the inputs shrunk by ``subsample`` with radius
``radius / subsample``, and upsampled bilinearly before ``q = a·I + b`` at full resolution, which
costs about ``1 / subsample²`` of the exact filter.

At the borders the window is cut to the image and each box sum is divided by the number of pixels
actually inside it (He's reference formulation); OpenCV's ``cv2.ximgproc.guidedFilter`` reflects
the image at the border instead, so the two agree exactly only where the nested windows (2r from
the border) lie inside the image.

The Boosting paper's refinement (:func:`refine_masks`): grey guide = the image's luminance, radius
9, ε = 1e-3, each mask standardised per image and channel before filtering and restored after.
The filter is linear in the filtered input with weights summing to one, so the standardisation
does not change the result in exact arithmetic; it keeps float32 sums well conditioned. For the
same reason K-channel soft maps that sum to one still sum to one after filtering.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from unseg.data.color import as_float_images, luma
from unseg.errors import UnsegError
from unseg.utils.options import option

GuideMode = Literal["mean", "luma"]
_CV_MAX_CHANNELS = 128  # channels per OpenCV call (its filters refuse 129 and more)


@dataclass
class GuidedFilterConfig:
    """Guided-filter refinement as in the Boosting paper (radius 9, ε = 1e-3, mean-RGB guide)."""

    radius: int = option(9, "guided-filter radius", at_least=0)
    eps: float = option(1e-3, "guided-filter ε", above=0)
    guide: GuideMode = option(
        "mean",
        "guided-filter guide: mean of RGB (reference code) or BT.601 luma",
        flags=("--guide",),
    )
    standardize: bool = option(True, "standardise each mask channel before filtering")


def _box_sum_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum over the window ``[i - r, i + r]`` cut to the array, along ``dim`` (cumsum trick)."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)  # c[j] = sum of x[:j]
    r = min(radius, n - 1)
    # window of i: [max(i - r, 0), min(i + r, n - 1)] → c[min(i + r + 1, n)] - c[max(i - r, 0)]
    first, last = c.narrow(dim, 0, 1), c.narrow(dim, n, 1)
    hi = torch.cat([c.narrow(dim, r + 1, n - r), *([last] * r)], dim=dim)
    lo = torch.cat([*([first] * r), c.narrow(dim, 0, n - r)], dim=dim)
    return hi - lo


def _window_counts(n: int, radius: int) -> np.ndarray:
    """Number of pixels in each cut window along an axis of length ``n``: ``[n]``."""
    idx = np.arange(n)
    return np.minimum(idx + radius, n - 1) - np.maximum(idx - radius, 0) + 1


@lru_cache(maxsize=16)
def _inverse_counts(h: int, w: int, radius: int) -> np.ndarray:
    """``1 / (pixels in each cut (2r+1)² window)``: float32 ``[H, W]``, read-only (cached: a
    batch's images share one size)."""
    counts = _window_counts(h, radius)[:, None] * _window_counts(w, radius)[None, :]
    inv = (1.0 / counts).astype(np.float32)
    inv.flags.writeable = False
    return inv


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)²`` window cut to the image: ``[..., H, W]`` → ``[..., H, W]``."""
    if radius < 0:
        raise UnsegError(f"box filter radius must be >= 0, got {radius}")
    h, w = x.shape[-2], x.shape[-1]
    s = _box_sum_1d(_box_sum_1d(x, radius, x.ndim - 2), radius, x.ndim - 1)
    inv = torch.tensor(_inverse_counts(h, w, radius), dtype=x.dtype, device=x.device)
    return s * inv


def _cv_box_mean(x: np.ndarray, radius: int, inv: np.ndarray) -> np.ndarray:
    """:func:`box_mean` of a float32 ``[H, W]`` or channel-last ``[H, W, C]`` array (OpenCV)."""
    size = (2 * radius + 1, 2 * radius + 1)
    if x.ndim == 2 or x.shape[2] <= _CV_MAX_CHANNELS:
        s = cv2.boxFilter(x, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
    else:
        s = np.concatenate(
            [
                cv2.boxFilter(np.ascontiguousarray(x[..., i : i + _CV_MAX_CHANNELS]), -1, size,
                              normalize=False, borderType=cv2.BORDER_CONSTANT)
                for i in range(0, x.shape[2], _CV_MAX_CHANNELS)
            ],
            axis=2,
        )
    s = s.reshape(x.shape)  # OpenCV drops a trailing channel axis of length 1
    return s * (inv if s.ndim == 2 else inv[..., None])


def _coefficients_cv(
    guide: np.ndarray, src: np.ndarray, radius: int, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Box means of the guided filter's ``a`` and ``b`` for ``guide [H, W]``, ``src [H, W, K]``."""
    inv = _inverse_counts(guide.shape[0], guide.shape[1], radius)
    mean_i = _cv_box_mean(guide, radius, inv)
    mean_p = _cv_box_mean(src, radius, inv)
    var_i = _cv_box_mean(guide * guide, radius, inv) - mean_i * mean_i
    cov_ip = _cv_box_mean(src * guide[..., None], radius, inv) - mean_i[..., None] * mean_p
    a = cov_ip / (var_i + eps)[..., None]
    b = mean_p - a * mean_i[..., None]
    return _cv_box_mean(a, radius, inv), _cv_box_mean(b, radius, inv)


def _coefficients_torch(
    guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box means of ``a`` and ``b`` for ``guide [B, 1, H, W]``, ``src [B, K, H, W]``."""
    mean_i = box_mean(guide, radius)
    mean_p = box_mean(src, radius)
    var_i = box_mean(guide * guide, radius) - mean_i * mean_i
    cov_ip = box_mean(guide * src, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_mean(a, radius), box_mean(b, radius)


def guided_filter(
    guide: torch.Tensor,
    src: torch.Tensor,
    radius: int = 9,
    eps: float = 1e-3,
    subsample: int = 1,
) -> torch.Tensor:
    """Filter ``src`` ``[B, K, H, W]`` with the grey ``guide`` ``[B, 1, H, W]``.

    Returns ``[B, K, H, W]``: ``q = mean(a) * I + mean(b)`` with ``a = cov(I, p) / (var(I) + ε)``
    and ``b = mean(p) - a * mean(I)`` over each ``(2r+1)²`` window. ``subsample > 1``: the fast
    guided filter (coefficients fitted at ``1 / subsample`` of the size, radius
    ``max(1, round(radius / subsample))``, upsampled bilinearly).
    """
    if guide.ndim != 4 or guide.shape[1] != 1:
        raise UnsegError(f"guide must be [B, 1, H, W], got {tuple(guide.shape)}")
    if src.ndim != 4 or src.shape[0] != guide.shape[0] or src.shape[-2:] != guide.shape[-2:]:
        raise UnsegError(
            f"src {tuple(src.shape)} does not match guide {tuple(guide.shape)} (want [B, K, H, W])"
        )
    if radius < 0:
        raise UnsegError(f"guided filter radius must be >= 0, got {radius}")
    if subsample < 1:
        raise UnsegError(f"guided filter subsample must be >= 1, got {subsample}")
    # the result is invariant to a constant shift of the guide; centring it keeps var(I) precise
    guide = guide - guide.mean(dim=(-2, -1), keepdim=True)
    small_guide, small_src, r = guide, src, radius
    if subsample > 1:
        h, w = guide.shape[-2:]
        size = (max(1, round(h / subsample)), max(1, round(w / subsample)))
        small_guide = F.interpolate(guide, size=size, mode="area")
        small_src = F.interpolate(src, size=size, mode="area")
        r = max(1, round(radius / subsample))
    use_cv = (
        src.device.type == "cpu"
        and src.dtype == torch.float32
        and guide.dtype == torch.float32
        and not (torch.is_grad_enabled() and (src.requires_grad or guide.requires_grad))
    )
    if use_cv:
        shape = (src.shape[0], *small_src.shape[-2:], src.shape[1])
        mean_a, mean_b = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for i in range(src.shape[0]):
            a, b = _coefficients_cv(
                small_guide[i, 0].contiguous().numpy(),
                small_src[i].permute(1, 2, 0).contiguous().numpy(),
                r,
                eps,
            )
            mean_a[i], mean_b[i] = a.reshape(shape[1:]), b.reshape(shape[1:])
        mean_a = torch.from_numpy(mean_a).permute(0, 3, 1, 2)
        mean_b = torch.from_numpy(mean_b).permute(0, 3, 1, 2)
    else:
        mean_a, mean_b = _coefficients_torch(small_guide, small_src, r, eps)
    if subsample > 1:
        size = tuple(guide.shape[-2:])
        mean_a = F.interpolate(mean_a, size=size, mode="bilinear", align_corners=False)
        mean_b = F.interpolate(mean_b, size=size, mode="bilinear", align_corners=False)
    return mean_a * guide + mean_b


def luminance(images: torch.Tensor, mode: GuideMode = "mean") -> torch.Tensor:
    """Grey guide from RGB ``[B, 3, H, W]`` in ``[0, 1]``: ``[B, 1, H, W]``.

    ``"mean"``: the plain mean of R, G, B (the Boosting reference code); ``"luma"``: BT.601.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise UnsegError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    if mode == "mean":
        return images.mean(dim=1, keepdim=True)
    if mode == "luma":
        return luma(images)
    raise UnsegError(f"unknown guide {mode!r}; use 'mean' or 'luma'")


class GreyGuides:
    """The grey guides (:func:`luminance`) of ``N`` images, computed once for filtering many
    masks against the same images, as a head's training does (each training image's target is
    refined about 60 times in FOUND's 500 steps). uint8 images with the ``"mean"`` guide are kept
    as their exact channel sums (int16: 2 bytes a pixel, half of float32's); others as float32."""

    def __init__(
        self,
        images: torch.Tensor,
        mode: GuideMode = "mean",
        chunk: int = 64,
        device: str | torch.device | None = None,
    ) -> None:
        """``images``: ``[N, 3, H, W]``, uint8 (0–255) or float in ``[0, 1]``; the guides are
        kept on ``device`` (default: the images')."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UnsegError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        self.sums = images.dtype == torch.uint8 and mode == "mean"
        parts = []
        for i in range(0, images.shape[0], chunk):
            x = images[i : i + chunk]
            if self.sums:
                parts.append(x.sum(dim=1, keepdim=True, dtype=torch.int16))
            else:
                parts.append(luminance(as_float_images(x), mode))
        self.values = torch.cat(parts).to(device or images.device)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The guides of images ``index`` (``[B]`` or a slice): ``[B, 1, H, W]`` float32 in
        ``[0, 1]``."""
        g = self.values[index]
        return g.float().div_(765.0) if self.sums else g


def refine_masks(
    masks: torch.Tensor,
    images: torch.Tensor,
    config: GuidedFilterConfig | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Guided-filter soft masks ``[B, K, H, W]`` with their images ``[B, 3, H, W]`` in ``[0, 1]``.

    Each mask channel is standardised per image (zero mean, unit std; constant channels are only
    centred), filtered, and restored. ``clamp`` clips the result to ``[0, 1]`` (probabilities).
    """
    cfg = config or GuidedFilterConfig()
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise UnsegError(
            f"masks {tuple(masks.shape)} and images {tuple(images.shape)} differ in batch or size"
        )
    guide = luminance(images.to(masks.dtype), cfg.guide)
    if cfg.standardize:
        mean = masks.mean(dim=(-2, -1), keepdim=True)
        std = masks.std(dim=(-2, -1), keepdim=True, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        out = guided_filter(guide, (masks - mean) / std, cfg.radius, cfg.eps) * std + mean
    else:
        out = guided_filter(guide, masks, cfg.radius, cfg.eps)
    return out.clamp(0.0, 1.0) if clamp else out
