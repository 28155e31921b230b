"""The semantic kind: fit a registered semantic method on images and predict their class ids.

One image flows once: decoded and resized once by the extraction, which computes and caches
what later stages need (the features, the features of the mirror image for flip-averaged
prediction, the resized uint8 image for PriMaPs and the refinement, the student view's features
when the method trains on them); the proposals, the fit and the prediction take those in memory.
A fit predicts its own images from those features; one worker pool serves the pseudo-labels and
the prediction's refinement.

Run folder (``unseg.runs``): the method's config and state, the backbone (name, tap, weights
sha256), the feature size, the prediction defaults (``flip``, ``refine``, ``label_factor``) and
seconds per stage (``timings``), plus ``cache/``: the feature cache and the PriMaPs
pseudo-labels.

Prediction per image: the estimator's ``logits`` of its features (averaged with those of the
mirror image when ``flip``) at ``label_factor`` times the feature resolution, upsampled
bilinearly to the resized image, refined there (``unseg.refine.semantic``: none, CRF, guided
filter, or both), the probabilities upsampled bilinearly to the original image size, argmax:
class ids (the folder pipeline writes them as a palette PNG and a JPEG overlay).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import backbone_weights_sha256, get_spec
from unseg.backbones.base import Backbone
from unseg.data.datasets import no_usable_images
from unseg.data.memory import ImageInputs
from unseg.data.resize import resolve_max_side, upsample_argmax
from unseg.errors import UnsegError, a_or_an
from unseg.features import FeatureSet, extract_features
from unseg.layout import CACHE_DIR, CONFIG_FILE, FEATURES_DIR, WEIGHTS_FILE
from unseg.methods.balance import log_class_balance
from unseg.methods.base import SemanticEstimator
from unseg.pipelines.backbone import (
    check_resolution,
    open_backbone,
    open_fitted_backbone,
    resolve_backbone_name,
)
from unseg.pipelines.embeddings import EmbeddedFeatures, EmbeddingSource, open_embeddings
from unseg.pipelines.fitting import build_config, extras_for, fit_estimator, training_inputs
from unseg.pipelines.kind import FitResult, Kind, Prediction, Session, Settings
from unseg.pipelines.label_maps import CHUNK, PredictSettings, refined_probabilities
from unseg.pipelines.pseudo_labels import compute_pseudo_labels, pseudo_label_dir
from unseg.proposals.primaps import PriMaPsConfig
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import check_refine
from unseg.registry import MethodSpec, get_method
from unseg.runs import load_fitted, load_run, require_meta, save_fitted
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, resolve_device, seed_everything
from unseg.utils.progress import progress_bar

logger = logging.getLogger(__name__)

PART = 4 * CHUNK  # images extracted (and held) at a time when predicting new images
MAX_CLASSES = 256  # label PNGs are 8-bit palette images
# `unseg segment` on a handful of photos: a few coarse classes shared by them (person, animal,
# sky, ground, object) rather than a dataset's 21 or 27.
DEFAULT_SEGMENT_CLASSES = 5


def default_workers() -> int:
    """Refinement processes of this rank: its share of the CPU cores among the torchrun ranks,
    at most 8."""
    return max(1, min(8, cpu_count() // dist.world_size()))


def check_workers(workers: int | None) -> None:
    """Refuse a thread count below 1 (None: the default, :func:`default_workers`)."""
    if workers is not None and workers < 1:
        raise UnsegError(f"--workers must be at least 1, got {workers}")


def _check(spec: MethodSpec, num_classes: int, settings: Settings) -> None:
    if spec.output != "semantic":
        raise UnsegError(f"{spec.name} is {a_or_an(spec.output)} method, not a semantic one")
    if num_classes < 2:
        raise UnsegError(f"--num-classes must be at least 2, got {num_classes}")
    if num_classes > MAX_CLASSES:
        raise UnsegError(
            f"--num-classes {num_classes}: masks are 8-bit palette PNGs, at most {MAX_CLASSES} "
            "classes"
        )
    if settings.label_factor < 1:
        raise UnsegError(f"label factor must be >= 1, got {settings.label_factor}")
    check_workers(settings.num_workers)
    check_refine(settings.refine)
    check_refine(settings.pseudo_refine)


@dataclass
class FittedSemantic:
    """What predicting with a fitted semantic method takes: the estimator, its backbone, the
    embedding run it was fitted on (if any), the feature short side, the working resolution's
    long side (None: no limit) and the prediction settings; after a fit also the features of
    the images used (``feats``, ``paths``), the fit's facts and the embedding run's record."""

    estimator: SemanticEstimator
    backbone: Backbone
    source: EmbeddingSource | None
    size: int
    max_side: int | None
    predict: PredictSettings
    feats: FeatureSet | None = None
    paths: list[Path] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0  # channels of the fit's features (the run records it)


def pipeline_values(num_classes: int, settings: Settings) -> dict[str, Any]:
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


def _embedding_backbone(settings: Settings) -> Settings:
    """``settings`` with the backbone, tap, weights, feature size and working resolution
    (``max_side``) of the MaskContrast run ``settings.embeddings``: its head was trained and
    predicts on features at that resolution (a different backbone, tap, size or max_side asked
    for is an error; the same one is accepted)."""
    meta, _ = load_run(settings.embeddings)  # type: ignore[arg-type]
    for name, key in (("backbone", "backbone"), ("tap", "tap")):
        asked = getattr(settings, name)
        if asked is not None and asked != meta.get(key):
            raise UnsegError(
                f"--{name} {asked}: the embeddings of {settings.embeddings} come from "
                f"{name} {meta.get(key)}; leave --{name} out"
            )
    max_side = int(meta.get("max_side") or 0)  # 0: no limit (runs that predate it had none)
    if settings.max_side is not None and settings.max_side != max_side:
        raise UnsegError(
            f"--max-side {settings.max_side}: the embeddings of {settings.embeddings} were "
            f"trained at max_side {max_side} (0: no limit); leave --max-side out"
        )
    run_size = meta.get("feature_size")
    if settings.size is not None and run_size is not None and settings.size != run_size:
        raise UnsegError(
            f"--size {settings.size}: the embeddings of {settings.embeddings} were trained at "
            f"feature size {run_size}; leave --size out"
        )
    size = int(run_size) if run_size is not None else settings.feature_size
    logger.info("feature size %s of the embedding run is used", size)
    return replace(
        settings, backbone=meta.get("backbone"), tap=meta.get("tap"),
        weights=settings.weights or meta.get("weights_path"),
        size=size, max_side=max_side,
    )


def _method(
    method: str, num_classes: int, options: Mapping[str, Any] | None, settings: Settings
) -> tuple[MethodSpec, Any, Settings]:
    """The registered semantic ``method``, its config, and the settings with the backbone
    resolved (the default one when none is named), checked."""
    spec = get_method(method)
    _check(spec, num_classes, settings)
    if settings.embeddings:
        settings = _embedding_backbone(settings)
    else:
        settings = replace(settings, size=settings.feature_size)
    backbone = resolve_backbone_name(settings.backbone)
    if not settings.embeddings:  # the embedding run's size was checked when it was fitted
        check_resolution(settings.size, settings.max_side, backbone, settings.tap)
    settings = replace(settings, backbone=backbone,
                       max_side=resolve_max_side(settings.size, settings.max_side) or 0)
    return spec, build_config(spec, options, pipeline_values(num_classes, settings)), settings


def check_prototypes(run_dir: Path, prototypes: torch.Tensor | None, model: Backbone) -> None:
    """Refuse a run's saved prototypes ``[K, C]`` (when its method has them) whose width is not
    ``model``'s feature width (a hand-edited or swapped weights file), instead of failing later
    in the prediction (their values are checked when the estimator loads)."""
    if prototypes is None:
        return
    where = Path(run_dir) / WEIGHTS_FILE
    if prototypes.shape[1] != model.dim:
        raise UnsegError(
            f"{where}: {prototypes.shape[1]}-channel prototypes, but {model.spec.name} at tap "
            f"{getattr(model, 'tap', None)!r} gives {model.dim}-channel features: the weights "
            "were edited or are another run's: restore them or refit"
        )


class SemanticKind(Kind):
    """Semantic methods (k-means, PriMaPs-EM): class ids per image."""

    output = "semantic"
    labels = True
    run_options = ("refine", "weights", "max_pixels", "workers")

    def __init__(self, spec: MethodSpec, config: Any, settings: Settings,
                 run: Mapping[str, Any] | None = None) -> None:
        self.spec, self.method, self._config, self.settings = spec, spec.name, config, settings
        self._run = dict(run or {})  # the run's meta and `unseg predict`'s overrides

    @classmethod
    def create(cls, method: str, num_classes: int | None, options: Mapping[str, Any] | None,
               settings: Settings) -> SemanticKind:
        k = DEFAULT_SEGMENT_CLASSES if num_classes is None else int(num_classes)
        return cls(*_method(method, k, options, settings))

    @classmethod
    def from_run(cls, run_dir: Path, meta: dict[str, Any],
                 overrides: Mapping[str, Any], device: str | None) -> SemanticKind:
        """``overrides``: ``refine`` (default: the run's), ``weights`` (the backbone weights
        file, when the run's is not found), ``max_pixels`` and ``workers``; images are
        predicted at the run's working resolution (``max_side``; none for runs that predate
        it)."""
        spec = get_method(meta["method"])
        check_workers(overrides.get("workers"))
        settings = Settings(backbone=meta.get("backbone"), device=device,
                            max_pixels=overrides.get("max_pixels"),
                            num_workers=overrides.get("workers"))
        return cls(spec, None, settings, {**meta, "overrides": dict(overrides)})

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The device (joining the torchrun group when launched by it) and the one worker
        pool of a fit (a prediction opens its own, sized by its refinement)."""
        workers = self.settings.num_workers or default_workers()
        with dist.joined(resolve_device(self.settings.device)) as dev:
            if self._run:
                yield Session(dev)
                return
            with CRFPool(workers) as pool:
                yield Session(dev, pool)

    def fit(self, inputs: ImageInputs, root: str | Path, where: Path | None,
            session: Session) -> FittedSemantic:
        """Extract (one pass), propose, fit; nothing saved yet (``where`` None: nothing cached
        on disk unless ``settings.cache_dir``)."""
        spec, config, settings = self.spec, self._config, self.settings
        seed_everything(settings.seed)
        dev, pool, timings, report = session.device, session.pool, session.timings, session.report
        assert pool is not None
        model = open_backbone(settings.backbone, settings.weights, settings.tap, dev)
        predict = PredictSettings(getattr(config, "flip", True), settings.refine,
                                  settings.label_factor)
        extras = tuple(sorted({*extras_for(spec, config), "image",
                               *(("flipped",) if predict.flip else ())}))
        cache = (Path(settings.cache_dir) if settings.cache_dir
                 else None if where is None else where / CACHE_DIR)
        feats = extract_features(
            inputs.paths, model, size=settings.size,
            cache_dir=None if cache is None else cache / FEATURES_DIR,
            max_side=settings.max_side or None, max_pixels=settings.max_pixels,
            report=report, extras=extras, student_seed=settings.seed, timings=timings,
            arrays=inputs.arrays,
        )
        good = feats.paths
        if not good:
            raise no_usable_images(root, report)
        source = None
        if settings.embeddings:
            source = open_embeddings(settings.embeddings, dev)
            feats = EmbeddedFeatures(feats, source.estimator)
            if cache is not None:  # its own pseudo-labels
                cache = cache / f"embedded-{source.record['sha256'][:16]}"
        proposals = None
        facts: dict[str, Any] = {}
        if "proposals" in spec.needs_for(config):
            pcfg = PriMaPsConfig(refine=settings.pseudo_refine)  # type: ignore[arg-type]
            at = None if cache is None else pseudo_label_dir(cache, feats, pcfg, pool.config)
            proposals = compute_pseudo_labels(good, feats, at, pcfg, pool, timings)
            facts["primaps"] = asdict(pcfg)
        fit_inputs = training_inputs(spec, config, feats, good, proposals)
        estimator = fit_estimator(spec, config, fit_inputs, model, dev, timings)
        history = list(estimator.history_)
        facts.update(steps=len(history), final_loss=history[-1] if history else None)
        return FittedSemantic(estimator, model, source, settings.size,  # type: ignore[arg-type]
                              settings.max_side or None, predict, feats, good, facts,
                              int(feats[good[0]].shape[0]))

    def result(self, fitted: FittedSemantic, run_dir: Path, report: BatchReport) -> FitResult:
        return FitResult(run_dir, report, len(fitted.paths), fitted.facts,
                         f"{self._config.num_classes} classes, ")

    def save(self, fitted: FittedSemantic, run_dir: Path, session: Session) -> None:
        if not dist.is_main():
            return
        settings = self.settings
        save_fitted(
            run_dir,
            self.spec,
            fitted.estimator,
            extra={
                "backbone": fitted.backbone.spec.name,
                "tap": getattr(fitted.backbone, "tap", None),
                "weights_sha256": backbone_weights_sha256(fitted.backbone),
                "weights_path": (str(Path(settings.weights).resolve()) if settings.weights
                                 else None),
                "feature_size": fitted.size,
                "max_side": settings.max_side,
                "max_pixels": settings.max_pixels,
                "feature_dim": fitted.feature_dim,
                "stride": fitted.backbone.stride,
                "num_classes": int(fitted.estimator.config.num_classes),
                "predict": asdict(fitted.predict),
                "embeddings": None if fitted.source is None else fitted.source.record,
                "n_images": len(fitted.paths),
                "fit": fitted.facts,
                "timings": session.timings.as_dict(),
            },
        )

    def load(self, run_dir: Path, session: Session) -> FittedSemantic:
        dev = session.device
        overrides = self._run.get("overrides", {})
        _, estimator, meta = load_fitted(run_dir, "semantic", dev)
        require_meta(meta, run_dir, {"backbone": str, "weights_sha256": (str, type(None)),
                                     "feature_size": int, "num_classes": int, "predict": dict})
        if int(meta.get("num_classes", 0)) > MAX_CLASSES:
            raise UnsegError(
                f"{run_dir}: {meta['num_classes']} classes do not fit the 8-bit label PNGs "
                f"(at most {MAX_CLASSES})"
            )
        predict = PredictSettings(**meta["predict"])
        if overrides.get("refine") is not None:
            predict = replace(predict, refine=check_refine(overrides["refine"]))
        model = open_fitted_backbone(meta, overrides.get("weights"), dev, str(run_dir))
        source = None
        if meta.get("embeddings"):
            source = open_embeddings(meta["embeddings"]["run"], dev, meta["embeddings"]["sha256"])
        elif meta.get("feature_dim", model.dim) != model.dim:
            raise UnsegError(
                f"{run_dir}: fitted on {meta['feature_dim']}-channel features, but "
                f"{model.spec.name} at tap {getattr(model, 'tap', None)!r} gives {model.dim}; "
                f"its {CONFIG_FILE} was edited ('tap'?): restore it or refit"
            )
        else:
            check_prototypes(run_dir, getattr(estimator, "prototypes_", None), model)
        self._config = estimator.config
        return FittedSemantic(estimator, model, source, int(meta["feature_size"]),
                              int(meta.get("max_side") or 0) or None, predict,
                              feature_dim=int(meta.get("feature_dim") or model.dim))

    def release(self, fitted: FittedSemantic) -> None:
        """The fit's features (of every image, extras included) go."""
        fitted.feats = None

    def fitted_inputs(self, fitted: FittedSemantic, inputs: ImageInputs) -> ImageInputs:
        """The images the fit could use: predicted from the fit's own features."""
        return ImageInputs(list(fitted.paths), inputs.arrays, inputs.names_root)

    def predict(self, fitted: FittedSemantic, inputs: ImageInputs, session: Session,
                root: str | Path, overlays: bool = False,
                reuse: bool = False) -> Iterator[Prediction]:
        """Class ids of ``inputs``: from the fit's features (``reuse``, in the fit's pool), else
        extracted :data:`PART` images at a time, under one progress bar."""
        settings, paths = fitted.predict, inputs.paths
        if reuse and fitted.feats is not None:
            assert session.pool is not None
            with progress_bar(len(paths), "predict") as bar:
                yield from _label_maps(fitted, fitted.feats, paths, session, session.pool, bar)
            return
        extras = ("image", "flipped") if settings.flip else ("image",)
        workers = ((self.settings.num_workers or default_workers())
                   if settings.refine != "none" else 1)
        with CRFPool(workers) as pool, progress_bar(len(paths), "predict") as bar:
            for start in range(0, len(paths), PART):
                part = paths[start : start + PART]
                feats = extract_features(
                    part, fitted.backbone, size=fitted.size, report=session.report,
                    extras=extras, max_side=fitted.max_side,
                    max_pixels=self.settings.max_pixels, shard=False,
                    timings=session.timings, arrays=inputs.arrays,
                )
                if fitted.source is not None:
                    feats = EmbeddedFeatures(feats, fitted.source.estimator)
                yield from _label_maps(fitted, feats, feats.paths, session, pool, bar)

    def predict_proba(self, fitted: FittedSemantic, inputs: ImageInputs,
                      session: Session) -> Iterator[tuple[Path, np.ndarray]]:
        """The refined class probabilities ``[K, H, W]`` upsampled bilinearly to each image's
        size (their argmax is :meth:`predict`'s up to ties)."""
        extras = ("image", "flipped") if fitted.predict.flip else ("image",)
        feats = extract_features(inputs.paths, fitted.backbone, size=fitted.size,
                                 report=session.report, extras=extras, max_side=fitted.max_side,
                                 max_pixels=self.settings.max_pixels, shard=False,
                                 timings=session.timings, arrays=inputs.arrays)
        if fitted.source is not None:
            feats = EmbeddedFeatures(feats, fitted.source.estimator)
        with CRFPool(self.settings.num_workers or default_workers()) as pool:
            for p, q, _ in refined_probabilities(fitted.estimator, feats, feats.paths,
                                                 fitted.predict, session.device, pool,
                                                 session.timings):
                up = F.interpolate(q[None].float(), size=feats.original_size(p),
                                   mode="bilinear", align_corners=False)[0]
                yield p, up.cpu().numpy()

    def finish(self, fitted: FittedSemantic, written: list[Path]) -> None:
        """The predicted classes' shares (a never-predicted class is a warning)."""
        if dist.is_main():
            log_class_balance(written, int(fitted.estimator.config.num_classes))


def _label_maps(
    fitted: FittedSemantic, feats: FeatureSet, paths: list[Path], session: Session,
    pool: CRFPool, bar: Any,
) -> Iterator[Prediction]:
    """:func:`refined_probabilities` of ``paths``, argmaxed at each image's own size
    (:func:`upsample_argmax`), the progress ``bar`` advanced per image."""
    for p, q, image in refined_probabilities(fitted.estimator, feats, paths, fitted.predict,
                                             session.device, pool, session.timings):
        yield Prediction(p, upsample_argmax(q, feats.original_size(p)), image)
        bar.update(1)
