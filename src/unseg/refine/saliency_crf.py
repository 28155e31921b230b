"""A 2-label dense CRF on a foreground probability map (object discovery's masks).

The unary comes from the soft foreground probability ``p [H, W]`` at the image's size: ``p``
clipped to ``[eps, 1 − eps]`` (a 0/1 mask gets a finite unary), its logit divided by a
temperature ``T`` (foreground logit ``logit(p) / T``, background 0, so the labels' unaries are
``−log sigmoid(± logit(p) / T)``); the pairwise terms are the fully connected CRF's Gaussian and
bilateral kernels on the uint8 RGB image (:mod:`unseg.refine.crf`, the same model and lattice
as the semantic CRF). The refined map is the CRF's foreground marginal.

The defaults (``eps`` 0.05, ``T`` 1; Gaussian kernel sxy 3, weight 3; bilateral sxy 80, srgb 13,
weight 10: pydensecrf's example, the kernels SelfMask-style code uses) are the setting chosen by
the mean of ECSSD IoU and VOC07 CorLoc over the settings tried, on FOUND's pseudo-masks, the
spectral cut and two trained heads (docs/results-boosting.md, "Dense-CRF refinement of the
saliency masks"). A 0/1 mask's two unaries then differ by ``log 19 ≈ 2.9`` per pixel, which the
bilateral kernel (weight 10) overrules where a pixel's neighbourhood in position and colour votes
the other way: along a coarse mask's blocky edges. The semantic CRF's kernels (weights 3 and 4)
barely moved a 0/1 map at ``T`` 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unseg.errors import UnsegError
from unseg.refine.crf import CRFConfig, crf_probabilities, dense_crf_reference
from unseg.utils.options import option


@dataclass
class SaliencyCRFConfig:
    """The 2-label CRF's unary (clip ``eps``, ``temperature``) and its kernels (as in
    :class:`unseg.refine.crf.CRFConfig`; both labels always take part)."""

    eps: float = option(
        0.05,
        "dense CRF: clip the foreground probability to [EPS, 1 - EPS]",
        above=0, below=0.5,
    )
    temperature: float = option(1.0, "dense CRF: divide the foreground logit by this", above=0)
    iterations: int = option(10, "dense CRF: mean-field iterations", at_least=0)
    gaussian_sxy: float = option(3.0, "dense CRF: Gaussian kernel's width in pixels", above=0)
    gaussian_compat: float = option(3.0, "dense CRF: Gaussian kernel's weight", at_least=0)
    bilateral_sxy: float = option(80.0, "dense CRF: bilateral kernel's width in pixels", above=0)
    bilateral_srgb: float = option(
        13.0,
        "dense CRF: bilateral kernel's colour width (0-255)",
        above=0,
    )
    bilateral_compat: float = option(10.0, "dense CRF: bilateral kernel's weight", at_least=0)

    @property
    def crf(self) -> CRFConfig:
        """The kernels as the CRF takes them (no label floor: both labels always take part)."""
        return CRFConfig(self.iterations, self.gaussian_sxy, self.gaussian_compat,
                         self.bilateral_sxy, self.bilateral_srgb, self.bilateral_compat,
                         label_floor=0.0)


def foreground_logits(prob: torch.Tensor, eps: float, temperature: float) -> torch.Tensor:
    """Logits ``[2, H, W]`` (background 0, foreground ``logit(p) / T``) of ``prob [H, W]``
    clipped to ``[eps, 1 − eps]``."""
    if prob.ndim != 2:
        raise UnsegError(f"foreground probability must be [H, W], got {tuple(prob.shape)}")
    if not 0 < eps < 0.5:
        raise UnsegError(f"eps must lie in (0, 0.5), got {eps}")
    if temperature <= 0:
        raise UnsegError(f"temperature must be > 0, got {temperature}")
    p = prob.float().clamp(eps, 1.0 - eps)
    fg = (torch.log(p) - torch.log1p(-p)) / temperature
    return torch.stack([torch.zeros_like(fg), fg])


def crf_foreground(
    prob: torch.Tensor, image: np.ndarray | torch.Tensor, config: SaliencyCRFConfig | None = None
) -> torch.Tensor:
    """The CRF's foreground marginal ``[H, W]`` (float32 in ``[0, 1]``, on ``prob``'s device)
    of ``prob [H, W]`` on ``image`` (uint8 RGB ``[H, W, 3]``, the same size)."""
    config = config or SaliencyCRFConfig()
    if tuple(prob.shape) != tuple(image.shape[:2]):
        raise UnsegError(f"probability {tuple(prob.shape)} and image {tuple(image.shape)} "
                         "differ in size")
    logits = foreground_logits(prob, config.eps, config.temperature)
    return crf_probabilities(image, logits, config.crf)[1]


def crf_foreground_reference(
    prob: torch.Tensor, image: np.ndarray, config: SaliencyCRFConfig | None = None
) -> np.ndarray:
    """:func:`crf_foreground` computed by ``pydensecrf`` (the reference; a dev/test
    dependency): float32 ``[H, W]``."""
    config = config or SaliencyCRFConfig()
    logits = foreground_logits(prob, config.eps, config.temperature)
    return dense_crf_reference(image, logits, config.crf)[1]
