"""Multi-scale crops seen by a frozen backbone, computed once (the heads' training-cost design).

Multi-scale consistency (:mod:`unseg.methods.multiscale`) predicts a resized crop of every
training image at every step. The backbone is frozen, so the features of a crop depend only on
the image and the box: a training run can compute them once. Three ways to get a crop's
features, chosen by ``CropMode``:

- ``"cache"`` (default): per image, a pool of ``pool`` crop boxes is drawn once (the reference's
  crop: half the side, placed at random; ``fixed_crop`` gives its near-fixed, top-left crop),
  each crop is resized up to the input size and passed through the backbone once, and the
  features are kept (float16, in memory; :meth:`CropCache.save` / :meth:`CropCache.load` for
  safetensors). Every step then draws one of the image's pooled crops: an epoch costs the head
  alone, and the backbone runs ``1 + pool`` times per image for the whole training.
- ``"roi"``: RoI-align of the full image's feature map (bilinear crop-and-resize of the map,
  no backbone call, no memory); the crop's features are then an upsampled piece of the coarse
  map, not what the backbone sees in the enlarged crop.
- ``"backbone"``: the backbone on every crop at every step (exact, fresh boxes each time, and
  the cost of a backbone pass per image per step).

``bench/boosting.py`` measures the three (images/s and how close the ``"roi"`` features are to
the backbone's); see its docstring for which is the default and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unseg.data.color import as_float_images
from unseg.errors import InputFileError, UnsegError
from unseg.methods.multiscale import crop_resize, sample_crops
from unseg.utils.io import atomic_write

CropMode = Literal["cache", "roi", "backbone"]
CROP_MODES: tuple[str, ...] = ("cache", "roi", "backbone")
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def crop_images(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` (uint8 or ``[0, 1]``) cropped to ``boxes`` ``[B, 3]`` and resized
    back to ``H x W`` (bilinear): ``[B, 3, H, W]`` float in ``[0, 1]``."""
    x = as_float_images(images)
    return crop_resize(x, boxes.to(x.device), tuple(x.shape[-2:]))


def roi_crop_features(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """RoI-align of full-image feature maps ``[B, C, h, w]`` to ``boxes`` ``[B, 3]``, resized to
    ``h x w`` (bilinear): ``[B, C, h, w]``."""
    return crop_resize(features.float(), boxes.to(features.device), tuple(features.shape[-2:]))


@dataclass
class CropCache:
    """Pooled crops: ``boxes`` ``[N, P, 3]`` (top, left, side as fractions of the side, see
    :func:`unseg.methods.multiscale.sample_crops`) and their features ``[N, P, C, h, w]``."""

    boxes: torch.Tensor
    features: torch.Tensor

    def __post_init__(self) -> None:
        b, f = self.boxes, self.features
        if b.ndim != 3 or b.shape[-1] != 3 or f.ndim != 5 or f.shape[:2] != b.shape[:2]:
            raise UnsegError(
                f"crop cache needs boxes [N, P, 3] and features [N, P, C, h, w] for the same N "
                f"and P; got {tuple(b.shape)} and {tuple(f.shape)}"
            )

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def pool(self) -> int:
        """Crops per image."""
        return self.boxes.shape[1]

    def draw(
        self, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pooled crop per image of ``index`` ``[B]``, chosen uniformly: boxes ``[B, 3]`` and
        features ``[B, C, h, w]`` (float32)."""
        which = torch.randint(self.pool, (index.shape[0],), generator=generator)
        return self.boxes[index, which], self.features[index, which].float()

    def save(self, path: str | Path) -> None:
        """Write the cache to ``path`` (safetensors, atomically)."""
        tensors = {"boxes": self.boxes.contiguous(), "features": self.features.contiguous()}
        atomic_write(path, lambda p: save_file(tensors, str(p)))

    @classmethod
    def load(cls, path: str | Path) -> CropCache:
        """A cache written by :meth:`save`; a missing or malformed file is an ``InputFileError``."""
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise InputFileError(path, f"cannot read the crop cache: {exc}") from None
        missing = sorted({"boxes", "features"} - set(tensors))
        if missing:
            raise InputFileError(path, f"not a crop cache (no tensor {', '.join(missing)})")
        try:
            return cls(tensors["boxes"], tensors["features"])
        except UnsegError as exc:
            raise InputFileError(path, str(exc)) from None


@torch.no_grad()
def build_crop_cache(
    images: torch.Tensor,
    feature_fn: FeatureFn,
    pool: int,
    scale_range: tuple[float, float] = (0.5, 0.5),
    generator: torch.Generator | None = None,
    fixed_crop: bool = False,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
    device: torch.device | None = None,
) -> CropCache:
    """Draw ``pool`` crops per image of ``images`` ``[N, 3, H, W]`` (uint8 or ``[0, 1]``) and keep
    their backbone features (on the CPU, as ``dtype``): ``feature_fn`` maps ``[B, 3, H, W]`` in
    ``[0, 1]`` (on ``device``) to ``[B, C, h, w]``. The boxes come from ``generator`` in image
    order (deterministic)."""
    if pool < 1:
        raise UnsegError(f"a crop cache needs at least one crop per image, got pool={pool}")
    n = images.shape[0]
    boxes = sample_crops(n * pool, scale_range, generator, fixed_crop).view(n, pool, 3)
    feats: list[torch.Tensor] = []
    flat_boxes = boxes.view(-1, 3)
    step = max(1, batch_size)
    for start in range(0, n * pool, step):
        rows = torch.arange(start, min(start + step, n * pool))
        crops = crop_images(images[rows // pool].to(device), flat_boxes[rows])
        feats.append(feature_fn(crops).to("cpu", dtype))
    features = torch.cat(feats)
    return CropCache(boxes, features.view(n, pool, *features.shape[1:]))


class CropSource:
    """One crop per training image and step, by :data:`CropMode` (see the module docstring).

    Built once per fit from the training images ``[N, 3, H, W]`` and, for ``"cache"`` and
    ``"backbone"``, the frozen backbone ``feature_fn``.
    """

    def __init__(
        self,
        mode: CropMode,
        images: torch.Tensor,
        feature_fn: FeatureFn | None,
        pool: int,
        scale_range: tuple[float, float],
        fixed_crop: bool,
        generator: torch.Generator,
        batch_size: int = 8,
        device: torch.device | None = None,
    ) -> None:
        if mode not in CROP_MODES:
            raise UnsegError(f"unknown crop mode {mode!r}; use {', '.join(CROP_MODES)}")
        if mode != "roi" and feature_fn is None:
            raise UnsegError(f"crops from the {mode!r} mode need the backbone (set feature_fn)")
        self.mode = mode
        self.feature_fn = feature_fn
        self.scale_range = scale_range
        self.fixed_crop = fixed_crop
        self.cache: CropCache | None = None
        if mode == "cache":
            assert feature_fn is not None
            self.cache = build_crop_cache(
                images, feature_fn, pool, scale_range, generator, fixed_crop, batch_size,
                device=device,
            )

    def crops(
        self,
        index: torch.Tensor,
        features: torch.Tensor,
        images: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For training images ``index`` ``[B]`` with full-image ``features`` ``[B, C, h, w]`` and
        ``images`` ``[B, 3, H, W]`` (``[0, 1]``): boxes ``[B, 3]``, crop images ``[B, 3, H, W]``
        and crop features ``[B, C, h, w]`` (float32, on ``features``' device, no gradient)."""
        if self.cache is not None:
            boxes, feats = self.cache.draw(index.cpu(), generator)
            return boxes, crop_images(images, boxes), feats.to(features.device)
        boxes = sample_crops(index.shape[0], self.scale_range, generator, self.fixed_crop)
        crops = crop_images(images, boxes)
        with torch.no_grad():
            if self.mode == "roi":
                feats = roi_crop_features(features, boxes)
            else:
                assert self.feature_fn is not None
                feats = self.feature_fn(crops).float()
        return boxes, crops, feats.to(features.device)
