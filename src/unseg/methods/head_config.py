"""The training settings both saliency heads share (FOUND-style and SEMPART-style).

Both heads train with the Boosting paper's two tricks: multi-scale consistency
(:mod:`unseg.methods.multiscale`, crops from :mod:`unseg.methods.crop_cache`) and the guided
filter (:mod:`unseg.refine.guided_filter`). Their fields live here once; each head's config adds
its own loss and optimiser fields (and its weight of the base loss on the crop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unseg.methods.crop_cache import CropMode
from unseg.refine.guided_filter import GuidedFilterConfig


@dataclass
class HeadTrainingConfig:
    """Multi-scale consistency, guided filter and seed of a saliency head's training."""

    image_size: int = 320
    multiscale: bool = False
    crop_scale: tuple[float, float] = (0.5, 0.5)
    fixed_crop: bool = False
    crop_mode: CropMode = "cache"
    crop_pool: int = 4
    weight_consistency: float = 0.01
    guided_filter: bool = True
    guided: GuidedFilterConfig = field(default_factory=GuidedFilterConfig)
    seed: int = 0
