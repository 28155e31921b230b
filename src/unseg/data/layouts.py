"""The official on-disk layouts of the evaluation datasets, and recognising a root by its folders.

A root is recognised by the sub-folders its official release contains (``images/`` +
``ground_truth_mask/`` for ECSSD, ``JPEGImages/`` + ``SegmentationClass/`` for PASCAL VOC, …),
never by the root folder's own name. For VOC, the ``VOCdevkit/`` folder or the folder above it
are accepted too when they hold exactly one ``VOC20xx`` folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

Task = Literal["saliency", "semantic", "boxes"]

IGNORE_INDEX = 255
EVAL_CROP = 320  # docs/evaluation.md: COCO-Stuff-27, Cityscapes-27, Potsdam-3 scored on 320x320


@dataclass(frozen=True)
class DatasetLayout:
    """Where images and ground truth live inside a dataset root (paths relative to ``root``).

    ``image_suffix``/``gt_suffix`` are the file-name endings after the shared stem (e.g.
    Cityscapes' ``_leftImg8bit.png`` / ``_gtFine_labelIds.png``); ``recursive`` means the files
    sit one folder deeper (Cityscapes' city folders). ``split_file`` lists the stems to use.
    ``markers`` are the sub-folders whose presence identifies the layout. ``eval_crop``: the
    semantic protocol scores labels resized (nearest) to this short side and centre-cropped to a
    square (STEGO's 320 for COCO-Stuff, Cityscapes, Potsdam); ``None``: full label resolution.
    ``root`` is set by :func:`find_layout`; the table holds it as ``None``.
    """

    name: str
    task: Task
    image_dir: str
    gt_dir: str
    image_suffix: str
    gt_suffix: str
    markers: tuple[str, ...]
    split_file: str | None = None
    num_classes: int | None = None
    ignore_index: int | None = None
    recursive: bool = False
    eval_crop: int | None = None
    root: Path | None = None

    @property
    def image_path(self) -> Path:
        """Absolute images folder (needs ``root``)."""
        return self._base() / self.image_dir

    @property
    def gt_path(self) -> Path:
        """Absolute ground-truth folder (needs ``root``)."""
        return self._base() / self.gt_dir

    @property
    def split_path(self) -> Path | None:
        """Absolute split file, or ``None`` when the layout has none."""
        return None if self.split_file is None else self._base() / self.split_file

    def _base(self) -> Path:
        if self.root is None:
            raise ValueError(f"layout {self.name!r} is not bound to a root; use find_layout()")
        return self.root


_VOC_SEG = dict(
    task="semantic",
    image_dir="JPEGImages",
    gt_dir="SegmentationClass",
    image_suffix=".jpg",
    gt_suffix=".png",
    markers=("JPEGImages", "SegmentationClass"),
    num_classes=21,
    ignore_index=IGNORE_INDEX,
)
_VOC_BOXES = dict(
    task="boxes",
    image_dir="JPEGImages",
    gt_dir="Annotations",
    image_suffix=".jpg",
    gt_suffix=".xml",
    markers=("JPEGImages", "Annotations"),
    split_file="ImageSets/Main/trainval.txt",
    num_classes=20,
)

LAYOUTS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout(
            "ECSSD", "saliency", "images", "ground_truth_mask", ".jpg", ".png",
            markers=("images", "ground_truth_mask"),
        ),
        DatasetLayout(
            "DUTS-TE", "saliency", "DUTS-TE-Image", "DUTS-TE-Mask", ".jpg", ".png",
            markers=("DUTS-TE-Image", "DUTS-TE-Mask"),
        ),
        DatasetLayout(
            "DUT-OMRON", "saliency", "DUT-OMRON-image", "pixelwiseGT-new-PNG", ".jpg", ".png",
            markers=("DUT-OMRON-image", "pixelwiseGT-new-PNG"),
        ),
        DatasetLayout("VOC2012", split_file="ImageSets/Segmentation/val.txt", **_VOC_SEG),
        DatasetLayout("VOC2007", split_file="ImageSets/Segmentation/trainval.txt", **_VOC_SEG),
        DatasetLayout("VOC2012-boxes", **_VOC_BOXES),
        DatasetLayout("VOC2007-boxes", **_VOC_BOXES),
        DatasetLayout(
            "COCO-Stuff-27", "semantic", "images/val2017", "annotations/val2017", ".jpg", ".png",
            markers=("images", "annotations", "curated"),
            split_file="curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
            num_classes=27, ignore_index=IGNORE_INDEX, eval_crop=EVAL_CROP,
        ),
        DatasetLayout(
            "Cityscapes-27", "semantic", "leftImg8bit/val", "gtFine/val",
            "_leftImg8bit.png", "_gtFine_labelIds.png",
            markers=("leftImg8bit", "gtFine"),
            num_classes=27, ignore_index=IGNORE_INDEX, recursive=True, eval_crop=EVAL_CROP,
        ),
        DatasetLayout(
            "Potsdam-3", "semantic", "imgs", "gt", ".mat", ".mat",
            markers=("imgs", "gt"), split_file="labelled_test.txt",
            num_classes=3, ignore_index=IGNORE_INDEX, eval_crop=EVAL_CROP,
        ),
    )
}

_VOC_YEAR = re.compile(r"^VOC(20\d\d)$")


def _has(root: Path, markers: tuple[str, ...]) -> bool:
    return all((root / m).is_dir() for m in markers)


def _voc_root(root: Path) -> Path | None:
    """``root`` itself, or the single ``VOC20xx`` inside ``root`` or ``root/VOCdevkit``."""
    if (root / "JPEGImages").is_dir():
        return root
    for devkit in (root, root / "VOCdevkit"):
        if not devkit.is_dir():
            continue
        years = [p for p in devkit.iterdir() if p.is_dir() and _VOC_YEAR.match(p.name)]
        if len(years) == 1 and (years[0] / "JPEGImages").is_dir():
            return years[0]
    return None


def _voc_layout(root: Path, task: Task | None) -> DatasetLayout | None:
    voc = _voc_root(root)
    if voc is None:
        return None
    if task in (None, "semantic") and _has(voc, _VOC_SEG["markers"]):
        suffix = ""
    elif task in (None, "boxes") and _has(voc, _VOC_BOXES["markers"]):
        suffix = "-boxes"
    else:
        return None
    # The year comes from the official VOCdevkit/VOC20xx folder when present; otherwise the
    # first year whose split file exists (VOC2012 first).
    match = _VOC_YEAR.match(voc.name)
    years = [match.group(1)] if match else ["2012", "2007"]
    candidates = [replace(LAYOUTS[f"VOC{y}{suffix}"], root=voc) for y in years]
    for layout in candidates:
        if layout.split_path is not None and layout.split_path.is_file():
            return layout
    return candidates[0]


def find_layout(root: str | Path, task: Task | None = None) -> DatasetLayout | None:
    """The official layout of the dataset at ``root`` (bound to its resolved root), or ``None``.

    ``task`` restricts the search (VOC holds both segmentation and boxes; ``None`` prefers
    segmentation). Recognition uses only the sub-folders inside ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    voc = _voc_layout(root, task)
    if voc is not None:
        return voc
    for layout in LAYOUTS.values():
        if layout.name.startswith("VOC") or (task is not None and layout.task != task):
            continue
        if _has(root, layout.markers):
            return replace(layout, root=root)
    return None


def resolve_image_dir(root: str | Path) -> Path:
    """The images folder of the dataset at ``root``; ``root`` itself for a plain folder or file."""
    layout = find_layout(root)
    if layout is None:
        return Path(root)
    return layout.image_path
