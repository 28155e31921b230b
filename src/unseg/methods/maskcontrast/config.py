"""MaskContrast's settings (the paper's values, with the CPU design's departures)."""

from __future__ import annotations

from dataclasses import dataclass

from unseg.utils.options import check_bounds, option


@dataclass(frozen=True)
class MaskContrastConfig:
    """MaskContrast settings; defaults are the paper's (unsupervised-saliency) values except
    ``aspp_rates`` (the reference's 12/24/36 sit on a 28-cell grid; frozen-backbone grids of
    7-20 cells take 2/4/6), the CPU view design (module docstring), the CPU budget:
    ``loss_size`` 56 (paper: the losses at the 224-pixel view size), and the batch: 16 at lr
    0.01 (paper: 128 at 0.004, on 10,582 images; on a few hundred images that is 4 steps an
    epoch, and 16/0.01 scored 1.7 to 5.0 points higher on both VOC dev sets, 3 training seeds,
    ``docs/results-maskcontrast.md``). With them the paper's 40 epochs on the 422 VOC2007 images
    of ``../shared/data`` take minutes on a shared 2-core CPU, and beat 15 epochs in every
    measured pair on both VOC sets; ``loss_size=None`` gives the paper's losses."""

    embed_dim: int = option(32, "pixel embedding dimension", at_least=1)
    width: int = option(256, "decoder width", at_least=1)
    aspp_rates: tuple[int, ...] = option((2, 4, 6), "dilation rates of the ASPP branches")
    momentum: float = option(0.999, "momentum of the key model", at_least=0, at_most=1)
    temperature: float = option(0.5, "contrastive temperature T", above=0)
    queue_size: int = option(
        256,
        "prototype queue length (paper: 256 unsupervised, 128 supervised saliency)",
        flags=("--queue",),
        at_least=1,
    )
    lr: float = option(0.01, "SGD learning rate (paper: 0.004 at batch 128)", above=0)
    sgd_momentum: float = option(0.9, "SGD momentum", at_least=0)
    weight_decay: float = option(1e-4, "SGD weight decay", at_least=0)
    poly_power: float = option(0.9, "exponent of the poly learning-rate decay", at_least=0)
    epochs: int = option(
        40,
        "training epochs (the paper's 40)",
        at_least=1,
    )
    batch_size: int = option(
        16,
        "images per step (paper: 128 unsupervised, 64 supervised saliency; 16 scored higher on "
        "a few hundred images)",
        at_least=1,
    )
    view_size: int = option(224, "view side in image pixels", at_least=1)
    loss_size: int | None = option(
        56,
        "pixels per side where the losses are taken (0: the view size)",
        at_least=0,
    )
    crop_scale: tuple[float, float] = option((0.2, 1.0), "random resized crop area range (LO HI)")
    crop_ratio: tuple[float, float] = option(
        (3 / 4, 4 / 3),
        "random resized crop aspect range (LO HI)",
    )
    flip_p: float = option(0.5, "horizontal flip probability", at_least=0, at_most=1)
    min_view_area: float = option(0.01, "smallest salient share of a view", at_least=0, at_most=1)
    max_view_area: float = option(0.99, "largest salient share of a view", at_least=0, at_most=1)
    max_redraws: int = option(10, "view redraws before the whole image is used", at_least=0)
    saliency_weight: float = option(1.0, "weight of the balanced BCE saliency loss", at_least=0)
    jitter: tuple[float, float, float, float] = option(
        (0.4, 0.4, 0.4, 0.1),
        "colour jitter strengths (brightness, contrast, saturation, hue) of the photometric "
        "view the query is cut from (photometric_view)",
    )
    jitter_p: float = option(
        0.8,
        "colour jitter probability (photometric_view)",
        at_least=0, at_most=1,
    )
    grey_p: float = option(0.2, "greyscale probability (photometric_view)", at_least=0, at_most=1)
    train_last_stage: bool = option(
        False,
        "fine-tune the backbone's last stage with the head (CNN taps but the first; features "
        "are cached before that stage)",
    )
    stage_of: str = ""  # "backbone:tap" of the trained stage (the pipeline fills it)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse values out of their fields' bounds (:func:`~unseg.utils.options.option`)."""
        check_bounds(self)
