"""The :class:`Segmenter`: images in, masks out, for every method unseg knows.

A notebook user's object (scikit-learn's estimator habit)::

    seg = unseg.Segmenter("kmeans", num_classes=5, backbone="dino_vits16")
    masks = seg.fit_predict(["a.jpg", pil_image, array])   # one H×W uint8 array per image
    seg.save("run")                                         # `unseg predict run ...` reads it
    masks = unseg.Segmenter.load("run").predict("more/")    # a folder works too

It runs the same stages as the commands, with the same defaults and the same seed handling, so
``fit_predict`` returns exactly the PNGs ``unseg segment`` / ``unseg discover`` write for the
same images and settings: the working resolution (short side ``size``, long side at most
``max_side``), the features (with the mirror image and the student view where the method uses
them), the proposals, the fit, the prediction with its refinement, and the upsampling to each
image's own size. What comes back per image:

- semantic methods (``kmeans``, ``primaps-em``) and ``maskcontrast``: class ids ``[H, W]``
  (uint8); :meth:`Segmenter.predict_proba` gives the class probabilities ``[K, H, W]``;
- saliency methods (``spectral``, ``saliency-head``, ``found``): the foreground probability in
  8 bits ``[H, W]`` (uint8, as the PNG); :meth:`Segmenter.predict_proba` gives it in ``[0, 1]``
  (float32), :meth:`Segmenter.predict_boxes` the box ``[x0, y0, x1, y1]`` of its largest
  component (or None).

Images: a folder or file path (listed as the commands list it), or a list of paths, PIL images
and ``H×W×3`` uint8 arrays. An in-memory image gives the masks its file gives, with two
exceptions: a JPEG over twice the working size is decoded by the commands at a reduced DCT
scale (an array is resized from full size), and the seeded per-image augmentations
(PriMaPs-EM's student view, MaskContrast's photometric view) are keyed by the file's bytes for
a path and by the pixels for an in-memory image, so the two fits differ as two seeds do.

``options``: the method's config fields (as ``unseg segment --help`` lists them, by field
name: ``epochs=5``, ``guided.radius=4`` as ``**{"guided.radius": 4}``) and these settings of
the pipeline: ``size`` (320), ``max_side`` (None: 4 × size; 0: none), ``max_pixels``,
``label_factor`` (2), ``refine`` ("crf"), ``pseudo_refine`` ("crf"), ``weights``, ``tap``,
``cache_dir`` (features and pseudo-labels on disk; default: none, all in memory), ``workers``,
``embeddings`` (a MaskContrast run, for semantic methods); MaskContrast also takes
``saliency`` (a folder of masks) or ``discover`` (the method making them, default ``auto``) and
``clusters`` ("predicted" or "training").
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import get_spec
from unseg.data.memory import ImageInputs, image_inputs
from unseg.data.resize import resolve_max_side
from unseg.errors import UnsegError
from unseg.pipelines import maskcontrast as mc
from unseg.pipelines import saliency as sal
from unseg.pipelines import semantic as sem
from unseg.pipelines.backbone import open_backbone, open_fitted_backbone, resolve_backbone_name
from unseg.pipelines.embeddings import EmbeddedFeatures, open_embeddings
from unseg.pipelines.fitting import build_config
from unseg.pipelines.label_maps import PredictSettings, refined_probabilities
from unseg.proposals.saliency_masks import load_mask_proposals, mask_proposals
from unseg.proposals.spectral import SpectralConfig
from unseg.refine.crf import CRFPool
from unseg.registry import MethodSpec, get_method
from unseg.registry import list_methods as registered_methods
from unseg.runs import load_fitted, load_run
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import resolve_device, seed_everything
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

SPECTRAL = "spectral"  # training-free discovery; its options are the saliency head's
SPECTRAL_OPTIONS = "saliency-head"  # whose config gives its size and guided filter
# the pipeline's own settings (every other option is a config field of the method)
SEMANTIC_SETTINGS = ("size", "max_side", "max_pixels", "label_factor", "refine",
                     "pseudo_refine", "weights", "tap", "cache_dir", "workers", "embeddings")
SALIENCY_SETTINGS = ("max_side", "max_pixels", "weights", "tap", "cache_dir")
MASKCONTRAST_SETTINGS = ("size", "weights", "tap", "cache_dir", "saliency", "discover",
                         "clusters")


def list_methods() -> list[str]:
    """The names :class:`Segmenter` takes: every registered method, and ``spectral``."""
    names = [s.name for s in registered_methods()]
    return [*names, SPECTRAL]


def list_backbones() -> list[str]:
    """The backbone names :class:`Segmenter` (and ``--backbone``) take."""
    from unseg.backbones import list_backbones as specs

    return [s.name for s in specs()]


def _settings_of(output: str) -> tuple[str, ...]:
    return {"semantic": SEMANTIC_SETTINGS, "saliency": SALIENCY_SETTINGS,
            "embedding": MASKCONTRAST_SETTINGS}[output]


@dataclass
class _Fit:
    """What a fit leaves: the estimator, its backbone, and what predicting needs of the fit."""

    estimator: Any
    backbone: Any
    meta: dict[str, Any]
    inputs: ImageInputs | None = None  # the fitted images (kept for fit_predict)
    state: Any = None  # the method's in-memory fit (features, facts) for saving


class Segmenter:
    """Segment images with one method (see the module docstring for the options).

    ``method``: a name of :func:`list_methods`; ``num_classes``: classes of a semantic method
    (default 5, as ``unseg segment``); ``backbone``: a name of :func:`list_backbones` (default:
    the one the commands announce); ``seed``: every random choice; ``device``: "cpu", "cuda"
    (default: cuda when present). Options are checked here, with the commands' messages.
    """

    def __init__(
        self,
        method: str = "primaps-em",
        num_classes: int | None = None,
        backbone: str | None = None,
        seed: int = 0,
        device: str | None = None,
        **options: Any,
    ) -> None:
        self.method = method
        self.num_classes = num_classes
        self.backbone = backbone
        self.seed = seed
        self.device = device
        self.options = dict(options)
        if method == SPECTRAL:
            self.spec: MethodSpec | None = None
            self.output = "saliency"
        else:
            self.spec = get_method(method)
            self.output = self.spec.output
        allowed = _settings_of(self.output)
        self._settings = {k: v for k, v in self.options.items() if k in allowed}
        self._config_options = {k: v for k, v in self.options.items() if k not in allowed}
        if self.output == "saliency" and num_classes is not None:
            raise UnsegError(f"{method} is a saliency method: it has no num_classes")
        if self.output != "semantic" and "embeddings" in self.options:
            raise UnsegError(f"{method} has no option 'embeddings' (semantic methods only)")
        self._config = self._build_config()
        self._fit: _Fit | None = None
        self.timings = Timings()

    # ------------------------------------------------------------------ configuration
    def _k(self) -> int:
        return sem.DEFAULT_SEGMENT_CLASSES if self.num_classes is None else int(self.num_classes)

    def _semantic_settings(self) -> sem.SemanticSettings:
        s = self._settings
        return sem.SemanticSettings(
            backbone=self.backbone, weights=s.get("weights"), tap=s.get("tap"),
            size=s.get("size", 320), label_factor=s.get("label_factor", 2),
            refine=s.get("refine", sem.DEFAULT_REFINE),
            pseudo_refine=s.get("pseudo_refine", sem.DEFAULT_PSEUDO_REFINE), seed=self.seed,
            device=self.device, num_workers=s.get("workers"), cache_dir=s.get("cache_dir"),
            embeddings=s.get("embeddings"), max_side=s.get("max_side"),
            max_pixels=s.get("max_pixels"),
        )

    def _build_config(self) -> Any:
        if self.output == "semantic":
            assert self.spec is not None
            spec, config, settings = sem._method(self.spec.name, self._k(),
                                                 self._config_options,
                                                 self._semantic_settings())
            self._resolved = settings
            return config
        if self.output == "embedding":
            k = self._k()
            if not 2 <= k <= 256:
                raise UnsegError(f"--num-classes must be between 2 and 256, got {k}")
            clusters = self._settings.get("clusters", "predicted")
            if clusters not in ("predicted", "training"):
                raise UnsegError(f"clusters must be 'predicted' or 'training', got {clusters!r}")
            return mc.maskcontrast_config(self._config_options, self.seed)
        spec = get_method(SPECTRAL_OPTIONS) if self.spec is None else self.spec
        resolve_max_side(320, self._settings.get("max_side"))  # its check
        return build_config(spec, self._config_options, {"seed": self.seed})

    @property
    def config(self) -> Any:
        """The method's config dataclass, as the run records it."""
        return self._config if self._fit is None else self._fit.estimator.config

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` ran (or the segmenter was loaded)."""
        return self._fit is not None

    def _stride(self) -> int:
        name = resolve_backbone_name(self.backbone)
        spec = get_spec(name)
        tap = self._settings.get("tap") or spec.default_tap
        return int(spec.tap_info(tap).stride)

    def _inputs(self, images: Any) -> ImageInputs:
        stride = self._fit.backbone.stride if self._fit is not None else self._stride()
        return image_inputs(images, stride)

    @contextmanager
    def _device(self) -> Iterator[torch.device]:
        with dist.joined(resolve_device(self.device)) as dev:
            yield dev

    # -------------------------------------------------------------------------- fit
    def fit(self, images: Any) -> Segmenter:
        """Fit the method on ``images`` (no labels); returns ``self``. Training-free
        ``spectral`` only opens its backbone."""
        self.timings = Timings()
        inputs = self._inputs(images)
        if self.output == "semantic":
            self._fit = self._fit_semantic(inputs)
        elif self.output == "saliency":
            self._fit = self._fit_saliency(inputs)
        else:
            self._fit = self._fit_maskcontrast(inputs)
        self._fit.inputs = inputs
        return self

    def _fit_semantic(self, inputs: ImageInputs) -> _Fit:
        assert self.spec is not None
        settings = self._resolved
        with sem._session(settings) as session:
            fitted = sem._fit(inputs, None, self.spec, self._config, settings, session)
        _raise_failures(session.report)
        self.timings = session.timings
        source = None
        if settings.embeddings:
            source = open_embeddings(settings.embeddings, session.device)
        predict = sem.FittedSemantic(fitted.estimator, fitted.backbone, source, settings.size,
                                     settings.max_side or None, fitted.predict)
        return _Fit(fitted.estimator, fitted.backbone, {"predict": predict}, state=fitted)

    def _fit_saliency(self, inputs: ImageInputs) -> _Fit:
        s = self._settings
        dev = resolve_device(self.device)
        seed_everything(self._config.seed)
        model = open_backbone(self.backbone, s.get("weights"), s.get("tap"), dev)
        if self.spec is None:
            return _Fit(None, model, {})
        config = sal.saliency_config(self.spec, self._config, model)
        report = BatchReport()
        cache = Path(s["cache_dir"]) if s.get("cache_dir") else None
        head, _, facts = sal.train_saliency("images", inputs, self.spec, config, model, dev,
                                            cache, report, self.timings)
        _raise_failures(report)
        return _Fit(head, model, {"training": facts})

    def _discovered_masks(self, inputs: ImageInputs) -> Any:
        """The mask proposals MaskContrast trains on: a folder's (``saliency``) or those of a
        discover method run on the same images (``discover``, default ``auto`` as ``unseg
        discover``: the FOUND-style head from 150 images on, else spectral; with its default
        settings as ``unseg segment --method maskcontrast`` runs it)."""
        s = self._settings
        if s.get("saliency"):
            root = inputs.names_root
            return lambda paths: load_mask_proposals(paths, s["saliency"], names_root=root)
        method = s.get("discover", sal.AUTO)
        if method == sal.AUTO:  # as `unseg discover` decides (sal.resolve_discover_method)
            method = sal.AUTO_TRAINED if len(inputs) >= sal.MIN_TRAIN_IMAGES else SPECTRAL
        finder = Segmenter(method, backbone=self.backbone, device=self.device,
                           **{k: s[k] for k in ("weights", "tap", "cache_dir") if s.get(k)})
        masks = finder.fit_predict(_as_images(inputs))
        by_path = dict(zip(inputs.paths, masks, strict=True))
        return lambda paths: mask_proposals(paths, [by_path[p] for p in paths])

    def _fit_maskcontrast(self, inputs: ImageInputs) -> _Fit:
        s = self._settings
        masks = self._discovered_masks(inputs)
        seed_everything(self.seed)
        report = BatchReport()
        size = int(s.get("size", 320))
        with self._device() as dev:
            model = open_backbone(resolve_backbone_name(self.backbone), s.get("weights"),
                                  s.get("tap"), dev)
            cache = Path(s["cache_dir"]) if s.get("cache_dir") else None
            trained = mc.train_maskcontrast("images", inputs, masks, self._config, model, size,
                                            cache, dev, report, self.timings)
        _raise_failures(report)
        return _Fit(trained.estimator, trained.backbone,
                    {"feature_size": size, "train": trained.prototypes}, state=trained)

    # ---------------------------------------------------------------------- predict
    def _require_fit(self) -> _Fit:
        if self._fit is None:
            raise UnsegError(f"this {self.method} Segmenter is not fitted: call fit(images) "
                             "or fit_predict(images) first, or Segmenter.load(run)")
        return self._fit

    def predict(self, images: Any) -> list[np.ndarray]:
        """One ``[H, W]`` uint8 array per image, at its own size: class ids (semantic methods,
        MaskContrast) or the 8-bit foreground probability (saliency methods), equal to the
        PNG ``unseg predict`` writes with the saved run."""
        return self._predict(self._inputs(images), fitted_images=False)

    def fit_predict(self, images: Any) -> list[np.ndarray]:
        """:meth:`fit` then the masks of the same images, as ``unseg segment`` (semantic
        methods: predicted from the fit's own features) or ``unseg discover`` writes them."""
        self.fit(images)
        fit = self._require_fit()
        assert fit.inputs is not None
        return self._predict(fit.inputs, fitted_images=True)

    def _predict(self, inputs: ImageInputs, fitted_images: bool) -> list[np.ndarray]:
        fit = self._require_fit()
        if self.output == "semantic":
            collector = _Collector()
            if fitted_images:
                fitted = fit.state
                settings = self._resolved
                with sem._session(settings) as session:
                    sem.predict_label_maps(fitted.estimator, fitted.feats, fitted.paths,
                                           fitted.predict, session.device, session.pool,
                                           collector, session.timings)
            else:
                with self._device() as dev:
                    sem.predict_in_parts(fit.meta["predict"], inputs, collector, dev,
                                         self._settings.get("workers"),
                                         self._settings.get("max_pixels"), self.timings)
            _raise_failures(collector.report)
            return [collector.labels[p] for p in inputs.paths]
        if self.output == "saliency":
            return [mask for mask, _ in self._saliency(inputs)]
        return [labels.astype(np.uint8) for labels in self._maskcontrast(inputs)]

    def _saliency(self, inputs: ImageInputs) -> list[tuple[np.ndarray, list[float] | None]]:
        fit = self._require_fit()
        cfg = self._config if fit.estimator is None else fit.estimator.config
        max_side = resolve_max_side(cfg.image_size, self._settings.get("max_side"))
        if fit.estimator is None:
            prob_fn = sal.spectral_prob_fn(fit.backbone, cfg.image_size, SpectralConfig(),
                                           max_side)
            guided = replace(cfg.guided) if cfg.guided_filter else None
        else:
            prob_fn = sal.head_prob_fn(fit.backbone, fit.estimator, cfg.image_size, max_side)
            guided = sal._guided_settings(cfg, {})
        report = BatchReport()
        out = {p: (mask, box) for p, mask, box in sal.saliency_maps(
            inputs.paths, prob_fn, guided, cfg.image_size, fit.backbone.stride, report,
            self.timings, self._settings.get("max_pixels"), max_side, inputs.arrays)}
        _raise_failures(report)
        return [out[p] for p in inputs.paths]

    def _maskcontrast(self, inputs: ImageInputs) -> list[np.ndarray]:
        fit = self._require_fit()
        report = BatchReport()
        clusters = self._settings.get("clusters", "predicted")
        with self._device() as dev:
            labelled = mc.maskcontrast_labels(
                fit.estimator, fit.backbone, int(fit.meta["feature_size"]), inputs, self._k(),
                clusters=clusters, seed=self.seed, train=fit.meta.get("train"),
                where="images", report=report, device=dev,
            )
        _raise_failures(report)
        by_path = {p: labels for p, labels, _ in labelled}
        return [by_path[p] for p in inputs.paths]

    def predict_proba(self, images: Any) -> list[np.ndarray]:
        """Soft maps at each image's own size: class probabilities ``[K, H, W]`` float32 after
        the refinement (semantic methods; their argmax is :meth:`predict`'s up to ties) or the
        foreground probability ``[H, W]`` float32 in ``[0, 1]`` (saliency methods, before the
        8-bit rounding). MaskContrast assigns whole clusters and has none."""
        fit = self._require_fit()
        inputs = self._inputs(images)
        if self.output == "saliency":
            return [m.astype(np.float32) / 255.0 for m in self.predict(images)]
        if self.output != "semantic":
            raise UnsegError(f"{self.method} assigns clusters to whole images' salient "
                             "regions: it has no class probabilities (use predict)")
        predict: sem.FittedSemantic = fit.meta["predict"]
        from unseg.features import extract_features

        out: list[np.ndarray] = []
        report = BatchReport()
        extras = ("image", "flipped") if predict.predict.flip else ("image",)
        workers = self._settings.get("workers") or sem.default_workers()
        with self._device() as dev, CRFPool(workers) as pool:
            feats = extract_features(inputs.paths, predict.backbone, size=predict.size,
                                     report=report, extras=extras, max_side=predict.max_side,
                                     max_pixels=self._settings.get("max_pixels"), shard=False,
                                     arrays=inputs.arrays)
            _raise_failures(report)
            if predict.source is not None:
                feats = EmbeddedFeatures(feats, predict.source.estimator)
            for p, q, _ in refined_probabilities(predict.estimator, feats, feats.paths,
                                                 predict.predict, dev, pool, self.timings):
                up = F.interpolate(q[None].float(), size=feats.original_size(p),
                                   mode="bilinear", align_corners=False)[0]
                out.append(up.cpu().numpy())
        return out

    def predict_boxes(self, images: Any) -> list[list[float] | None]:
        """Saliency methods: the box ``[x0, y0, x1, y1]`` (pixels, inclusive) of the largest
        4-connected component of each mask above 0.5, or None for an empty mask, as
        ``boxes.json`` of ``unseg discover``."""
        if self.output != "saliency":
            raise UnsegError(f"{self.method} is a {self.output} method; boxes come from "
                             "saliency methods")
        return [box for _, box in self._saliency(self._inputs(images))]

    # ------------------------------------------------------------------ save / load
    def save(self, run_dir: str | Path) -> Path:
        """Write the fitted model as the run folder ``unseg predict`` reads; returns it."""
        fit = self._require_fit()
        run_dir = Path(run_dir)
        weights = self._settings.get("weights")
        if self.output == "semantic":
            sem._save(run_dir, fit.state, self._resolved, self.timings)
        elif self.output == "saliency":
            if fit.estimator is None:
                raise UnsegError("spectral is training-free: there is no run to save")
            assert self.spec is not None
            sal.save_saliency_run(run_dir, self.spec, fit.estimator, fit.backbone, weights,
                                  fit.meta.get("training", {}), self.timings)
        else:
            mc.save_maskcontrast_run(run_dir, fit.state, int(fit.meta["feature_size"]),
                                     weights, self.timings)
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, **options: Any) -> Segmenter:
        """The Segmenter of a run folder (written by :meth:`save`, ``unseg fit``, ``segment``
        or ``discover``), ready to :meth:`predict`. ``options``: ``weights`` (the backbone's,
        when the run's file is not found), ``max_pixels``, ``refine`` (semantic runs),
        ``num_classes``, ``clusters`` and ``seed`` (MaskContrast runs: the clustering)."""
        run_dir = Path(run_dir)
        meta, _ = load_run(run_dir)
        spec = get_method(meta["method"])
        dev = resolve_device(device)
        _, estimator, meta = load_fitted(run_dir, None, dev)
        model = open_fitted_backbone(meta, options.get("weights"), dev, str(run_dir))
        num_classes = options.pop("num_classes", None)
        seed = int(options.pop("seed", 0) or 0)
        if spec.output == "semantic":
            num_classes = int(meta["num_classes"])
        seg = cls.__new__(cls)
        seg.method, seg.spec, seg.output = spec.name, spec, spec.output
        seg.num_classes, seg.backbone, seg.seed, seg.device = (
            num_classes, meta["backbone"], seed, device)
        seg.options = dict(options)
        seg._settings = {k: v for k, v in options.items() if v is not None}
        seg._config_options = {}
        seg._config = estimator.config
        seg.timings = Timings()
        if spec.output == "semantic":
            predict = PredictSettings(**meta["predict"])
            if options.get("refine") is not None:
                predict = replace(predict, refine=sem.check_refine(options["refine"]))
            source = None
            if meta.get("embeddings"):
                source = open_embeddings(meta["embeddings"]["run"], dev,
                                            meta["embeddings"]["sha256"])
            fitted = sem.FittedSemantic(estimator, model, source, int(meta["feature_size"]),
                                        int(meta.get("max_side") or 0) or None, predict)
            seg._fit = _Fit(estimator, model, {"predict": fitted})
        elif spec.output == "saliency":
            if "max_side" not in seg._settings:
                seg._settings["max_side"] = None
            seg._fit = _Fit(estimator, model, {})
        else:
            train = mc.train_prototypes(run_dir)
            seg._fit = _Fit(estimator, model, {"feature_size": int(meta["feature_size"]),
                                               "train": train})
        return seg

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"Segmenter({self.method!r}, num_classes={self.num_classes!r}, "
                f"backbone={self.backbone!r}, seed={self.seed}{extra})")


@dataclasses.dataclass
class _Collector:
    """A label writer that keeps each image's labels in memory."""

    report: BatchReport = dataclasses.field(default_factory=BatchReport)
    labels: dict[Path, np.ndarray] = dataclasses.field(default_factory=dict)

    def write(self, path: Path, labels: np.ndarray, image: torch.Tensor) -> None:
        """Keep ``labels [H, W]`` of ``path`` (uint8, as the PNG stores them)."""
        self.labels[path] = np.ascontiguousarray(labels, dtype=np.uint8)


def _raise_failures(report: BatchReport) -> None:
    """An error naming every image that could not be used (a notebook wants all or nothing)."""
    if report.failed:
        shown = "; ".join(f"{p}: {m}" for p, m in report.failed[:10])
        raise UnsegError(f"{len(report.failed)} image(s) could not be used: {shown}")


def _as_images(inputs: ImageInputs) -> Sequence[Any]:
    """``inputs`` as a list :func:`image_inputs` takes back (paths, and the arrays)."""
    return [inputs.arrays.get(p, p) for p in inputs.paths]
