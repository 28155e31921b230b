"""The one interface every output kind gives the folder pipeline and the :class:`Segmenter`.

A registered method's output kind (``spec.output``: ``"semantic"``, ``"saliency"`` or
``"embedding"``) picks a :class:`Kind` (:mod:`unseg.pipelines.kinds`); the folder pipeline
(:mod:`unseg.pipelines.folder`) and the in-memory :class:`~unseg.segmenter.Segmenter` call the
same five steps of it, so both give the same masks:

- ``session()``: the device (joining the torchrun group where the kind shards), the worker pool,
  the stage timings and the report of failed inputs, for one command;
- ``fit(inputs, root, where, session)``: extract, propose, fit (``where``: the run folder whose
  ``cache/`` and checkpoints a command uses; None: all in memory);
- ``save(fitted, run_dir, session)`` / ``load(run_dir, session)``: the run folder, both ways;
- ``predict(fitted, inputs, session)``: one :class:`Prediction` per image (its mask at its own
  size, the resized image for the overlay, the box), which the caller writes or keeps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from unseg.backbones import get_spec
from unseg.data.memory import ImageInputs
from unseg.errors import UnsegError
from unseg.pipelines.backbone import resolve_backbone_name
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import DEFAULT_PSEUDO_REFINE, DEFAULT_REFINE
from unseg.utils.batch import BatchReport
from unseg.utils.timing import Timings

DEFAULT_SIZE = 320  # the feature short side when none is given (the reference's resolution)


@dataclass(frozen=True)
class Settings:
    """How a command runs, besides the method's own config (each kind reads the fields it has).

    ``size``: feature short side as given (None: :data:`DEFAULT_SIZE`, as :attr:`feature_size`
    reads it; with ``embeddings``, the embedding run's, and another one given is an error);
    ``label_factor``: logits at this multiple of the feature resolution (training and
    prediction); ``refine``: the prediction's refinement (stored in the run as its default);
    ``pseudo_refine``: the PriMaPs pseudo-labels' (the paper: CRF); ``cache_dir``: where
    features and pseudo-labels are cached (None: the run's ``cache/``); entries are keyed by
    everything they depend on, so runs may share one; ``embeddings``: a MaskContrast run whose
    pixel embeddings replace the features (its backbone, tap, weights, feature size and
    max_side are used, other ones given are refused; the run records it and prediction applies
    it again); ``max_side``: the working resolution's long side (None: 4 x ``size``, 0: no
    limit; recorded in the run, which predicts at it); ``max_pixels``: the per-file pixel limit
    (None: Pillow's, 0: none). MaskContrast: ``saliency``, a folder of mask PNGs to train on
    (None: those of ``discover``, the method finding them); ``clusters``: fitted on the
    ``predicted`` images or on the ``training`` ones.
    """

    backbone: str | None = None
    weights: str | None = None
    tap: str | None = None
    size: int | None = None
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
    saliency: str | None = None
    discover: str = "auto"
    clusters: str = "predicted"

    @property
    def feature_size(self) -> int:
        """The feature short side this command uses: ``size``, else :data:`DEFAULT_SIZE`
        (``size`` itself stays None when none was given, as the run's records tell)."""
        return DEFAULT_SIZE if self.size is None else int(self.size)


@dataclass
class Session:
    """What one command shares across its stages: the device, the worker pool (None: the kind
    uses none), the stage timings and the report of failed inputs."""

    device: torch.device
    pool: CRFPool | None = None
    timings: Timings = field(default_factory=Timings)
    report: BatchReport = field(default_factory=BatchReport)


@dataclass
class Prediction:
    """One image's result: ``mask`` ``[H, W]`` uint8 at the image's own size (class ids, or the
    8-bit foreground probability), the resized uint8 ``image [3, h, w]`` for the overlay (None:
    not kept), and the box ``[x0, y0, x1, y1]`` of a foreground mask (None: empty or none)."""

    path: Path
    mask: np.ndarray
    image: torch.Tensor | None = None
    box: list[float] | None = None


@dataclass
class FitResult:
    """What a fit did: the run folder, the images used, failures, training facts, and the
    words the command puts before its count (``notes``, e.g. ``"5 classes, "``)."""

    run_dir: Path
    report: BatchReport
    n_images: int
    facts: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


class Kind(ABC):
    """One output kind's stages (see the module docstring); built by :func:`create` for a
    method to fit, or by :func:`from_run` for a run folder to predict with."""

    output: ClassVar[str]
    labels: ClassVar[bool]  # class ids (palette PNG + overlay) vs foreground (PNG + box)
    shards: ClassVar[bool] = True  # under torchrun each rank predicts its share
    run_options: ClassVar[tuple[str, ...]]  # the overrides from_run uses
    method: str
    settings: Settings
    _config: Any  # the method's config (None until a run is loaded)
    _run: dict[str, Any]  # a run's config.json and `unseg predict`'s overrides (else empty)

    @classmethod
    @abstractmethod
    def create(
        cls, method: str, num_classes: int | None, options: Mapping[str, Any] | None,
        settings: Settings,
    ) -> Kind:
        """The kind of ``method`` with its config built from ``options`` and checked (the
        commands' messages)."""

    @classmethod
    @abstractmethod
    def from_run(cls, run_dir: Path, meta: dict[str, Any],
                 overrides: Mapping[str, Any], device: str | None) -> Kind:
        """The kind that predicts with the run ``run_dir`` (its ``config.json``: ``meta``);
        ``overrides``: what ``unseg predict`` may change (see each kind)."""

    @property
    def config(self) -> Any:
        """The method's config dataclass (a run's, once loaded)."""
        return self._config

    def stride(self) -> int:
        """The backbone's stride (images smaller than two strides are refused when listed):
        the run's, else that of the settings' backbone and tap."""
        if "stride" in self._run:
            return int(self._run["stride"])
        spec = get_spec(resolve_backbone_name(self.settings.backbone))
        return int(spec.tap_info(self.settings.tap or spec.default_tap).stride)

    @abstractmethod
    def session(self) -> AbstractContextManager[Session]:
        """This kind's :class:`Session` for one command."""

    @abstractmethod
    def fit(self, inputs: ImageInputs, root: str | Path, where: Path | None,
            session: Session) -> Any:
        """The fitted state on ``inputs`` (``root`` names them in errors); failures go to
        ``session.report``."""

    @abstractmethod
    def result(self, fitted: Any, run_dir: Path, report: BatchReport) -> FitResult:
        """What :meth:`fit` did, as a command reports it."""

    @abstractmethod
    def save(self, fitted: Any, run_dir: Path, session: Session) -> None:
        """Write ``fitted`` as the run folder ``unseg predict`` reads."""

    @abstractmethod
    def load(self, run_dir: Path, session: Session) -> Any:
        """The fitted state of the run folder ``run_dir``."""

    @property
    def trains(self) -> bool:
        """False for a training-free method (its fit only opens the backbone; no run)."""
        return True

    @property
    def needs_masks(self) -> bool:
        """True when the fit needs saliency masks no one has given yet (:meth:`use_masks`)."""
        return False

    def use_masks(self, masks: Any, names_root: Path | None = None) -> None:
        """Train on these saliency masks: a folder of mask PNGs named as the images under
        ``names_root``, or a function of the paths (kinds that train on masks only)."""
        raise UnsegError(f"{self.method} trains on no saliency masks")

    def release(self, fitted: Any) -> None:  # noqa: B027 (optional step)
        """Drop what ``fitted`` keeps only for predicting its own images (:meth:`predict`'s
        ``reuse``); it still predicts and saves."""

    def fitted_inputs(self, fitted: Any, inputs: ImageInputs) -> ImageInputs:
        """The images :meth:`predict` takes after fitting on ``inputs`` (default: those)."""
        return inputs

    @abstractmethod
    def predict(self, fitted: Any, inputs: ImageInputs, session: Session, root: str | Path,
                overlays: bool = False, reuse: bool = False) -> Iterator[Prediction]:
        """One :class:`Prediction` per usable image of ``inputs`` (this rank's share under
        torchrun), failures to ``session.report``; ``overlays``: keep the resized images;
        ``reuse``: ``inputs`` are :meth:`fitted_inputs` of this fit, whose kept features may
        serve."""

    def predict_proba(self, fitted: Any, inputs: ImageInputs,
                      session: Session) -> Iterator[tuple[Path, np.ndarray]]:
        """``(path, soft map at the image's size)`` per image of ``inputs`` (float32), for the
        kinds that have one."""
        raise UnsegError(f"{self.method} has no soft maps (use predict)")

    def finish(self, fitted: Any, written: list[Path]) -> None:  # noqa: B027 (optional step)
        """After a prediction wrote ``written`` (every rank's): the kind's closing log."""
