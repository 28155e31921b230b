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
from unseg.refine.saliency_crf import SaliencyCRFConfig
from unseg.utils.options import check_bounds, option


@dataclass
class HeadTrainingConfig:
    """Multi-scale consistency, guided filter, dense CRF and seed of a saliency head's
    training and prediction."""

    image_size: int = option(
        320,
        "training crop side and prediction short side in pixels",
        flags=("--size",),
    )
    multiscale: bool = option(False, "multi-scale consistency (Boosting trick)")
    crop_scale: tuple[float, float] = option(
        (0.5, 0.5),
        "crop side as a fraction of the image side (LO HI)",
    )
    fixed_crop: bool = option(
        False,
        "the reference code's near-fixed (top-left) crop, for comparison",
    )
    crop_mode: CropMode = option(
        "cache",
        "crop features: cache (backbone once per pooled crop), roi (RoI-align of the full map) "
        "or backbone (every step)",
    )
    crop_pool: int = option(4, "crops cached per image", at_least=1)
    weight_consistency: float = option(0.01, "weight of the multi-scale MSE", at_least=0)
    guided_filter: bool = option(
        True, "guided-filter refinement at prediction, when the dense CRF is off"
    )
    guided: GuidedFilterConfig = field(default_factory=GuidedFilterConfig)
    dense_crf: bool | None = option(
        None,
        "2-label dense-CRF refinement at prediction, of the unfiltered map, in place of the "
        "guided filter (default: on, as measured for the spectral cut and the trained heads)",
    )
    crf: SaliencyCRFConfig = field(default_factory=SaliencyCRFConfig)
    seed: int = option(0, "random seed")

    def __post_init__(self) -> None:
        """Refuse values out of their fields' bounds (:func:`~unseg.utils.options.option`)."""
        check_bounds(self)
