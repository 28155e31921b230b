"""The guided filter (He, Sun and Tang, ECCV 2010 / TPAMI 2013) with a grey guide.

Batched, differentiable (plain torch ops) and O(pixels) whatever the radius: every box mean is
two cumulative sums and two gathers. At the borders the window is cut to the image and each box
sum is divided by the number of pixels actually inside it (He's reference formulation); OpenCV's
``cv2.ximgproc.guidedFilter`` reflects the image at the border instead, so the two agree exactly
only where the nested windows (2r from the border) lie inside the image.

The Boosting paper's refinement (:func:`refine_masks`): grey guide = the image's luminance, radius
9, ε = 1e-3, each mask standardised per image and channel before filtering and restored after.
The filter is linear in the filtered input with weights summing to one, so the standardisation
does not change the result in exact arithmetic; it keeps float32 sums well conditioned. For the
same reason K-channel soft maps that sum to one still sum to one after filtering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unseg.data.color import luma
from unseg.errors import UnsegError

GuideMode = Literal["mean", "luma"]

# ITU-R BT.601 luma weights
@dataclass
class GuidedFilterConfig:
    """Guided-filter refinement as in the Boosting paper (radius 9, ε = 1e-3, mean-RGB guide)."""

    radius: int = 9
    eps: float = 1e-3
    guide: GuideMode = "mean"
    standardize: bool = True


def _box_sum_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum over the window ``[i - r, i + r]`` cut to the array, along ``dim`` (cumsum trick)."""
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    zero = torch.zeros_like(c.narrow(dim, 0, 1))
    c = torch.cat([zero, c], dim=dim)
    idx = torch.arange(n, device=x.device)
    hi = (idx + radius).clamp(max=n - 1) + 1
    lo = (idx - radius).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo)


def _window_counts(n: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """Number of pixels in each cut window along an axis of length ``n``: ``[n]``."""
    idx = torch.arange(n, device=like.device)
    hi = (idx + radius).clamp(max=n - 1)
    lo = (idx - radius).clamp(min=0)
    return (hi - lo + 1).to(like.dtype)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)²`` window cut to the image: ``[..., H, W]`` → ``[..., H, W]``."""
    if radius < 0:
        raise UnsegError(f"box filter radius must be >= 0, got {radius}")
    h, w = x.shape[-2], x.shape[-1]
    s = _box_sum_1d(_box_sum_1d(x, radius, x.ndim - 2), radius, x.ndim - 1)
    count = _window_counts(h, radius, x)[:, None] * _window_counts(w, radius, x)[None, :]
    return s / count


def guided_filter(
    guide: torch.Tensor, src: torch.Tensor, radius: int = 9, eps: float = 1e-3
) -> torch.Tensor:
    """Filter ``src`` ``[B, K, H, W]`` with the grey ``guide`` ``[B, 1, H, W]``.

    Returns ``[B, K, H, W]``: ``q = mean(a) * I + mean(b)`` with ``a = cov(I, p) / (var(I) + ε)``
    and ``b = mean(p) - a * mean(I)`` over each ``(2r+1)²`` window.
    """
    if guide.ndim != 4 or guide.shape[1] != 1:
        raise UnsegError(f"guide must be [B, 1, H, W], got {tuple(guide.shape)}")
    if src.ndim != 4 or src.shape[0] != guide.shape[0] or src.shape[-2:] != guide.shape[-2:]:
        raise UnsegError(
            f"src {tuple(src.shape)} does not match guide {tuple(guide.shape)} (want [B, K, H, W])"
        )
    # the result is invariant to a constant shift of the guide; centring it keeps var(I) precise
    guide = guide - guide.mean(dim=(-2, -1), keepdim=True)
    mean_i = box_mean(guide, radius)
    mean_p = box_mean(src, radius)
    var_i = box_mean(guide * guide, radius) - mean_i * mean_i
    cov_ip = box_mean(guide * src, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_mean(a, radius) * guide + box_mean(b, radius)


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
