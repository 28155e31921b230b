"""Colour helpers shared by the augmentations, the heads and the refinement: uint8 → ``[0, 1]``
floats, BT.601 luma."""

from __future__ import annotations

import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 R, G, B


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``[..., 1, H, W]`` of RGB ``[..., 3, H, W]`` (same dtype and range)."""
    w = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * w).sum(dim=-3, keepdim=True)


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0–255) or float images in ``[0, 1]`` → float32 in ``[0, 1]`` (same shape)."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
