"""Object mask proposals from a folder of saliency maps (MaskContrast, methods.md §4).

Any folder of single-channel saliency PNGs named like the images (same stem; with
``names_root``, the image's path under that folder, as ``unseg discover`` mirrors sub-folders)
serves: ``unseg discover``'s masks (unsupervised variant) or an external saliency model's
(supervised variant).
Each map is scaled to ``[0, 1]`` (8-bit: ``/255``; a map whose values are only 0 and 1 is taken
as is), binarised at 0.5, its connected components (8-connected) under 1 % of the image are
removed, and the image is dropped when under 1 % stays salient. Problems are per file: an image
without a mask, a mask of another size, an RGB colour map instead of a mask, an unreadable file
are reported and skipped, never raised mid-way; only when *no* image is left does
:func:`load_mask_proposals` raise, saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from unseg.data.image import IMAGE_EXTENSIONS, image_size, load_label
from unseg.data.inputs import output_name
from unseg.errors import InputFileError, UnsegError
from unseg.utils.batch import BatchReport

logger = logging.getLogger(__name__)

COLOUR_MAP = "mask is an RGB colour map (its channels differ), not a single-channel saliency map"
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class ProposalReport(BatchReport):
    """:class:`BatchReport` plus the images dropped for a too small salient area."""

    dropped: list[tuple[Path, float]] = field(default_factory=list)
    kept: int = 0

    def summary(self) -> str:
        """One line: kept, dropped (small masks) and failed (bad files) counts."""
        return (
            f"{self.kept} image(s) with a mask proposal, {len(self.dropped)} dropped "
            f"(salient area under the minimum), {len(self.failed)} skipped (bad or missing mask)"
        )


@dataclass
class MaskProposals:
    """Kept images, in input order, with their binary masks ``[H, W]`` (bool, image size)."""

    paths: list[Path]
    masks: list[torch.Tensor]

    @property
    def areas(self) -> list[float]:
        """Salient share of each mask."""
        return [float(m.float().mean()) for m in self.masks]


def binarise(saliency: np.ndarray, threshold: float = 0.5, min_area: float = 0.01) -> np.ndarray:
    """Binary mask ``[H, W]`` (bool): saliency ``[H, W]`` above ``threshold`` with the
    8-connected components under ``min_area`` of the image removed.

    ``saliency``: uint8 (0-255, or 0/1 only), uint16 (0-65535), bool, or float in ``[0, 1]``.
    """
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be [H, W], got {saliency.shape}")
    if saliency.dtype == bool:
        values = saliency.astype(np.float32)
    elif np.issubdtype(saliency.dtype, np.integer):
        top = 1 if saliency.max(initial=0) <= 1 else np.iinfo(saliency.dtype).max
        values = saliency.astype(np.float32) / top
    else:
        values = saliency.astype(np.float32)
    fg = values > threshold
    labels, count = ndimage.label(fg, structure=_EIGHT_CONNECTED)
    if count == 0:
        return fg
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_area * fg.size
    keep[0] = False
    return keep[labels]


def _index_masks(mask_dir: Path, report: ProposalReport) -> dict[str, Path]:
    """Mask files of ``mask_dir`` (recursive) by path without extension (PNG preferred when a
    name has several files)."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(mask_dir.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.relative_to(mask_dir).with_suffix("").as_posix(), []).append(p)
    index = {}
    for stem, files in by_stem.items():
        pngs = [p for p in files if p.suffix.lower() == ".png"]
        if len(pngs) > 1 or (not pngs and len(files) > 1):
            report.fail(files[0], f"several mask files share the stem {stem!r}: {files}")
            continue
        index[stem] = pngs[0] if pngs else files[0]
    return index


def load_mask_proposals(
    images: Sequence[str | Path],
    mask_dir: str | Path,
    threshold: float = 0.5,
    min_area: float = 0.01,
    names_root: Path | None = None,
) -> tuple[MaskProposals, ProposalReport]:
    """Pair ``images`` with the masks of ``mask_dir`` by stem (by their path under
    ``names_root`` when given) and post-process them.

    Returns the kept images and masks and a :class:`ProposalReport` of the dropped (salient
    area under ``min_area`` after :func:`binarise`) and failed images. Raises
    :class:`UnsegError` only when the folder is missing or no image is left, with the reason
    (no mask matched, all masks empty, the folder holds RGB colour maps).
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise UnsegError(f"{mask_dir}: the saliency mask folder does not exist")
    report = ProposalReport()
    index = _index_masks(mask_dir, report)
    kept = MaskProposals(paths=[], masks=[])
    for image in map(Path, images):
        name = output_name(image, names_root) if names_root else Path(image.name)
        mask_path = index.get(name.with_suffix("").as_posix())
        if mask_path is None:
            report.fail(image, f"no saliency mask named {name.with_suffix('.png')} in {mask_dir}")
            continue
        try:
            size = image_size(image, 0)  # the header's; decoding checks the pixels
            raw = load_label(mask_path)
        except InputFileError as exc:
            problem = COLOUR_MAP if "different channels" in exc.problem else exc.problem
            report.fail(exc.path, problem)
            continue
        if raw.shape != size:
            report.fail(
                mask_path,
                f"mask is {raw.shape[0]}x{raw.shape[1]} (HxW) but its image {image.name} is "
                f"{size[0]}x{size[1]}",
            )
            continue
        _keep(image, raw, threshold, min_area, kept, report)
    report.kept = len(kept.paths)
    if not kept.paths:
        raise NoUsableMasks(_nothing_left(mask_dir, len(images), report, min_area))
    logger.info("%s", report.summary())
    return kept, report


def _keep(image: Path, raw: np.ndarray, threshold: float, min_area: float,
          kept: MaskProposals, report: ProposalReport) -> None:
    """Add ``image``'s binarised mask of ``raw [H, W]`` to ``kept``, or count it as dropped."""
    mask = binarise(raw, threshold, min_area)
    area = float(mask.mean())
    if area < min_area:
        logger.info("dropping %s: salient area %.4f under %.4f", image, area, min_area)
        report.dropped.append((image, area))
        return
    kept.paths.append(image)
    kept.masks.append(torch.from_numpy(mask))


def mask_proposals(
    images: Sequence[Path], masks: Sequence[np.ndarray], threshold: float = 0.5,
    min_area: float = 0.01,
) -> tuple[MaskProposals, ProposalReport]:
    """:func:`load_mask_proposals` of masks held in memory: ``masks[i]`` (8-bit ``[H, W]``, as
    ``unseg discover`` writes them) is the saliency of ``images[i]``."""
    report = ProposalReport()
    kept = MaskProposals(paths=[], masks=[])
    for image, raw in zip(images, masks, strict=True):
        _keep(image, raw, threshold, min_area, kept, report)
    report.kept = len(kept.paths)
    if not kept.paths:
        raise UnsegError(f"no usable saliency mask for any of the {len(images)} image(s): "
                         f"{report.summary()}")
    return kept, report


class NoUsableMasks(UnsegError):
    """No image of a mask folder kept a proposal (all empty, unreadable or colour maps)."""


def _nothing_left(mask_dir: Path, n: int, report: ProposalReport, min_area: float) -> str:
    """Why no image of ``n`` kept a mask proposal."""
    colour = [p for p, problem in report.failed if problem == COLOUR_MAP]
    if colour and len(colour) == len(report.failed) and not report.dropped:
        return (
            f"{mask_dir}: the masks are RGB colour maps ({len(colour)} file(s), e.g. "
            f"{colour[0].name}), not single-channel 8-bit saliency PNGs"
        )
    if report.dropped and len(report.dropped) == n:
        return (
            f"{mask_dir}: all {n} masks are empty (salient area under {min_area:.0%} after "
            "thresholding at 0.5 and removing small components)"
        )
    return f"{mask_dir}: no usable mask for any of the {n} image(s): {report.summary()}"
