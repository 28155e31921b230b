"""Refinement of per-class scores on the image: none, dense CRF, guided filter, or both.

One function (:func:`refine_logits`) for every choice, so a pipeline composes them the same way
whichever is chosen, and :class:`unseg.refine.crf.CRFPool` runs it across threads. Everything
runs on the logits' device (the image is taken there once), so a pipeline on a GPU refines
there without a round trip through the host.

- ``none``: the softmax of the logits;
- ``crf``: the dense CRF's marginals (:mod:`unseg.refine.crf`, the reference parameters);
- ``guided``: the K-channel softmax filtered by :func:`unseg.refine.guided_filter.guided_filter`
  with the image's BT.601 luma as guide (radius 9, ε = 1e-3, as the Boosting paper; by default
  the fast guided filter, coefficients at half size: ``RefineConfig.subsample``), clipped at 0
  and renormalised per pixel;
- ``guided+crf``: those filtered probabilities as the CRF's unary (``−log p``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from unseg.data.color import luma
from unseg.errors import UnsegError
from unseg.refine.crf import CRFConfig, CRFPool, crf_probabilities
from unseg.refine.guided_filter import guided_filter

Refine = Literal["none", "crf", "guided", "guided+crf"]
REFINES: tuple[str, ...] = ("none", "crf", "guided", "guided+crf")
# The default for semantic predictions; the lead sets it from the measurements (bench/primaps.py).
DEFAULT_REFINE: Refine = "crf"
# PriMaPs pseudo-labels: the CRF, as the paper.
DEFAULT_PSEUDO_REFINE: Refine = "crf"
_FLOOR = 1e-8
Image = np.ndarray | torch.Tensor  # uint8 RGB [H, W, 3]: an array, or a tensor on any device


@dataclass(frozen=True)
class RefineConfig:
    """Which refinement and its parameters."""

    mode: Refine = DEFAULT_REFINE
    crf: CRFConfig = field(default_factory=CRFConfig)
    radius: int = 9
    eps: float = 1e-3
    # the fast guided filter (coefficients fitted at 1/2 size, He & Sun 2015): half the exact
    # filter's time, and within 0.02 mIoU of it on three fitted VOC runs (both sets;
    # docs/results-primaps.md); 1 = the exact filter
    subsample: int = 2


def check_refine(mode: str) -> Refine:
    """``mode`` if it is a known refinement, else a clear error listing them."""
    if mode not in REFINES:
        raise UnsegError(f"unknown refinement {mode!r}; use one of {', '.join(REFINES)}")
    return mode  # type: ignore[return-value]


def guided_probs(
    probs: torch.Tensor,
    image: Image,
    radius: int = 9,
    eps: float = 1e-3,
    subsample: int = 1,
) -> torch.Tensor:
    """Guided-filtered probabilities ``[K, H, W]`` of ``probs [K, H, W]`` on uint8 RGB
    ``image [H, W, 3]`` (luma guide), clipped at 0 and renormalised to sum to 1 per pixel;
    on the probabilities' device."""
    if tuple(probs.shape[1:]) != tuple(image.shape[:2]):
        raise UnsegError(
            f"probabilities {tuple(probs.shape)} do not match image {tuple(image.shape)}")
    pixels = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray)
                             else image)
    rgb = pixels.to(probs.device).permute(2, 0, 1).float().div(255.0)
    q = guided_filter(luma(rgb)[None], probs.float()[None], radius, eps, subsample)[0]
    q = q.clamp_min(0)
    return q / q.sum(dim=0, keepdim=True).clamp_min(_FLOOR)


def refine_logits(
    logits: torch.Tensor, image: Image, config: RefineConfig | None = None
) -> torch.Tensor:
    """Refined class probabilities ``[K, H, W]`` of ``logits [K, H, W]`` (at the image's size)
    on uint8 RGB ``image [H, W, 3]``, on the logits' device; see the module docstring for the
    modes."""
    config = config or RefineConfig()
    check_refine(config.mode)
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.ndim != 3 or tuple(logits.shape[1:]) != tuple(image.shape[:2]):
        raise UnsegError(
            f"logits {tuple(logits.shape)} must be [K, H, W] at the image's size "
            f"{tuple(image.shape[:2])}"
        )
    if config.mode == "crf":
        return crf_probabilities(image, logits, config.crf)
    probs = logits.softmax(dim=0)
    if config.mode == "none":
        return probs
    probs = guided_probs(probs, image, config.radius, config.eps, config.subsample)
    if config.mode == "guided":
        return probs
    return crf_probabilities(image, probs.clamp_min(_FLOOR).log(), config.crf)


def _refine_task(args: tuple[torch.Tensor, Image, RefineConfig]) -> torch.Tensor:
    logits, image, config = args
    return refine_logits(logits, image, config)


def refine_many(
    logits: Sequence[torch.Tensor],
    images: Sequence[Image],
    config: RefineConfig,
    pool: CRFPool | None = None,
) -> list[torch.Tensor]:
    """:func:`refine_logits` of each ``(logits, image)`` pair, across ``pool``'s threads when
    the refinement is worth sending there (any mode but ``none``); each result on its logits'
    device."""
    if len(logits) != len(images):
        raise UnsegError(f"{len(images)} images but {len(logits)} logit maps")
    tasks = [(lg.float(), img, config) for lg, img in zip(logits, images, strict=True)]
    if pool is None or config.mode == "none":
        return [_refine_task(t) for t in tasks]
    return pool.map_fn(_refine_task, tasks)
