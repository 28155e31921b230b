"""Semantic label maps from a fitted estimator: logits of cached or fresh features, refined on
the resized image, upsampled to the original size, written as palette PNGs and overlays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unseg.feature_store import FeatureSet
from unseg.methods.base import SemanticEstimator
from unseg.pipelines.pseudo_labels import hwc
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import DEFAULT_REFINE, RefineConfig, refine_many
from unseg.report.overlays import overlay
from unseg.report.palette import png_palette
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_threads
from unseg.utils.io import save_jpeg_atomic, save_png_atomic
from unseg.utils.progress import chunked
from unseg.utils.timing import Timings

CHUNK = 16  # images per round of prediction (logits, refinement in the pool, writing)


@dataclass(frozen=True)
class PredictSettings:
    """How a run predicts: flip averaging, refinement, upsampling factor of the logits."""

    flip: bool = True
    refine: str = DEFAULT_REFINE
    label_factor: int = 2


def too_small(feats: FeatureSet, stride: int, report: BatchReport) -> list[Path]:
    """The images of ``feats`` at least one patch wide; the others are reported."""
    keep = []
    for p in feats.paths:
        h, w = feats.original_size(p)
        if min(h, w) < stride:
            report.fail(p, f"image {w}x{h} is smaller than one {stride}-pixel patch")
        else:
            keep.append(p)
    return keep


def output_name(path: Path, root: Path) -> Path:
    """``path``'s mask name: its path under ``root`` (its name for a single file), as PNG."""
    rel = path.name if root.is_file() else path.relative_to(root)
    return Path(rel).with_suffix(".png")


@dataclass
class LabelWriter:
    """Where and how label PNGs (and overlays) are written, and what was written."""

    out_dir: Path
    names_root: Path
    overlay_dir: Path | None
    report: BatchReport
    palette: list[int] = field(default_factory=png_palette)

    def write(self, path: Path, labels: np.ndarray, image: torch.Tensor) -> None:
        """``labels [H, W]`` (class ids) of ``path``; the overlay on its resized ``image``."""
        lab8 = labels.astype(np.uint8)
        target = self.out_dir / output_name(path, self.names_root)
        save_png_atomic(target, lab8, palette=self.palette)
        self.report.written.append(target)
        if self.overlay_dir is not None:
            size = labels.shape
            big = F.interpolate(image[None].float(), size=size, mode="bilinear",
                                align_corners=False)[0].round().clamp(0, 255).byte()
            jpg = (self.overlay_dir / output_name(path, self.names_root)).with_suffix(".jpg")
            save_jpeg_atomic(jpg, overlay(hwc(big), lab8))


@torch.inference_mode()
def class_logits(
    estimator: SemanticEstimator, feats: FeatureSet, path: Path, settings: PredictSettings,
    device: torch.device,
) -> torch.Tensor:
    """The estimator's logits ``[K, H', W']`` for ``path`` at its resized image size."""
    f = feats[path].float()
    if settings.flip:
        f = (f + feats.extra(path, "flipped").float()) / 2
    lg = estimator.logits(f.to(device), settings.label_factor)
    size = feats.image_size(path)
    return F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0].cpu()


def predict_label_maps(
    estimator: SemanticEstimator,
    feats: FeatureSet,
    paths: Sequence[Path],
    settings: PredictSettings,
    device: torch.device,
    pool: CRFPool,
    writer: LabelWriter,
    timings: Timings,
) -> None:
    """Predict, refine and write ``paths`` (whose features and extras are in ``feats``)."""
    refine = RefineConfig(settings.refine, pool.config)  # type: ignore[arg-type]
    for part in chunked(list(paths), CHUNK, desc="predict"):
        chunk = list(part)
        images = [feats.extra(p, "image") for p in chunk]
        with timings.stage("predicting"), cpu_threads(device, 1):
            # one intra-op thread: many mid-sized ops, and the refinement processes need the
            # cores; on a shared machine this is several times faster than two
            logits = [class_logits(estimator, feats, p, settings, device) for p in chunk]
        with timings.stage("refinement"):
            probs = refine_many(logits, [hwc(im) for im in images], refine, pool)
        with timings.stage("writing"):
            for p, q, image in zip(chunk, probs, images, strict=True):
                size = feats.original_size(p)
                up = F.interpolate(q[None], size=size, mode="bilinear", align_corners=False)[0]
                writer.write(p, up.argmax(0).numpy(), image)


def gather_report(report: BatchReport) -> BatchReport:
    """Every rank's written files and failures (``report`` alone in a single process)."""
    if not dist.is_distributed():
        return report
    parts = dist.all_gather_objects((report.written, report.failed))
    return BatchReport(
        written=[w for part in parts for w in part[0]],
        failed=[f for part in parts for f in part[1]],
    )
