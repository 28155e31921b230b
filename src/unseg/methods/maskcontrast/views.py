"""MaskContrast's views: two random resized, flipped crops of an image's cached features and
saliency mask (RoI-align of the feature map, the CPU design), re-drawn until both hold some
salient area, and the photometric copy of the image that the query view is cut from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.data.color import luma
from unseg.data.transforms import color_jitter, sample_crop_box, uniform
from unseg.methods.maskcontrast.config import MaskContrastConfig

Box = tuple[float, float, float, float]  # top, left, height, width in image pixels


def _grid(
    box: Box, flip: bool, n: int, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """``grid_sample`` grid ``[1, n, n, 2]`` of the centres of an n×n split of ``box``."""
    top, left, ch, cw = box
    h, w = size
    steps = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    ys = 2.0 * (top + steps * ch) / h - 1.0
    xs = 2.0 * (left + steps * cw) / w - 1.0
    if flip:
        xs = xs.flip(0)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


def crop_features(
    features: torch.Tensor, box: Box, flip: bool, cells: int, image_size: tuple[int, int]
) -> torch.Tensor:
    """RoI-align ``features [C, h, w]`` (covering an image of ``image_size``) over ``box`` to
    ``[C, cells, cells]``: bilinear samples, 2x2 per output cell, averaged."""
    grid = _grid(box, flip, 2 * cells, image_size, features.device)
    x = F.grid_sample(
        features[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return F.avg_pool2d(x, 2)[0]


def crop_mask(mask: torch.Tensor, box: Box, flip: bool, size: int) -> torch.Tensor:
    """Nearest-neighbour crop of ``mask [H, W]`` over ``box`` to ``[size, size]`` (bool)."""
    grid = _grid(box, flip, size, tuple(mask.shape), mask.device)
    x = F.grid_sample(
        mask[None, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    return x[0, 0] > 0.5


@dataclass
class ViewPair:
    """Two views of one image: features ``[C, g, g]`` and masks ``[S, S]`` (bool)."""

    query: torch.Tensor
    key: torch.Tensor
    query_mask: torch.Tensor
    key_mask: torch.Tensor
    fallback: bool


def view_cells(features: torch.Tensor, mask: torch.Tensor, config: MaskContrastConfig) -> int:
    """Feature cells per side of a view of ``view_size`` mask pixels, for ``features [C, h, w]``
    covering ``mask [H, W]`` (the view keeps the image's stride in mask pixels)."""
    stride = math.sqrt(mask.shape[0] * mask.shape[1] / (features.shape[1] * features.shape[2]))
    return max(1, round(config.view_size / stride))


def draw_views(
    features: torch.Tensor,
    mask: torch.Tensor,
    config: MaskContrastConfig,
    gen: torch.Generator,
    query_features: torch.Tensor | None = None,
) -> ViewPair:
    """Query and key views of one image (``features [C, h, w]``, ``mask [H, W]``) whose salient
    areas both lie in ``(min_view_area, max_view_area)``; the query is cut from
    ``query_features`` when given (a photometrically jittered copy)."""
    size = (int(mask.shape[0]), int(mask.shape[1]))
    cells = view_cells(features, mask, config)
    side = config.loss_size or config.view_size
    binary = mask > 0.5
    lo, hi = config.min_view_area, config.max_view_area
    chosen = None
    for _ in range(config.max_redraws):
        draws = []
        for _ in range(2):
            box = sample_crop_box(size, gen, config.crop_scale, config.crop_ratio)
            flip = uniform(gen) < config.flip_p
            draws.append((box, flip, crop_mask(binary, box, flip, side)))
        if all(lo < float(m.float().mean()) < hi for _, _, m in draws):
            chosen = draws
            break
    fallback = chosen is None
    if chosen is None:
        whole = (0.0, 0.0, float(size[0]), float(size[1]))
        chosen = [(whole, False, crop_mask(binary, whole, False, side))] * 2
    (qbox, qflip, qmask), (kbox, kflip, kmask) = chosen
    source = features if query_features is None else query_features
    return ViewPair(
        query=crop_features(source, qbox, qflip, cells, size),
        key=crop_features(features, kbox, kflip, cells, size),
        query_mask=qmask,
        key_mask=kmask,
        fallback=fallback,
    )


def photometric_view(
    image: torch.Tensor, gen: torch.Generator, config: MaskContrastConfig | None = None
) -> torch.Tensor:
    """The paper's photometric augmentation of ``image [3, H, W]`` (float in ``[0, 1]``): colour
    jitter with probability ``jitter_p``, then greyscale with probability ``grey_p``; for the
    ``student_features`` that let the query view keep photometric invariance."""
    cfg = config or MaskContrastConfig()
    if uniform(gen) < cfg.jitter_p:
        image, _ = color_jitter(image, None, gen, *cfg.jitter)
    if uniform(gen) < cfg.grey_p:
        image = luma(image).expand(3, -1, -1).clone()
    return image
