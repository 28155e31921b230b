"""The folder pipeline: what ``unseg segment``, ``fit``, ``predict`` and ``discover`` do, for
every method.

Each function lists the images (dataset roots, folders, files: :mod:`unseg.data.datasets`),
runs the method's :class:`~unseg.pipelines.kind.Kind` (the same steps the
:class:`~unseg.segmenter.Segmenter` runs in memory), and writes through one
:class:`MaskWriter`: ``OUT/masks/<name>.png`` (class ids as a palette PNG, or the 8-bit
foreground probability), ``OUT/overlays/<name>.jpg`` for class ids, ``OUT/boxes.json`` for
foregrounds, and ``OUT/run`` (the fitted model) where a method trains. ``<name>`` is the
image's path under the images folder without its extension (its stem in a flat folder). Under
torchrun each rank predicts its share and the reports are gathered. The command around it
(:mod:`unseg.cli`) claims ``OUT``, keeps its manifest, handles interrupts and writes the
report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unseg.data.datasets import ImageListing
from unseg.data.inputs import output_name
from unseg.data.layouts import resolve_image_dir
from unseg.data.memory import ImageInputs
from unseg.errors import UnsegError
from unseg.layout import BOXES_FILE, DISCOVER_DIR, MASKS_DIR, OVERLAYS_DIR, RUN_DIR
from unseg.pipelines.kind import FitResult, Kind, Prediction, Session, Settings
from unseg.pipelines.kinds import create_kind, run_kind
from unseg.pipelines.label_maps import gather_report, overlay_image
from unseg.pipelines.saliency import MaskSource, mask_source, mask_source_context
from unseg.proposals.saliency_masks import NoUsableMasks
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.io import atomic_write, save_png_atomic, write_json_atomic
from unseg.utils.palette import png_palette
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

PNG_LEVEL = 1  # zlib level of the label PNGs: the same pixels, ~60x faster than Pillow's 6
JPEG_QUALITY = 90
BOXES_EVERY = 50  # boxes.json is rewritten after this many masks (a killed run keeps most)

@dataclass
class MaskWriter:
    """Writes each :class:`Prediction` into the output folder ``out_dir``: class ids (``labels``)
    as a palette PNG and the overlay (``overlays``), or a foreground as an 8-bit PNG and its box
    in ``boxes.json``; what was written goes to ``report``."""

    out_dir: Path
    names_root: Path
    labels: bool
    overlays: bool
    report: BatchReport
    palette: list[int] = field(default_factory=png_palette)
    boxes: dict[str, list[float] | None] = field(default_factory=dict)

    def write(self, pred: Prediction) -> None:
        """``pred``'s mask (and its overlay or box)."""
        name = output_name(pred.path, self.names_root)
        target = self.out_dir / MASKS_DIR / name
        if self.labels:
            mask = Image.fromarray(np.ascontiguousarray(pred.mask, dtype=np.uint8)).convert("P")
            mask.putpalette(self.palette)
            atomic_write(target, lambda p: mask.save(p, format="PNG", compress_level=PNG_LEVEL))
            if self.overlays and pred.image is not None:
                picture = overlay_image(pred.image, mask)
                jpg = (self.out_dir / OVERLAYS_DIR / name).with_suffix(".jpg")
                atomic_write(jpg, lambda p: picture.save(p, format="JPEG", quality=JPEG_QUALITY))
        else:
            save_png_atomic(target, pred.mask)
            self.boxes[name.with_suffix("").as_posix()] = pred.box
            if len(self.boxes) % BOXES_EVERY == 0:
                self.close()
        self.report.written.append(target)

    def close(self) -> None:
        """Write ``boxes.json`` (foreground masks only)."""
        if not self.labels:
            write_json_atomic(self.out_dir / BOXES_FILE, self.boxes)


def list_images(images: str | Path | ImageListing, kind: Kind,
                report: BatchReport) -> ImageInputs:
    """The usable images of ``images`` (refused ones to ``report``), named under its image
    folder (a listing: its own, walked and its headers read once however often it is asked)."""
    listing = ImageListing.of(images)
    return ImageInputs(listing.usable(report, kind.stride()), names_root=listing.names_root)


def _mine(kind: Kind, inputs: ImageInputs) -> ImageInputs:
    """This rank's share of ``inputs`` when the kind shards (all of them in a single process)."""
    if not kind.shards:
        return inputs
    paths = dist.shard(inputs.paths, dist.rank(), dist.world_size())
    return ImageInputs(paths, inputs.arrays, inputs.names_root)


def _predict_into(kind: Kind, fitted: Any, inputs: ImageInputs, session: Session,
                  out_dir: Path, images: str | Path, reuse: bool = False) -> BatchReport:
    """Predict this rank's share of ``inputs`` and write it into ``out_dir``: the masks written
    and every failure of the command so far (``session.report``'s)."""
    writer = MaskWriter(out_dir, resolve_image_dir(images), kind.labels, kind.labels,
                        BatchReport())
    for pred in kind.predict(fitted, _mine(kind, inputs), session, images, overlays=kind.labels,
                             reuse=reuse):
        with session.timings.stage("writing"):
            writer.write(pred)
    writer.close()
    return BatchReport(writer.report.written, session.report.failed)


def _finish(kind: Kind, fitted: Any, report: BatchReport) -> BatchReport:
    """Every rank's ``report`` (masks written, failures) where the kind shards, closed by the
    kind's own log."""
    if kind.shards:
        report = gather_report(report)
    kind.finish(fitted, report.written)
    return report


def segment(
    images: str | Path | ImageListing,
    out_dir: str | Path,
    method: str = "primaps-em",
    num_classes: int | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    source: MaskSource | None = None,
) -> BatchReport:
    """Fit ``method`` on ``images`` and predict them in one pass: ``out_dir/run`` (reusable
    with ``unseg predict``), ``out_dir/masks``, ``out_dir/overlays``; MaskContrast first
    discovers the masks it trains on into ``out_dir/discover`` (unless ``settings.saliency``
    names a folder of them), with ``source`` (what :func:`check_discovery` returned for these
    images and settings; None: resolved here, which lists the images for ``auto``). The images
    are listed once (an :class:`~unseg.data.datasets.ImageListing` given is used) for the
    discovery's training and prediction and the method's fit.

    Returns the prediction's report, with the images the fit (and discovery) could not use among
    the failures; the run's ``config.json`` holds the seconds per stage (``timings``).
    """
    settings = settings or Settings()
    kind = create_kind(method, num_classes, options, settings)
    out = Path(out_dir)
    listing = ImageListing.of(images)
    with kind.session() as session:
        chained = kind.needs_masks
        if chained:
            source = source or mask_source(kind.settings.discover, listing)
            with session.timings.stage("discover"):
                found = _discover_masks(listing, out / DISCOVER_DIR, kind.settings, source)
            session.report.merge(BatchReport(failed=found.failed))
            kind.use_masks(out / DISCOVER_DIR / MASKS_DIR, listing.names_root)
        inputs = list_images(listing, kind, session.report)
        try:
            fitted = kind.fit(inputs, listing.root, out / RUN_DIR, session)
        except NoUsableMasks as exc:
            if not chained:
                raise
            assert source is not None
            raise UnsegError(_no_object_found(source.method, exc)) from None
        report = _predict_into(kind, fitted, kind.fitted_inputs(fitted, inputs), session, out,
                               listing.root, reuse=True)
        kind.save(fitted, out / RUN_DIR, session)
        dist.barrier()
        return _finish(kind, fitted, report)


def _no_object_found(method: str, exc: NoUsableMasks) -> str:
    """Why a fit chained after its own discovery (``method``) had no mask to train on."""
    return (f"the discovery run before the fit ({method}) gave no usable mask: "
            f"{exc}. Try a larger --max-side (or none), another --discover, or masks of "
            "your own with --saliency DIR")


def _discovery_settings(settings: Settings) -> Settings:
    """The settings of the discovery chained before a method that trains on its masks: the
    run's backbone, weights, tap, device, cache, seed, ``max_side`` and ``max_pixels``
    (``max_side`` as given: None is 4 x the discovery's own size)."""
    return Settings(
        backbone=settings.backbone, weights=settings.weights, tap=settings.tap,
        device=settings.device, cache_dir=settings.cache_dir, seed=settings.seed,
        max_side=settings.max_side, max_pixels=settings.max_pixels,
    )


def check_discovery(images: str | Path | ImageListing, settings: Settings) -> MaskSource:
    """Refuse (``UnsegError``) what the discovery :func:`segment` chains before a method that
    trains on its masks would refuse with ``settings`` (that method's), as its own kind is
    checked: before a command claims (and ``--overwrite`` empties) its output folder. Returns
    the mask source it checked, for :func:`segment` to run (``auto`` lists the images once)."""
    source = mask_source(settings.discover, images)
    create_kind(source.method, None, source.options, _discovery_settings(settings))
    return source


def _discover_masks(images: str | Path | ImageListing, out_dir: Path, settings: Settings,
                    source: MaskSource | None = None) -> BatchReport:
    """``unseg discover`` with ``settings.discover`` (``auto``: as the command decides) and its
    defaults but the chain's own (:func:`~unseg.pipelines.saliency.mask_source`; ``source``:
    already resolved), for a method that trains on the masks, with :func:`_discovery_settings`."""
    listing = ImageListing.of(images)
    method, options, why = source or mask_source(settings.discover, listing)
    logger.info("discover: %s%s", why, f" ({options})" if options else "")
    with mask_source_context(options):
        found = discover(listing, out_dir, method, options=options,
                         settings=_discovery_settings(settings))
    if not found.written:
        raise UnsegError(f"{listing.root}: discover wrote no mask")
    return found


def fit(
    data: str | Path,
    run_dir: str | Path,
    method: str,
    num_classes: int | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> FitResult:
    """Fit ``method`` on the images of ``data`` (dataset root, folder or file) and save it to
    ``run_dir`` (its ``cache/``, and MaskContrast's checkpoint after every epoch, resumed by the
    same call after a kill). ``options``: the method's config fields by name (e.g.
    ``{"steps": 100}``); ``settings``: backbone, feature size, seed, device, ... (MaskContrast:
    ``saliency``, the folder of masks it trains on)."""
    settings = settings or Settings()
    kind = create_kind(method, num_classes, options, settings)
    if kind.needs_masks:
        raise UnsegError(f"{kind.method} trains on saliency masks: name their folder (--saliency)")
    run_dir = Path(run_dir)
    with kind.session() as session:
        fitted = kind.fit(list_images(data, kind, session.report), data, run_dir, session)
        kind.save(fitted, run_dir, session)
        dist.barrier()
    return kind.result(fitted, run_dir, session.report)


def predict(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> BatchReport:
    """Masks for every image of ``images`` with the run ``run_dir`` (any method), into
    ``out_dir`` as :func:`segment` and :func:`discover` write them. ``overrides``: what the run's
    kind lets ``unseg predict`` change (``refine``, ``guided_filter``, ``guide``, ``weights``,
    ``max_pixels``, ``num_classes``, ``clusters``, ``seed``, ...)."""
    kind = run_kind(run_dir, overrides, device)
    with kind.session() as session:
        fitted = kind.load(Path(run_dir), session)
        inputs = list_images(images, kind, session.report)
        report = _predict_into(kind, fitted, inputs, session, Path(out_dir), images)
        return _finish(kind, fitted, report)


def discover(
    images: str | Path | ImageListing,
    out_dir: str | Path,
    method: str = "spectral",
    *,
    train_images: str | Path | ImageListing | None = None,
    options: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    timings: Timings | None = None,
) -> BatchReport:
    """``unseg discover``: a foreground mask and its box for every image of ``images``.

    ``method``: ``spectral`` (training-free TokenCut) or a registered saliency method, first
    trained on ``train_images`` (default: ``images`` themselves, no labels used) into
    ``out_dir/run``, reusable with ``unseg predict``. ``options``: the method's config fields
    (the guided filter applies to spectral too); ``settings``: backbone, weights, tap, device,
    the training's feature cache, ``max_pixels`` and ``max_side`` of the images predicted;
    ``timings``: receives the seconds per stage. Training uses square centre crops, which no
    long-side limit changes. The images are listed once for training and prediction (an
    :class:`~unseg.data.datasets.ImageListing` given, e.g. the one that chose the method, is
    used).
    """
    settings = settings or Settings()
    kind = create_kind(method, None, options, settings)
    out = Path(out_dir)
    listing = ImageListing.of(images)
    train = listing if train_images is None else ImageListing.of(train_images)
    with kind.session() as session:
        if timings is not None:
            session.timings = timings
        fitting = list_images(train, kind, session.report) if kind.trains else ImageInputs([])
        fitted = kind.fit(fitting, train.root, out / RUN_DIR, session)
        if kind.trains:
            kind.save(fitted, out / RUN_DIR, session)
        inputs = list_images(listing, kind, session.report)
        report = _predict_into(kind, fitted, inputs, session, out, listing.root)
        return _finish(kind, fitted, report)
