"""Colour helpers shared by the augmentations and the refinement: BT.601 luma."""

from __future__ import annotations

import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 R, G, B


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``[..., 1, H, W]`` of RGB ``[..., 3, H, W]`` (same dtype and range)."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(dim=-3, keepdim=True)
