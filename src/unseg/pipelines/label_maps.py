"""Semantic label maps from a fitted estimator: logits of cached or fresh features, refined at
the working resolution (the resized image), upsampled to the original size, written as palette
PNGs and overlays.

Memory does not follow the input's size beyond its ``[H, W]`` labels and overlay: the class
probabilities are upsampled and argmaxed tile by tile (:func:`upsample_argmax`, equal to the
one-piece bilinear upsampling then argmax), the overlay is the resized image upscaled and blended
by Pillow in uint8.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.data.inputs import output_name
from unseg.data.resize import upsample_argmax
from unseg.feature_store import FeatureSet
from unseg.methods.base import SemanticEstimator
from unseg.pipelines.pseudo_labels import hwc
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import DEFAULT_REFINE, RefineConfig, refine_many
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_threads
from unseg.utils.io import atomic_write
from unseg.utils.palette import png_palette
from unseg.utils.progress import Bar, progress_bar
from unseg.utils.timing import Timings

CHUNK = 16  # images per round of prediction (logits, refinement in the pool, writing)
PNG_LEVEL = 1  # zlib level of the label PNGs: the same pixels, ~60x faster than Pillow's 6
JPEG_QUALITY = 90
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class PredictSettings:
    """How a run predicts: flip averaging, refinement, upsampling factor of the logits."""

    flip: bool = True
    refine: str = DEFAULT_REFINE
    label_factor: int = 2


@dataclass
class LabelWriter:
    """Where and how label PNGs (and overlays) are written, and what was written."""

    out_dir: Path
    names_root: Path
    overlay_dir: Path | None
    report: BatchReport
    palette: list[int] = field(default_factory=png_palette)

    def write(self, path: Path, labels: np.ndarray, image: torch.Tensor) -> None:
        """``labels [H, W]`` (class ids < 256) of ``path``; the overlay on its resized ``image``
        ``[3, h, w]`` uint8, upscaled to ``[H, W]``."""
        mask = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).convert("P")
        mask.putpalette(self.palette)
        target = self.out_dir / output_name(path, self.names_root)
        atomic_write(target, lambda p: mask.save(p, format="PNG", compress_level=PNG_LEVEL))
        self.report.written.append(target)
        if self.overlay_dir is not None:
            picture = overlay_image(image, mask)
            jpg = (self.overlay_dir / output_name(path, self.names_root)).with_suffix(".jpg")
            atomic_write(jpg, lambda p: picture.save(p, format="JPEG", quality=JPEG_QUALITY))


def overlay_image(image: torch.Tensor, mask: Image.Image) -> Image.Image:
    """The resized uint8 ``image [3, h, w]`` upscaled (bilinear) to the palette ``mask``'s size
    ``[H, W]`` and blended half and half with its label colours, in uint8 by Pillow."""
    big = Image.fromarray(hwc(image)).resize(mask.size, Image.Resampling.BILINEAR)
    return Image.blend(big, mask.convert("RGB"), OVERLAY_ALPHA)


def on_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → ``[H, W, 3]`` on ``device`` (what the refinement takes)."""
    return image.to(device).permute(1, 2, 0)


@torch.inference_mode()
def class_logits(
    estimator: SemanticEstimator, feats: FeatureSet, path: Path, settings: PredictSettings,
    device: torch.device,
) -> torch.Tensor:
    """The estimator's logits ``[K, H', W']`` for ``path`` at its resized image size, on
    ``device``."""
    f = feats[path].float()
    if settings.flip:
        f = (f + feats.extra(path, "flipped").float()) / 2
    lg = estimator.logits(f.to(device), settings.label_factor)
    size = feats.image_size(path)
    return F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0]


def refined_probabilities(
    estimator: SemanticEstimator,
    feats: FeatureSet,
    paths: Sequence[Path],
    settings: PredictSettings,
    device: torch.device,
    pool: CRFPool,
    timings: Timings,
) -> Iterator[tuple[Path, torch.Tensor, torch.Tensor]]:
    """``(path, refined class probabilities [K, H', W'], resized uint8 image [3, H', W'])`` of
    each of ``paths`` (whose features and extras are in ``feats``), :data:`CHUNK` at a time.

    The logits and their refinement stay on ``device`` (each image is taken there once, for
    its refinement); the probabilities are on ``device``, the image where ``feats`` keeps it."""
    refine = RefineConfig(settings.refine, pool.config)  # type: ignore[arg-type]
    paths = list(paths)
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        images = [feats.extra(p, "image") for p in chunk]
        with timings.stage("predicting"), cpu_threads(device, 1):
            # one intra-op thread: many mid-sized ops, and the refinement threads need
            # the cores; on a shared machine this is several times faster than two
            logits = [class_logits(estimator, feats, p, settings, device) for p in chunk]
        with timings.stage("refinement"):
            probs = refine_many(logits, [on_device(im, device) for im in images], refine, pool)
        yield from zip(chunk, probs, images, strict=True)


def predict_label_maps(
    estimator: SemanticEstimator,
    feats: FeatureSet,
    paths: Sequence[Path],
    settings: PredictSettings,
    device: torch.device,
    pool: CRFPool,
    writer: LabelWriter,
    timings: Timings,
    bar: Bar | None = None,
) -> None:
    """Predict, refine and write ``paths`` (whose features and extras are in ``feats``):
    :func:`refined_probabilities`, argmaxed at each image's own size
    (:func:`upsample_argmax`), handed to ``writer.write(path, labels, image)``.

    ``bar``: a caller's progress bar to advance by the images written (a command that predicts
    in several parts keeps one bar); None: this call shows its own."""
    paths = list(paths)
    own = progress_bar(len(paths), "predict") if bar is None else nullcontext(bar)
    with own as shown:
        for p, q, image in refined_probabilities(estimator, feats, paths, settings, device, pool,
                                                 timings):
            with timings.stage("writing"):
                writer.write(p, upsample_argmax(q, feats.original_size(p)), image)
            shown.update(1)


def gather_report(report: BatchReport) -> BatchReport:
    """Every rank's written files and failures (``report`` alone in a single process)."""
    if not dist.is_distributed():
        return report
    parts = dist.all_gather_objects((report.written, report.failed))
    return BatchReport().merge(*(BatchReport(written, failed) for written, failed in parts))
