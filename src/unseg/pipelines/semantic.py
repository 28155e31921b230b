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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unseg.backbones import backbone_weights_sha256, get_spec
from unseg.backbones.base import Backbone
from unseg.data.datasets import no_usable_images, resolve_inputs
from unseg.data.layouts import resolve_image_dir
from unseg.data.memory import ImageInputs
from unseg.data.resize import resolve_max_side
from unseg.errors import UnsegError
from unseg.features import FeatureSet, extract_features
from unseg.layout import CACHE_DIR, MASKS_DIR, OVERLAYS_DIR, RUN_DIR
from unseg.methods.balance import log_class_balance
from unseg.methods.base import SemanticEstimator
from unseg.pipelines.backbone import open_backbone, open_fitted_backbone, resolve_backbone_name
from unseg.pipelines.embeddings import EmbeddedFeatures, EmbeddingSource, open_embeddings
from unseg.pipelines.fitting import (
    FitResult,
    build_config,
    extras_for,
    fit_estimator,
    training_inputs,
)
from unseg.pipelines.label_maps import (
    CHUNK,
    LabelWriter,
    PredictSettings,
    gather_report,
    predict_label_maps,
)
from unseg.pipelines.pseudo_labels import compute_pseudo_labels, pseudo_label_dir
from unseg.proposals.primaps import PriMaPsConfig
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import (
    DEFAULT_PSEUDO_REFINE,
    DEFAULT_REFINE,
    check_refine,
)
from unseg.registry import MethodSpec, get_method
from unseg.runs import load_fitted, load_run, save_fitted
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, resolve_device, seed_everything
from unseg.utils.progress import progress_bar
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

PART = 4 * CHUNK  # images extracted (and held) at a time by `predict`
MAX_CLASSES = 256  # label PNGs are 8-bit palette images
# `unseg segment` on a handful of photos: a few coarse classes shared by them (person, animal,
# sky, ground, object) rather than a dataset's 21 or 27.
DEFAULT_SEGMENT_CLASSES = 5


@dataclass(frozen=True)
class SemanticSettings:
    """How a semantic command runs, besides the method's own config.

    ``size``: feature short side; ``label_factor``: logits at this multiple of the feature
    resolution (training and prediction); ``refine``: the prediction's refinement (stored in the
    run as its default); ``pseudo_refine``: the PriMaPs pseudo-labels' (the paper: CRF);
    ``cache_dir``: where features and pseudo-labels are cached (None: the run's ``cache/``);
    entries are keyed by everything they depend on, so runs may share one; ``embeddings``: a
    MaskContrast run whose pixel embeddings replace the features (its backbone, tap, weights
    and feature size are used; the run records it and prediction applies it again);
    ``max_side``: the working resolution's long side (None: 4 x ``size``, 0: no limit; recorded
    in the run, which predicts at it); ``max_pixels``: the per-file pixel limit (None: Pillow's,
    0: none).
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
    cache_dir: str | None = None
    embeddings: str | None = None
    max_side: int | None = None
    max_pixels: int | None = None


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
    embeddings: dict[str, str] | None = None


@dataclass
class _Session:
    """What one command shares across its stages: the device, the one worker pool, the stage
    timings and the report of failed inputs."""

    device: torch.device
    pool: CRFPool
    timings: Timings = field(default_factory=Timings)
    report: BatchReport = field(default_factory=BatchReport)


@contextmanager
def _session(settings: SemanticSettings) -> Iterator[_Session]:
    """The command's :class:`_Session` (joining the torchrun group when launched by it)."""
    workers = settings.num_workers or default_workers()
    with dist.joined(resolve_device(settings.device)) as dev, CRFPool(workers) as pool:
        yield _Session(dev, pool)


def _fit(
    data: str | Path | ImageInputs,
    run_dir: Path | None,
    spec: MethodSpec,
    config: Any,
    settings: SemanticSettings,
    session: _Session,
) -> _Fitted:
    """Extract (one pass), propose, fit; nothing saved yet. ``data``: a folder or file (listed
    by the input rules) or a caller's :class:`ImageInputs`; ``run_dir`` None: nothing cached
    on disk unless ``settings.cache_dir``."""
    seed_everything(settings.seed)
    dev, pool, timings, report = session.device, session.pool, session.timings, session.report
    model = open_backbone(settings.backbone, settings.weights, settings.tap, dev)
    inputs = data if isinstance(data, ImageInputs) else ImageInputs(
        resolve_inputs(data, report, model.stride))
    paths = inputs.paths
    predict = PredictSettings(
        getattr(config, "flip", True), settings.refine, settings.label_factor
    )
    extras = tuple(sorted({*extras_for(spec, config), "image", *(("flipped",) if predict.flip
                                                                  else ())}))
    cache = (Path(settings.cache_dir) if settings.cache_dir
             else None if run_dir is None else run_dir / CACHE_DIR)
    feats = extract_features(
        paths, model, size=settings.size,
        cache_dir=None if cache is None else cache / "features",
        max_side=settings.max_side or None, max_pixels=settings.max_pixels,
        report=report, extras=extras, student_seed=settings.seed, timings=timings,
        arrays=inputs.arrays,
    )
    good = feats.paths
    if not good:
        raise no_usable_images(data if not isinstance(data, ImageInputs) else "images", report)
    embedded = None
    if settings.embeddings:
        source = open_embeddings(settings.embeddings, dev)
        feats, embedded = EmbeddedFeatures(feats, source.estimator), source.record
        if cache is not None:  # its own pseudo-labels
            cache = cache / f"embedded-{source.record['sha256'][:16]}"
    proposals = None
    facts: dict[str, Any] = {}
    if "proposals" in spec.needs_for(config):
        pcfg = PriMaPsConfig(refine=settings.pseudo_refine)  # type: ignore[arg-type]
        where = None if cache is None else pseudo_label_dir(cache, feats, pcfg, pool.config)
        proposals = compute_pseudo_labels(good, feats, where, pcfg, pool, timings)
        facts["primaps"] = asdict(pcfg)
    inputs = training_inputs(spec, config, feats, good, proposals)
    estimator = fit_estimator(spec, config, inputs, model, dev, timings)
    history = list(estimator.history_)
    facts.update(steps=len(history), final_loss=history[-1] if history else None)
    return _Fitted(spec, estimator, model, feats, good, predict, facts,  # type: ignore[arg-type]
                   embedded)


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
            "max_side": settings.max_side,
            "max_pixels": settings.max_pixels,
            "feature_dim": int(first.shape[0]),
            "stride": fitted.backbone.stride,
            "num_classes": int(fitted.estimator.config.num_classes),
            "predict": asdict(fitted.predict),
            "embeddings": fitted.embeddings,
            "n_images": len(fitted.paths),
            "fit": fitted.facts,
            "timings": timings.as_dict(),
        },
    )


def pipeline_values(num_classes: int, settings: SemanticSettings) -> dict[str, Any]:
    """The config fields the pipeline sets on every config that has them: the classes, seed,
    label factor, CRF use, ``center`` as measured best for the backbone's default tap
    (``spec.default_center``), and PriMaPs-EM's ``classifier``: the reference's (trainable gain
    on raw features, whose norm is the temperature) where that norm is about constant — a ViT's
    LayerNorm-ed tokens, MaskContrast's unit embeddings — and the unit-gain cosine classifier on
    a CNN's features, whose norm follows the activation (measured: docs/results-primaps.md).
    A user's option (``--center``, ``--classifier``, ...) overrides each."""
    assert settings.backbone is not None
    backbone = get_spec(settings.backbone)
    default_tap = settings.tap in (None, backbone.default_tap)
    return {
        "num_classes": num_classes,
        "seed": settings.seed,
        "label_factor": settings.label_factor,
        "crf": "crf" in settings.refine,
        # measured on the backbone's features, not on embeddings of another method
        "center": backbone.default_center and default_tap and not settings.embeddings,
        "classifier": "reference" if backbone.layer_normed or settings.embeddings else "cosine",
    }


def _embedding_backbone(settings: SemanticSettings) -> SemanticSettings:
    """``settings`` with the backbone, tap, weights and feature size of the MaskContrast run
    ``settings.embeddings`` (a different backbone or tap asked for is an error)."""
    meta, _ = load_run(settings.embeddings)  # type: ignore[arg-type]
    for name, key in (("backbone", "backbone"), ("tap", "tap")):
        asked = getattr(settings, name)
        if asked is not None and asked != meta.get(key):
            raise UnsegError(
                f"--{name} {asked}: the embeddings of {settings.embeddings} come from "
                f"{name} {meta.get(key)}; leave --{name} out"
            )
    if settings.size != meta.get("feature_size"):
        logger.info("feature size %s of the embedding run is used", meta.get("feature_size"))
    return replace(
        settings, backbone=meta.get("backbone"), tap=meta.get("tap"),
        weights=settings.weights or meta.get("weights_path"),
        size=int(meta.get("feature_size", settings.size)),
    )


def _method(
    method: str, num_classes: int, options: Mapping[str, Any] | None, settings: SemanticSettings
) -> tuple[MethodSpec, Any, SemanticSettings]:
    """The registered semantic ``method``, its config, and the settings with the backbone
    resolved (the default one when none is named), checked."""
    spec = get_method(method)
    _check(spec, num_classes, settings)
    if settings.embeddings:
        settings = _embedding_backbone(settings)
    settings = replace(settings, backbone=resolve_backbone_name(settings.backbone),
                       max_side=resolve_max_side(settings.size, settings.max_side) or 0)
    return spec, build_config(spec, options, pipeline_values(num_classes, settings)), settings


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
    with _session(settings) as session:
        fitted = _fit(data, run_dir, spec, config, settings, session)
        _save(run_dir, fitted, settings, session.timings)
        dist.barrier()
    return FitResult(run_dir, session.report, len(fitted.paths), fitted.facts)


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

    ``overrides``: ``refine`` (default: the run's), ``weights`` (the backbone weights file,
    when the run's is not found) and ``max_pixels`` (see :class:`SemanticSettings`); images are
    predicted at the run's working resolution (``max_side``; none for runs that predate it).
    Optional JPEG overlays in ``overlay_dir``. Broken images are reported and skipped. Under
    torchrun each rank predicts its share.
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
        source = None
        if meta.get("embeddings"):
            source = open_embeddings(meta["embeddings"]["run"], dev, meta["embeddings"]["sha256"])
        report = BatchReport()
        paths = dist.shard(resolve_inputs(root, report, model.stride), dist.rank(),
                           dist.world_size())
        writer = LabelWriter(Path(out_dir), resolve_image_dir(root),
                             None if overlay_dir is None else Path(overlay_dir), report)
        fitted = FittedSemantic(estimator, model, source, int(meta["feature_size"]),
                                int(meta.get("max_side") or 0) or None, settings)
        predict_in_parts(fitted, ImageInputs(paths), writer, dev, num_workers,
                         overrides.get("max_pixels"), timings)
    predicted = gather_report(report)
    if dist.is_main():
        log_class_balance(predicted.written, int(meta["num_classes"]))
    return predicted


@dataclass(frozen=True)
class FittedSemantic:
    """What predicting with a fitted semantic run takes: the estimator, its backbone, the
    embedding run it was fitted on (if any), the feature short side, the working resolution's
    long side (None: no limit) and the prediction settings."""

    estimator: SemanticEstimator
    backbone: Backbone
    source: EmbeddingSource | None
    size: int
    max_side: int | None
    predict: PredictSettings


def predict_in_parts(
    fitted: FittedSemantic,
    inputs: ImageInputs,
    writer: Any,
    device: torch.device,
    num_workers: int | None = None,
    max_pixels: int | None = None,
    timings: Timings | None = None,
) -> None:
    """Extract and predict ``inputs`` :data:`PART` images at a time, each image's labels
    handed to ``writer.write(path, labels, image)`` (failures in ``writer.report``)."""
    timings = timings if timings is not None else Timings()
    settings, paths = fitted.predict, inputs.paths
    extras = ("image", "flipped") if settings.flip else ("image",)
    workers = (num_workers or default_workers()) if settings.refine != "none" else 1
    with CRFPool(workers) as pool, progress_bar(len(paths), "predict") as bar:
        for start in range(0, len(paths), PART):
            part = paths[start : start + PART]
            feats = extract_features(
                part, fitted.backbone, size=fitted.size, report=writer.report, extras=extras,
                max_side=fitted.max_side, max_pixels=max_pixels, shard=False,
                timings=timings, arrays=inputs.arrays,
            )
            if fitted.source is not None:
                feats = EmbeddedFeatures(feats, fitted.source.estimator)
            predict_label_maps(fitted.estimator, feats, feats.paths, settings, device, pool,
                               writer, timings, bar)


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
    device: str | None,
) -> BatchReport:
    """``unseg predict`` for semantic runs (see :func:`predict_images`): ``out_dir/masks`` and
    ``out_dir/overlays``, as ``segment`` writes them."""
    out = Path(out_dir)
    return predict_images(run_dir, images, out / MASKS_DIR, overrides, device,
                          overlay_dir=out / OVERLAYS_DIR)


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
    with _session(settings) as session:
        fitted = _fit(images, out_dir / RUN_DIR, spec, config, settings, session)
        writer = LabelWriter(out_dir / MASKS_DIR, resolve_image_dir(images), out_dir / OVERLAYS_DIR,
                             BatchReport())
        mine = dist.shard(fitted.paths, dist.rank(), dist.world_size())
        predict_label_maps(fitted.estimator, fitted.feats, mine, fitted.predict, session.device,
                           session.pool, writer, session.timings)
        _save(out_dir / RUN_DIR, fitted, settings, session.timings)
        dist.barrier()
    predicted = gather_report(writer.report)
    predicted.failed = session.report.failed + predicted.failed
    if dist.is_main():
        log_class_balance(predicted.written, config.num_classes)
    return predicted
