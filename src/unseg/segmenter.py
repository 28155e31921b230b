"""The :class:`Segmenter`: images in, masks out, for every method unseg knows.

A notebook user's object (scikit-learn's estimator habit)::

    seg = unseg.Segmenter("kmeans", num_classes=5, backbone="dino_vits16")
    masks = seg.fit_predict(["a.jpg", pil_image, array])   # one H×W uint8 array per image
    seg.save("run")                                         # `unseg predict run ...` reads it
    masks = unseg.Segmenter.load("run").predict("more/")    # a folder works too
    pickle.dumps(seg)                                       # its arguments and run, no backbone

It runs the same :class:`~unseg.pipelines.kind.Kind` as the commands' folder pipeline
(:mod:`unseg.pipelines.folder`), with the same defaults and the same seed handling, so
``fit_predict`` returns exactly the PNGs ``unseg segment`` / ``unseg discover`` write for the
same images and settings: the working resolution (short side ``size``, long side at most
``max_side``), the features (with the mirror image and the student view where the method uses
them), the proposals, the fit, the prediction with its refinement, and the upsampling to each
image's own size. What comes back per image:

- semantic methods (``kmeans``, ``primaps-em``) and ``maskcontrast``: class ids ``[H, W]``
  (uint8); :meth:`Segmenter.predict_proba` gives the class probabilities ``[K, H, W]``
  (not MaskContrast's: it assigns whole clusters);
- saliency methods (``spectral``, ``saliency-head``, ``found``): the foreground probability in
  8 bits ``[H, W]`` (uint8, as the PNG); :meth:`Segmenter.predict_proba` gives it in ``[0, 1]``
  (float32, the 8-bit mask / 255), :meth:`Segmenter.predict_boxes` the box
  ``[x0, y0, x1, y1]`` of its largest component (or None).

Images: a folder or file path (listed as the commands list it, in the order
:func:`list_images` gives; any ``os.PathLike``), one PIL
image or array, an ``[N, H, W, C]`` uint8 stack, or a list or tuple of paths, PIL images and
uint8 arrays (``H×W×3`` RGB, ``H×W`` grey, ``H×W×4`` RGBA). An in-memory image gives the
masks its file gives, with two exceptions: a JPEG over twice the working size is decoded by the
commands at a reduced DCT scale (an array is resized from full size), and the seeded per-image
augmentations (PriMaPs-EM's student view, MaskContrast's photometric view) are keyed by the
file's bytes for a path and by the pixels for an in-memory image, so the two fits differ as two
seeds do.

``options``: the method's config fields (as ``unseg segment --help`` / ``unseg discover --help``
list them, by field name: ``epochs=5``, ``guided.radius=4`` as ``**{"guided.radius": 4}``) and
these settings of the pipeline. Semantic methods: ``size`` (320), ``max_side`` (None: 4 × size;
0: none), ``max_pixels``, ``label_factor`` (2), ``refine`` ("crf"), ``pseudo_refine`` ("crf"),
``weights``, ``tap``, ``cache_dir`` (features and pseudo-labels on disk; default: none, all in
memory), ``workers``, ``embeddings`` (a MaskContrast run: its size and ``max_side``,
which ``size`` and ``max_side`` may only repeat). Saliency methods: ``max_side``,
``max_pixels``, ``weights``, ``tap``, ``cache_dir``; their size is the config field
``image_size`` (320; spectral takes it too). MaskContrast: ``size``, ``max_side``,
``max_pixels`` (its training, its prediction and the discovery of its masks), ``weights``,
``tap``, ``cache_dir``, and ``saliency`` (a folder of masks) or ``discover`` (the method making
them, default ``auto``) and ``clusters`` ("predicted" or "training"). Any other name is an
error.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unseg.data.memory import ImageInputs, image_inputs
from unseg.errors import UnsegError, a_or_an
from unseg.pipelines.kind import Kind, Prediction, Settings
from unseg.pipelines.kinds import RUN_OPTIONS, create_kind, output_of, run_kind
from unseg.pipelines.maskcontrast import DEFAULT_CLASSES
from unseg.pipelines.saliency import SPECTRAL, mask_source, mask_source_context
from unseg.proposals.saliency_masks import mask_proposals
from unseg.registry import check_value
from unseg.registry import list_methods as registered_methods
from unseg.runs import load_run, read_run_files, write_run_files
from unseg.segmenter_params import (
    FIELD,
    SETTINGS_OF,
    check_device,
    check_run_options,
    check_settings,
    run_params,
)
from unseg.utils.batch import BatchReport
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)
_STATE_VERSION = 1  # of what __getstate__ returns



def list_methods() -> list[str]:
    """The names :class:`Segmenter` takes: every registered method, and ``spectral``."""
    names = [s.name for s in registered_methods()]
    return [*names, SPECTRAL]


def list_images(images: str | os.PathLike) -> list[Path]:
    """The image files of a folder (sub-folders included) or dataset root, in the order a
    :class:`Segmenter` takes them: ``masks[i]`` of ``fit_predict(folder)`` / ``predict(folder)``
    is the mask of ``list_images(folder)[i]``, and :meth:`Segmenter.score` wants one
    ground-truth map per file in this order. Names repeat across sub-folders
    (``cats/001.jpg``, ``dogs/001.jpg``); the path under the folder tells them apart, as the
    commands' mirrored masks (``masks/cats/001.png``) do. A file the commands would refuse is
    an error here too, naming it."""
    from unseg.data.datasets import resolve_inputs

    if not isinstance(images, (str, os.PathLike)):
        raise UnsegError(f"images: expected a folder or file path, got {type(images).__name__}")
    report = BatchReport()
    paths = resolve_inputs(images, report)
    if report.failed:
        path, problem = report.failed[0]
        raise UnsegError(f"{path}: {problem}")
    return paths


def list_backbones() -> list[str]:
    """The backbone names :class:`Segmenter` (and ``--backbone``) take."""
    from unseg.backbones import list_backbones as specs

    return [s.name for s in specs()]


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
        for name, value in (("num_classes", num_classes), ("seed", seed)):
            if value is not None:
                check_value(name, int, value)
        check_device(device)
        self.method = method
        self.num_classes = num_classes
        self.backbone = backbone
        self.seed = seed
        self.device = device
        self.options = dict(options)
        self.output = output_of(method)
        allowed = SETTINGS_OF[self.output]
        if self.output != "semantic" and "embeddings" in self.options:
            raise UnsegError(f"{method} has no option 'embeddings' (semantic methods only)")
        if self.output == "saliency" and "size" in self.options:
            raise UnsegError(
                f"{method} has no option 'size': a saliency method's working size is its "
                f"option image_size (Segmenter({method!r}, image_size="
                f"{self.options['size']!r}); --size of unseg discover)")
        check_settings({"backbone": backbone,
                         **{k: v for k, v in self.options.items() if k in allowed}})
        # numpy scalars (a grid over np.arange) as Python's for the pipeline: random.seed and
        # the run's config.json refused them; the attributes keep what was given (clone)
        plain = {k: _plain(v) for k, v in self.options.items()}
        settings = Settings(backbone=backbone, seed=_plain(seed), device=device, **{
            FIELD.get(k, k): v for k, v in plain.items() if k in allowed})
        config_options = {k: v for k, v in plain.items() if k not in allowed}
        self._kind: Kind = create_kind(method, _plain(num_classes), config_options, settings)
        self._fitted: Any = None
        self._fit_inputs: ImageInputs | None = None
        self._loaded_from: Path | None = None
        self._run_params: dict[str, Any] | None = None
        self._from_run = False  # self._kind predicts with a run (load, unpickle): fit makes anew
        self._run_files: dict[str, bytes] | None = None  # an unpickled fit's run, for pickling
        self.timings = Timings()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, options included (scikit-learn's convention, so that
        ``sklearn.base.clone`` makes an unfitted copy); ``deep`` is accepted and unused. A
        segmenter made by :meth:`load` gives those that fit as its run was fitted (see
        :func:`run_params`), so its clone is an unfitted segmenter configured like the run."""
        if self._run_params is not None:
            return dict(self._run_params)
        return {"method": self.method, "num_classes": self.num_classes,
                "backbone": self.backbone, "seed": self.seed, "device": self.device,
                **self.options}

    def set_params(self, **params: Any) -> Segmenter:
        """Change constructor arguments or options (checked as the constructor checks them);
        returns ``self``, unfitted: fit again (a loaded segmenter becomes an unfitted one
        configured like its run). Refused values leave it as it was."""
        self.__dict__.update(type(self)(**{**self.get_params(), **params}).__dict__)
        return self

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags (its model selection asks for them; sklearn >= 1.6): an
        unsupervised estimator whose ``fit`` needs no target and whose inputs are images, not
        a feature matrix. scikit-learn is imported here only, when it asks."""
        from sklearn.utils import Tags, TargetTags

        tags = Tags(estimator_type=None, target_tags=TargetTags(required=False))
        tags.no_validation = True  # images (paths, PIL images, arrays), not an [N, F] matrix
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        """scikit-learn's ``check_is_fitted`` reads this: :attr:`fitted`."""
        return self.fitted

    @property
    def config(self) -> Any:
        """The method's config dataclass, as the run records it."""
        return self._kind.config

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` ran (or the segmenter was loaded)."""
        return self._fitted is not None

    def _inputs(self, images: Any) -> ImageInputs:
        return image_inputs(images, self._kind.stride())

    # -------------------------------------------------------------------------- fit
    def fit(self, images: Any, y: Any = None) -> Segmenter:
        """Fit the method on ``images`` (no labels); returns ``self``. Training-free
        ``spectral`` only opens its backbone. A segmenter made by :meth:`load` only predicts.
        ``y`` is unused: scikit-learn's model selection (``GridSearchCV``,
        ``cross_val_score``) passes the ground truth it later gives :meth:`score`. What the fit
        computed for its own images (their features, in-memory images' pixels) is not kept."""
        self._fit(images)
        self._release()
        return self

    def _fit(self, images: Any) -> None:
        """:meth:`fit`, keeping the fit's images and features for :meth:`fit_predict`."""
        if self._loaded_from is not None:
            raise UnsegError(
                f"this {self.method} Segmenter was loaded from the run {self._loaded_from}: it "
                f"predicts; to fit, make a new one: Segmenter({self.method!r}, ...)"
            )
        inputs = self._inputs(images)
        self._run_files = None
        if self._from_run:  # unpickled: fit a kind made as the constructor makes it
            self._kind, self._from_run = type(self)(**self.get_params())._kind, False
        kind = self._kind
        if kind.needs_masks:
            kind.use_masks(self._discovered_masks(inputs))
        with kind.session() as session:
            self._fitted = kind.fit(inputs, "images", None, session)
        _raise_failures(session.report)
        self.timings = session.timings
        self._fit_inputs = inputs

    def _release(self) -> None:
        """Drop what only predicting the fit's own images uses (a semantic fit's features of
        every image: gigabytes for a large folder held in memory)."""
        if self._fitted is not None:
            self._kind.release(self._fitted)
        self._fit_inputs = None

    def _discovered_masks(self, inputs: ImageInputs) -> Any:
        """The mask proposals MaskContrast trains on: those of a discover method run on the
        same images (``discover``, default ``auto`` as ``unseg discover``: the FOUND-style head
        from 150 images on, else spectral), with the chain's options
        (:func:`~unseg.pipelines.saliency.mask_source`), this Segmenter's seed, ``max_side``
        and ``max_pixels``, as ``unseg segment --method maskcontrast`` runs it."""
        s = self._kind.settings  # type: ignore[attr-defined]
        method, source_options, _ = mask_source(s.discover, n_images=len(inputs))
        options = {k: getattr(s, k) for k in ("weights", "tap", "cache_dir") if getattr(s, k)}
        options.update({k: getattr(s, k) for k in ("max_side", "max_pixels")
                        if getattr(s, k) is not None})
        options.update(source_options or {})
        finder = Segmenter(method, backbone=self.backbone, seed=self.seed, device=self.device,
                           **options)
        with mask_source_context(source_options):
            masks = finder.fit_predict(_as_images(inputs))
        by_path = dict(zip(inputs.paths, masks, strict=True))
        return lambda paths: mask_proposals(paths, [by_path[p] for p in paths])

    # ---------------------------------------------------------------------- predict
    def _require_fit(self) -> Any:
        if self._fitted is None:
            raise UnsegError(f"this {self.method} Segmenter is not fitted: call fit(images) "
                             "or fit_predict(images) first, or Segmenter.load(run)")
        return self._fitted

    def _predictions(self, inputs: ImageInputs, reuse: bool = False) -> list[Prediction]:
        """The kind's :class:`Prediction` of every image of ``inputs``, in their order (an
        image that cannot be predicted is an error)."""
        fitted = self._require_fit()
        with self._kind.session() as session:
            session.timings = self.timings
            out = {p.path: p for p in self._kind.predict(fitted, inputs, session, "images",
                                                         reuse=reuse)}
        _raise_failures(session.report)
        return [out[p] for p in inputs.paths]

    def predict(self, images: Any) -> list[np.ndarray]:
        """One ``[H, W]`` uint8 array per image, at its own size: class ids (semantic methods,
        MaskContrast) or the 8-bit foreground probability (saliency methods), equal to the
        PNG ``unseg predict`` writes with the saved run."""
        return [_mask(p) for p in self._predictions(self._inputs(images))]

    def fit_predict(self, images: Any, y: Any = None) -> list[np.ndarray]:
        """:meth:`fit` then the masks of the same images, as ``unseg segment`` (semantic
        methods: predicted from the fit's own features) or ``unseg discover`` writes them
        (``y`` unused, as :meth:`fit`'s)."""
        self._fit(images)
        assert self._fit_inputs is not None
        try:
            used = self._kind.fitted_inputs(self._fitted, self._fit_inputs)
            return [_mask(p) for p in self._predictions(used, reuse=True)]
        finally:
            self._release()

    def predict_proba(self, images: Any) -> list[np.ndarray]:
        """Soft maps at each image's own size: class probabilities ``[K, H, W]`` float32 after
        the refinement (semantic methods; their argmax is :meth:`predict`'s up to ties) or the
        foreground probability ``[H, W]`` float32 in ``[0, 1]`` (saliency methods: the 8-bit
        mask of :meth:`predict` divided by 255). MaskContrast assigns whole clusters and has
        none (an error)."""
        fitted = self._require_fit()
        inputs = self._inputs(images)
        with self._kind.session() as session:
            session.timings = self.timings
            out = dict(self._kind.predict_proba(fitted, inputs, session))
        _raise_failures(session.report)
        return [out[p] for p in inputs.paths]

    def predict_boxes(self, images: Any) -> list[list[float] | None]:
        """Saliency methods: the box ``[x0, y0, x1, y1]`` (pixel edges: ``x1``/``y1`` one past
        the last column/row, as :mod:`unseg.metrics.corloc`) of the largest 4-connected
        component of each mask above 0.5, or None for an empty mask, as ``boxes.json`` of
        ``unseg discover``."""
        if self._kind.labels:
            raise UnsegError(f"{self.method} is {a_or_an(self.output)} method; boxes come from "
                             "saliency methods")
        return [p.box for p in self._predictions(self._inputs(images))]

    def score(self, images: Any, ground_truth: Any, **options: Any) -> float:
        """The masks of ``images`` scored against ``ground_truth`` (one label map or mask per
        image, an array, a PIL image or a file, in the same order; one image's alone when
        ``images`` is one image), as ``unseg evaluate`` scores them:
        Hungarian-matched mIoU (semantic methods, MaskContrast; ``options`` those of
        :func:`~unseg.metrics.in_memory.score_semantic`) or saliency IoU (saliency methods;
        :func:`~unseg.metrics.in_memory.score_saliency`'s). A fraction in [0, 1], higher is
        better (scikit-learn's ``score``); the functions give every score."""
        from unseg.metrics.in_memory import (
            per_image,
            saliency_scores,
            score_saliency,
            score_semantic,
        )

        scorer = score_semantic if self._kind.labels else score_saliency
        takes = list(inspect.signature(scorer).parameters)[2:]
        unknown = [name for name in options if name not in takes]
        if unknown:  # was a TypeError from the scoring function
            raise UnsegError(f"score has no option {', '.join(map(repr, unknown))} for "
                             f"{a_or_an(self.output)} method; it takes {', '.join(takes)}")
        if isinstance(ground_truth, (str, os.PathLike)) and not Path(ground_truth).is_file():
            raise UnsegError("ground_truth: give one label map or file per image, in the "
                             "images' order (a list; a folder's order is "
                             "unseg.list_images(folder)); for folders use `unseg evaluate`")
        truths = per_image(ground_truth, "ground_truth", files=True)
        inputs = self._inputs(images)
        if len(inputs) != len(truths):  # before predicting, not after
            raise UnsegError(f"{len(inputs)} images for {len(truths)} ground-truth maps: give "
                             "one of each per image, in the same order")
        masks = [_mask(p) for p in self._predictions(inputs)]
        if self._kind.labels:
            return score_semantic(masks, truths, **options).miou
        return saliency_scores(masks, truths, **options).iou  # 8-bit maps, faint ones too

    # ------------------------------------------------------------------ save / load
    def save(self, run_dir: str | Path) -> Path:
        """Write the fitted model as the run folder ``unseg predict`` reads; returns its path.
        ``spectral`` trains nothing and has no run: an error. A segmenter made by :meth:`load`
        (or unpickled and not fitted since) writes the run it predicts with, as it was."""
        fitted = self._require_fit()
        run_dir = Path(run_dir)
        if self._loaded_from is not None:  # its kind knows the run, not what made it
            write_run_files(read_run_files(self._loaded_from), run_dir)
            return run_dir
        if self._run_files is not None:
            write_run_files(self._run_files, run_dir)
            return run_dir
        with self._kind.session() as session:
            session.timings = self.timings
            self._kind.save(fitted, run_dir, session)
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, **options: Any) -> Segmenter:
        """The Segmenter of a run folder (written by :meth:`save`, ``unseg fit``, ``segment``
        or ``discover``), ready to :meth:`predict`. ``options``: ``weights`` (the backbone's,
        when the run's file is not found), ``max_pixels`` (every kind of run),
        ``refine`` and ``workers`` (semantic runs), ``guided_filter``, ``guide``, ``dense_crf``
        and ``max_side`` (saliency runs), ``num_classes``, ``clusters`` and ``seed``
        (MaskContrast runs: the clustering, its ``seed`` by default the run's); any other is
        an error. The segmenter's ``seed`` is the run's (or the ``seed`` given), as
        :meth:`get_params` gives it. Semantic and MaskContrast runs predict at the working
        resolution (``max_side``) they were fitted at."""
        unknown = [name for name in options if name not in RUN_OPTIONS]
        if unknown:
            raise UnsegError(f"Segmenter.load has no option {', '.join(map(repr, unknown))}; "
                             f"it takes device, {', '.join(RUN_OPTIONS)}")
        check_device(device)
        check_run_options(options)
        options = {k: _plain(v) for k, v in options.items()}
        run_dir = Path(run_dir)
        given = dict(options)
        meta, _ = load_run(run_dir)
        if output_of(meta["method"]) == "embedding":  # clusters the images it predicts
            options.setdefault("num_classes", DEFAULT_CLASSES)
        kind = run_kind(run_dir, {k: v for k, v in options.items() if v is not None}, device)
        params = run_params(meta, options, device)
        with kind.session() as session:
            fitted = kind.load(run_dir, session)
        seg = cls.__new__(cls)
        seg.method, seg.output, seg._kind = kind.method, kind.output, kind
        num_classes = options.pop("num_classes", None)
        if kind.output == "semantic":
            num_classes = int(meta["num_classes"])
        seg.num_classes, seg.backbone, seg.device = num_classes, meta["backbone"], device
        options.pop("seed", None)
        seg.seed = int(params["seed"])  # the run's, as get_params gives it
        seg.options = dict(options)
        seg._fitted, seg._fit_inputs, seg._loaded_from = fitted, None, run_dir
        seg._run_params = params
        seg._load_options = given
        seg._from_run, seg._run_files = True, None
        seg.timings = Timings()
        return seg

    # ----------------------------------------------------------------------- pickle
    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` (``joblib.dump``, ``copy.deepcopy``) keeps: the constructor's
        arguments and, once fitted, the bytes of the run :meth:`save` writes (a loaded
        segmenter: its run's). The backbone is not in it: it is opened again when unpickled,
        found as :meth:`load` finds a run's (by name, or the ``weights`` file and checksum)."""
        state: dict[str, Any] = {"version": _STATE_VERSION, "fitted": self.fitted, "run": None}
        if self._loaded_from is not None:
            state.update(loaded_from=str(self._loaded_from), device=self.device,
                         load_options=dict(self._load_options),
                         run=read_run_files(self._loaded_from))
            return state
        state["params"] = self.get_params()
        if self.fitted and self._kind.trains:
            if self._run_files is not None:  # unpickled and not fitted since: the same run
                state["run"] = dict(self._run_files)
                return state
            with tempfile.TemporaryDirectory(prefix="unseg-pickle-") as tmp:
                state["run"] = read_run_files(self.save(Path(tmp) / "run"))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise UnsegError(f"this pickled Segmenter was written by another version of unseg "
                             f"(state {state.get('version')!r}, this one reads "
                             f"{_STATE_VERSION}): save it with Segmenter.save instead")
        if "loaded_from" in state:
            other = _load_files(state["run"], state["device"], state["load_options"])
            other._loaded_from = Path(state["loaded_from"])
            self.__dict__.update(other.__dict__)
            return
        params = state["params"]
        self.__dict__.update(type(self)(**params).__dict__)
        if not state["fitted"]:
            return
        if state["run"] is None:  # training-free: fitting only opens the backbone
            with self._kind.session() as session:
                self._fitted = self._kind.fit(ImageInputs([]), "images", None, session)
            return
        options = {k: params[k] for k in self._kind.run_options if params.get(k) is not None}
        loaded = _load_files(state["run"], params["device"], options)
        self._kind, self._fitted, self._from_run = loaded._kind, loaded._fitted, True
        self._run_files = dict(state["run"])

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"Segmenter({self.method!r}, num_classes={self.num_classes!r}, "
                f"backbone={self.backbone!r}, seed={self.seed}{extra})")


def _load_files(files: dict[str, bytes], device: str | None,
                options: dict[str, Any]) -> Segmenter:
    """:meth:`Segmenter.load` of a run given as its files' bytes (written to a temporary
    folder, read, removed: a loaded run keeps nothing open in its folder)."""
    with tempfile.TemporaryDirectory(prefix="unseg-unpickle-") as tmp:
        run_dir = write_run_files(files, Path(tmp) / "run")
        return Segmenter.load(run_dir, device=device, **options)


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars (``np.int64(5)``, ``np.float64``, ``np.bool_``) made
    Python's, in tuples and lists too."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _mask(pred: Prediction) -> np.ndarray:
    """The prediction's mask as the PNG stores it (uint8)."""
    return np.ascontiguousarray(pred.mask, dtype=np.uint8)


def _raise_failures(report: BatchReport) -> None:
    """An error naming every image that could not be used (a notebook wants all or nothing)."""
    if report.failed:
        shown = "; ".join(f"{p}: {m}" for p, m in report.failed[:10])
        raise UnsegError(f"{len(report.failed)} image(s) could not be used: {shown}")


def _as_images(inputs: ImageInputs) -> Sequence[Any]:
    """``inputs`` as a list :func:`image_inputs` takes back (paths, and the arrays)."""
    return [inputs.arrays.get(p, p) for p in inputs.paths]
