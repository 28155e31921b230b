"""Semantic pipelines: fit a registered semantic method on a folder, predict label PNGs, and
``segment`` = both in one pass.

One image flows once: decoded and resized once by the extraction, which computes and caches
what later stages need (the features, the features of the mirror image for flip-averaged
prediction, the resized uint8 image for PriMaPs and the refinement, the student view's features
when the method trains on them); the proposals, the fit and the prediction take those in memory.
``segment`` predicts with the estimator it has just fitted (and still saves the run); one worker
pool serves the pseudo-labels and the prediction's refinement.

Run folder (``unseg.runs``): the method's config and state, the backbone (name, tap, weights
sha256), the feature size, the prediction defaults (``flip``, ``refine``, ``label_factor``) and
seconds per stage (``timings``), plus ``cache/``: the feature cache and the PriMaPs
pseudo-labels.

Prediction per image: the estimator's ``logits`` of its features (averaged with those of the
mirror image when ``flip``) at ``label_factor`` times the feature resolution, upsampled
bilinearly to the resized image, refined there (``unseg.refine.semantic``: none, CRF, guided
filter, or both), the probabilities upsampled bilinearly to the original image size, argmax →
palette PNG (pixel value = class id) and a JPEG overlay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import backbone_weights_sha256, get_spec
from unseg.backbones.base import Backbone
from unseg.data.datasets import dataset_images
from unseg.data.layouts import resolve_image_dir
from unseg.errors import UnsegError
from unseg.features import FeatureSet, extract_features
from unseg.methods.base import SemanticEstimator
from unseg.pipelines.backbone import open_backbone, open_fitted_backbone, resolve_backbone_name
from unseg.pipelines.fitting import (
    FitResult,
    build_config,
    extras_for,
    fit_estimator,
    training_inputs,
)
from unseg.pipelines.pseudo_labels import compute_pseudo_labels, hwc, pseudo_label_dir
from unseg.proposals.primaps import PriMaPsConfig
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import (
    DEFAULT_PSEUDO_REFINE,
    DEFAULT_REFINE,
    RefineConfig,
    check_refine,
    refine_many,
)
from unseg.registry import MethodSpec, get_method
from unseg.report.overlays import overlay
from unseg.report.palette import png_palette
from unseg.runs import load_fitted, save_fitted
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, cpu_threads, resolve_device, seed_everything
from unseg.utils.io import save_jpeg_atomic, save_png_atomic
from unseg.utils.progress import progress
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

CHUNK = 16  # images per round of prediction (logits, refinement in the pool, writing)
MAX_CLASSES = 256  # label PNGs are 8-bit palette images
# `unseg segment` on a handful of photos: a few coarse classes shared by them (person, animal,
# sky, ground, object) rather than a dataset's 21 or 27.
DEFAULT_SEGMENT_CLASSES = 5


@dataclass(frozen=True)
class SemanticSettings:
    """How a semantic command runs, besides the method's own config.

    ``size``: feature short side; ``label_factor``: logits at this multiple of the feature
    resolution (training and prediction); ``refine``: the prediction's refinement (stored in the
    run as its default); ``pseudo_refine``: the PriMaPs pseudo-labels' (the paper: CRF).
    """

    backbone: str | None = None
    weights: str | None = None
    tap: str | None = None
    size: int = 320
    label_factor: int = 2
    refine: str = DEFAULT_REFINE
    pseudo_refine: str = DEFAULT_PSEUDO_REFINE
    seed: int = 0
    device: str | None = None
    num_workers: int | None = None


@dataclass(frozen=True)
class PredictSettings:
    """How a run predicts: flip averaging, refinement, upsampling factor of the logits."""

    flip: bool = True
    refine: str = DEFAULT_REFINE
    label_factor: int = 2


def default_workers() -> int:
    """Refinement processes of this rank: its share of the CPU cores among the torchrun ranks,
    at most 8."""
    return max(1, min(8, cpu_count() // dist.world_size()))


def _check(spec: MethodSpec, num_classes: int, settings: SemanticSettings) -> None:
    if spec.output != "semantic":
        raise UnsegError(f"{spec.name} is a {spec.output} method, not a semantic one")
    if num_classes < 2:
        raise UnsegError(f"--num-classes must be at least 2, got {num_classes}")
    if num_classes > MAX_CLASSES:
        raise UnsegError(
            f"--num-classes {num_classes}: masks are 8-bit palette PNGs, at most {MAX_CLASSES} "
            "classes"
        )
    if settings.label_factor < 1:
        raise UnsegError(f"label factor must be >= 1, got {settings.label_factor}")
    check_refine(settings.refine)
    check_refine(settings.pseudo_refine)


@dataclass
class _Fitted:
    """A fit in memory: the estimator, its backbone, the features, the images used."""

    spec: MethodSpec
    estimator: SemanticEstimator
    backbone: Backbone
    feats: FeatureSet
    paths: list[Path]
    predict: PredictSettings
    facts: dict[str, Any]


def _too_small(feats: FeatureSet, stride: int, report: BatchReport) -> list[Path]:
    keep = []
    for p in feats.paths:
        h, w = feats.original_size(p)
        if min(h, w) < stride:
            report.fail(p, f"image {w}x{h} is smaller than one {stride}-pixel patch")
        else:
            keep.append(p)
    return keep


def _fit(
    data: str | Path,
    run_dir: Path,
    spec: MethodSpec,
    config: Any,
    settings: SemanticSettings,
    dev: torch.device,
    pool: CRFPool,
    timings: Timings,
    report: BatchReport,
) -> _Fitted:
    seed_everything(settings.seed)
    paths = dataset_images(data)
    model = open_backbone(settings.backbone, settings.weights, settings.tap, dev)
    predict = PredictSettings(
        getattr(config, "flip", True), settings.refine, settings.label_factor
    )
    extras = tuple(sorted({*extras_for(spec, config), "image", *(("flipped",) if predict.flip
                                                                  else ())}))
    feats = extract_features(
        paths, model, size=settings.size, cache_dir=run_dir / "cache" / "features",
        report=report, extras=extras, student_seed=settings.seed, timings=timings,
    )
    good = _too_small(feats, model.stride, report)
    if not good:
        raise UnsegError(f"{data}: none of the {len(paths)} image(s) could be used")
    proposals = None
    facts: dict[str, Any] = {}
    if "proposals" in spec.needs_for(config):
        pcfg = PriMaPsConfig(refine=settings.pseudo_refine)  # type: ignore[arg-type]
        proposals = compute_pseudo_labels(
            good, feats, pseudo_label_dir(run_dir, feats, pcfg, pool.config), pcfg, pool, timings
        )
        facts["primaps"] = asdict(pcfg)
    inputs = training_inputs(spec, config, feats, good, proposals)
    estimator = fit_estimator(spec, config, inputs, model, dev, timings)
    history = list(estimator.history_)
    facts.update(steps=len(history), final_loss=history[-1] if history else None)
    return _Fitted(spec, estimator, model, feats, good, predict, facts)  # type: ignore[arg-type]


def _save(run_dir: Path, fitted: _Fitted, settings: SemanticSettings, timings: Timings) -> None:
    if not dist.is_main():
        return
    first = fitted.feats[fitted.paths[0]]
    save_fitted(
        run_dir,
        fitted.spec,
        fitted.estimator,
        extra={
            "backbone": fitted.backbone.spec.name,
            "tap": getattr(fitted.backbone, "tap", None),
            "weights_sha256": backbone_weights_sha256(fitted.backbone),
            "weights_path": str(Path(settings.weights).resolve()) if settings.weights else None,
            "feature_size": settings.size,
            "feature_dim": int(first.shape[0]),
            "stride": fitted.backbone.stride,
            "num_classes": int(fitted.estimator.config.num_classes),
            "predict": asdict(fitted.predict),
            "n_images": len(fitted.paths),
            "fit": fitted.facts,
            "timings": timings.as_dict(),
        },
    )


def pipeline_values(num_classes: int, settings: SemanticSettings) -> dict[str, Any]:
    """The config fields the pipeline sets on every config that has them: the classes, seed,
    label factor, CRF use, and ``center`` as measured best for the backbone's default tap
    (``spec.default_center``; a user's ``--center``/``--no-center`` overrides it)."""
    assert settings.backbone is not None
    backbone = get_spec(settings.backbone)
    default_tap = settings.tap in (None, backbone.default_tap)
    return {
        "num_classes": num_classes,
        "seed": settings.seed,
        "label_factor": settings.label_factor,
        "crf": "crf" in settings.refine,
        "center": backbone.default_center and default_tap,
    }


def _method(
    method: str, num_classes: int, options: Mapping[str, Any] | None, settings: SemanticSettings
) -> tuple[MethodSpec, Any, SemanticSettings]:
    """The registered semantic ``method``, its config, and the settings with the backbone
    resolved (the default one when none is named), checked."""
    spec = get_method(method)
    _check(spec, num_classes, settings)
    settings = replace(settings, backbone=resolve_backbone_name(settings.backbone))
    return spec, build_config(spec, options, pipeline_values(num_classes, settings)), settings


@contextmanager
def _session(settings: SemanticSettings) -> Iterator[tuple[torch.device, CRFPool]]:
    """The command's device (joining the torchrun group when launched by it) and its one
    worker pool."""
    workers = settings.num_workers or default_workers()
    with dist.joined(resolve_device(settings.device)) as dev, CRFPool(workers) as pool:
        yield dev, pool


def fit_semantic(
    data: str | Path,
    run_dir: str | Path,
    method: str,
    num_classes: int,
    *,
    options: Mapping[str, Any] | None = None,
    settings: SemanticSettings | None = None,
) -> FitResult:
    """Fit ``method`` (a registered semantic method) with ``num_classes`` classes on the images
    of ``data`` (dataset root, folder or file) and save it to ``run_dir``.

    ``options``: the method's config fields by name (e.g. ``{"steps": 100}``); ``settings``:
    backbone, feature size, refinement, seed, device, workers.
    """
    settings = settings or SemanticSettings()
    spec, config, settings = _method(method, num_classes, options, settings)
    run_dir = Path(run_dir)
    timings = Timings()
    report = BatchReport()
    with _session(settings) as (dev, pool):
        fitted = _fit(data, run_dir, spec, config, settings, dev, pool, timings, report)
        _save(run_dir, fitted, settings, timings)
        dist.barrier()
    return FitResult(run_dir, report, len(fitted.paths), fitted.facts)


# ------------------------------------------------------------------------------ prediction


def _output_name(path: Path, root: Path) -> Path:
    rel = path.name if root.is_file() else path.relative_to(root)
    return Path(rel).with_suffix(".png")


@dataclass
class _Writer:
    """Where and how label PNGs (and overlays) are written, and what was written."""

    out_dir: Path
    names_root: Path
    overlay_dir: Path | None
    report: BatchReport
    palette: list[int] = field(default_factory=png_palette)

    def write(self, path: Path, labels: np.ndarray, image: torch.Tensor) -> None:
        """``labels [H, W]`` (class ids) of ``path``; the overlay on its resized ``image``."""
        lab8 = labels.astype(np.uint8)
        target = self.out_dir / _output_name(path, self.names_root)
        save_png_atomic(target, lab8, palette=self.palette)
        self.report.written.append(target)
        if self.overlay_dir is not None:
            size = labels.shape
            big = F.interpolate(image[None].float(), size=size, mode="bilinear",
                                align_corners=False)[0].round().clamp(0, 255).byte()
            jpg = (self.overlay_dir / _output_name(path, self.names_root)).with_suffix(".jpg")
            save_jpeg_atomic(jpg, overlay(hwc(big), lab8))


@torch.inference_mode()
def _logits(
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


def _predict_paths(
    estimator: SemanticEstimator,
    feats: FeatureSet,
    paths: Sequence[Path],
    settings: PredictSettings,
    device: torch.device,
    pool: CRFPool,
    writer: _Writer,
    timings: Timings,
) -> None:
    """Predict, refine and write ``paths`` (whose features and extras are in ``feats``)."""
    refine = RefineConfig(settings.refine, pool.config)  # type: ignore[arg-type]
    for start in progress(range(0, len(paths), CHUNK), desc="predict"):
        chunk = list(paths[start : start + CHUNK])
        images = [feats.extra(p, "image") for p in chunk]
        with timings.stage("predicting"), cpu_threads(device, 1):
            # one intra-op thread: many mid-sized ops, and the refinement processes need the
            # cores; on a shared machine this is several times faster than two
            logits = [_logits(estimator, feats, p, settings, device) for p in chunk]
        with timings.stage("refinement"):
            probs = refine_many(logits, [hwc(im) for im in images], refine, pool)
        with timings.stage("writing"):
            for p, q, image in zip(chunk, probs, images, strict=True):
                size = feats.original_size(p)
                up = F.interpolate(q[None], size=size, mode="bilinear", align_corners=False)[0]
                writer.write(p, up.argmax(0).numpy(), image)


def _gather(report: BatchReport) -> BatchReport:
    if not dist.is_distributed():
        return report
    parts = dist.all_gather_objects((report.written, report.failed))
    return BatchReport(
        written=[w for part in parts for w in part[0]],
        failed=[f for part in parts for f in part[1]],
    )


def predict_images(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
    overlay_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> BatchReport:
    """Label PNGs (palette embedded, value = class id) for every image of ``images`` (dataset
    root, folder or file) with the semantic run in ``run_dir``.

    ``overrides``: ``refine`` (default: the run's) and ``weights`` (the backbone weights file,
    when the run's is not found). Optional JPEG overlays in ``overlay_dir``. Broken images are
    reported and skipped. Under torchrun each rank predicts its share.
    """
    overrides = dict(overrides or {})
    run_dir, root = Path(run_dir), Path(images)
    timings = Timings()
    with dist.joined(resolve_device(device)) as dev:
        _, estimator, meta = load_fitted(run_dir, "semantic", dev)
        if int(meta.get("num_classes", 0)) > MAX_CLASSES:
            raise UnsegError(
                f"{run_dir}: {meta['num_classes']} classes do not fit the 8-bit label PNGs "
                f"(at most {MAX_CLASSES})"
            )
        settings = PredictSettings(**meta["predict"])
        if overrides.get("refine") is not None:
            settings = replace(settings, refine=check_refine(overrides["refine"]))
        model = open_fitted_backbone(meta, overrides.get("weights"), dev, str(run_dir))
        paths = dist.shard(dataset_images(root), dist.rank(), dist.world_size())
        report = BatchReport()
        writer = _Writer(Path(out_dir), resolve_image_dir(root),
                         None if overlay_dir is None else Path(overlay_dir), report)
        extras = ("image", "flipped") if settings.flip else ("image",)
        workers = (num_workers or default_workers()) if settings.refine != "none" else 1
        with CRFPool(workers) as pool:
            for start in range(0, len(paths), 4 * CHUNK):
                part = paths[start : start + 4 * CHUNK]
                feats = extract_features(
                    part, model, size=int(meta["feature_size"]), report=report, extras=extras,
                    shard=False, timings=timings,
                )
                good = _too_small(feats, model.stride, report)
                _predict_paths(estimator, feats, good, settings, dev, pool, writer, timings)
    return _gather(report)


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
    device: str | None,
) -> BatchReport:
    """``unseg predict`` for semantic runs (see :func:`predict_images`)."""
    return predict_images(run_dir, images, out_dir, overrides, device)


def segment(
    images: str | Path,
    out_dir: str | Path,
    method: str = "primaps-em",
    num_classes: int = DEFAULT_SEGMENT_CLASSES,
    *,
    options: Mapping[str, Any] | None = None,
    settings: SemanticSettings | None = None,
) -> BatchReport:
    """Fit on ``images`` and predict them in one pass: ``out_dir/run`` (reusable with
    ``unseg predict``), ``out_dir/masks``, ``out_dir/overlays``.

    Returns the prediction's report, with the images the fit could not use among the failures;
    the run's ``config.json`` holds the seconds per stage (``timings``).
    """
    settings = settings or SemanticSettings()
    spec, config, settings = _method(method, num_classes, options, settings)
    out_dir = Path(out_dir)
    timings = Timings()
    report = BatchReport()
    with _session(settings) as (dev, pool):
        fitted = _fit(images, out_dir / "run", spec, config, settings, dev, pool, timings, report)
        writer = _Writer(out_dir / "masks", resolve_image_dir(images), out_dir / "overlays",
                         BatchReport())
        mine = dist.shard(fitted.paths, dist.rank(), dist.world_size())
        _predict_paths(fitted.estimator, fitted.feats, mine, fitted.predict, dev, pool, writer,
                       timings)
        _save(out_dir / "run", fitted, settings, timings)
        dist.barrier()
    predicted = _gather(writer.report)
    predicted.failed = report.failed + predicted.failed
    return predicted
