"""Datasets in their official layouts (see :mod:`unseg.data.layouts`), as indexable samples.

Every sample is a dict with ``"image"`` (uint8 ``[3, H, W]``), ``"path"`` and ``"stem"``, plus
``"label"`` (long ``[H, W]``, 255 = ignore) for semantic datasets, ``"mask"`` (bool ``[H, W]``,
ground truth ≥ 128) for saliency datasets, or ``"boxes"`` (float ``[N, 4]``, ``x0 y0 x1 y1``),
``"names"``, ``"difficult"``, ``"truncated"`` and ``"size"`` ``(H, W)`` for VOC boxes.
An optional ``transform`` maps each sample dict to a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.io import loadmat
from torch.utils.data import Dataset

from unseg.data.image import list_images, load_image, load_label
from unseg.data.layouts import IGNORE_INDEX, DatasetLayout, Task, find_layout
from unseg.data.voc import read_voc_annotation
from unseg.errors import InputFileError, ManyFilesError, UnsegError

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
COCOSTUFF27_CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff",
    "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building", "ground", "plant",
    "sky", "solid", "structural", "water",
)
# COCO-Stuff fine label (0..181 in the stuffthingmaps PNGs) → 27 coarse classes, as in STEGO.
COCOSTUFF_FINE_TO_27 = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12,
    17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21,
    24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21,
    24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18,
    18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
)
CITYSCAPES27_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_FIRST_ID = 7  # label ids 0..6 are void; 7..33 become classes 0..26 (STEGO)
POTSDAM3_CLASSES = ("roads and cars", "buildings and clutter", "trees and vegetation")
POTSDAM_FINE_TO_3 = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def _lut(mapping: dict[int, int] | Sequence[int], size: int = 256) -> np.ndarray:
    """A uint8 lookup table sending unmapped values to the ignore index."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    items = mapping.items() if isinstance(mapping, dict) else enumerate(mapping)
    for src, dst in items:
        lut[src] = dst
    return lut


_COCO_LUT = _lut(COCOSTUFF_FINE_TO_27)
_CITYSCAPES_LUT = _lut({i: i - CITYSCAPES_FIRST_ID for i in range(CITYSCAPES_FIRST_ID, 34)})
_POTSDAM_LUT = _lut(POTSDAM_FINE_TO_3)


def map_labels(raw: np.ndarray, lut: np.ndarray) -> torch.Tensor:
    """Raw label values ``[H, W]`` → long ``[H, W]`` through ``lut`` (out of range → ignore)."""
    raw = np.asarray(raw).astype(np.int64)
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out[inside] = lut[raw[inside]]
    return torch.from_numpy(out)


def _image_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def bind_layout(root: str | Path, task: Task, names: Sequence[str]) -> DatasetLayout:
    """The layout at ``root`` for ``task`` among ``names``; an error saying what was expected."""
    layout = find_layout(root, task)
    if layout is None or layout.name not in names:
        raise UnsegError(
            f"{root}: not a {' / '.join(names)} dataset root "
            f"(expected its official sub-folders, see docs/evaluation.md)"
        )
    return layout


def read_split(path: Path) -> list[str]:
    """Stems listed in a split file (first token per non-empty line)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputFileError(path, f"cannot read split file ({exc.strerror})") from None
    return [line.split()[0] for line in lines if line.strip()]


def layout_stems(layout: DatasetLayout, split_file: str | Path | None = None) -> list[str]:
    """Stems of the layout's samples: from ``split_file``, the layout's split file, or images.

    Cityscapes-style recursive layouts give stems like ``"frankfurt/frankfurt_000000_000294"``.
    """
    split = Path(split_file) if split_file is not None else layout.split_path
    if split is not None:
        if not split.is_file():
            raise InputFileError(split, f"split file of {layout.name} not found")
        return read_split(split)
    suffix = layout.image_suffix
    images = sorted(layout.image_path.glob(f"*/*{suffix}" if layout.recursive else f"*{suffix}"))
    if not images:
        raise UnsegError(f"{layout.image_path}: no images (*{suffix})")
    return [str(p.relative_to(layout.image_path))[: -len(suffix)] for p in images]


def layout_pairs(
    layout: DatasetLayout, split_file: str | Path | None = None
) -> list[tuple[str, Path, Path]]:
    """``(stem, image path, ground-truth path)`` for each sample; missing files are an error."""
    img, gt = layout.image_path, layout.gt_path
    pairs = [
        (s, img / f"{s}{layout.image_suffix}", gt / f"{s}{layout.gt_suffix}")
        for s in layout_stems(layout, split_file)
    ]
    for kind, col in (("missing images", 1), ("missing ground truth", 2)):
        missing = [p[col] for p in pairs if not p[col].is_file()]
        if missing:
            raise ManyFilesError(f"{layout.name}: {kind}", missing)
    return pairs


def dataset_images(root: str | Path) -> list[Path]:
    """Image files of ``root``: a dataset's split (or images folder), or any folder's images."""
    layout = find_layout(root)
    if layout is None:
        return list_images(root)
    if layout.image_suffix == ".mat":
        raise UnsegError(f"{root}: {layout.name} images are .mat tiles; use Potsdam3 to read them")
    if layout.split_path is not None and layout.split_path.is_file():
        return [p for _, p, _ in layout_pairs(layout)]
    return list_images(layout.image_path, recursive=layout.recursive)


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive): samples with ``"image"``, ``"path"``, ``"stem"``."""

    def __init__(
        self, root: str | Path, recursive: bool = True, transform: Transform | None = None
    ) -> None:
        self.root = Path(root)
        self.paths = list_images(self.root, recursive=recursive)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        path = self.paths[i]
        sample = {"image": _image_tensor(load_image(path)), "path": path, "stem": path.stem}
        return self.transform(sample) if self.transform else sample


class _PairedDataset(Dataset):
    """Image + ground-truth pairs of one layout; subclasses turn the GT file into fields."""

    task: Task
    names: tuple[str, ...]

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.layout = bind_layout(root, self.task, self.names)
        self.pairs = layout_pairs(self.layout, split_file)
        self.transform = transform

    @property
    def paths(self) -> list[Path]:
        """Image paths, in sample order."""
        return [p for _, p, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Sample:
        stem, image_path, gt_path = self.pairs[i]
        image = self._image(image_path)
        sample = {"image": image, "path": image_path, "stem": stem, **self._target(gt_path)}
        self._check_size(sample, image_path, gt_path)
        return self.transform(sample) if self.transform else sample

    def _image(self, path: Path) -> torch.Tensor:
        return _image_tensor(load_image(path))

    def _target(self, path: Path) -> Sample:
        raise NotImplementedError

    def _check_size(self, sample: Sample, image_path: Path, gt_path: Path) -> None:
        gt = sample.get("label", sample.get("mask"))
        if gt is not None and tuple(gt.shape) != tuple(sample["image"].shape[1:]):
            raise InputFileError(
                gt_path,
                f"ground truth {tuple(gt.shape)} does not match image {image_path.name} "
                f"{tuple(sample['image'].shape[1:])}",
            )


class SaliencyDataset(_PairedDataset):
    """ECSSD, DUTS-TE or DUT-OMRON: ``"mask"`` is the ground truth binarised at 128."""

    task = "saliency"
    names = ("ECSSD", "DUTS-TE", "DUT-OMRON")

    def _target(self, path: Path) -> Sample:
        return {"mask": torch.from_numpy(load_label(path) >= 128)}


class VOCSegmentation(_PairedDataset):
    """PASCAL VOC segmentation: 21 classes (0 = background), 255 = ignore (object borders)."""

    task = "semantic"
    names = ("VOC2012", "VOC2007")
    classes = VOC_CLASSES

    def _target(self, path: Path) -> Sample:
        return {"label": torch.from_numpy(load_label(path).astype(np.int64))}


class VOCBoxes(_PairedDataset):
    """PASCAL VOC boxes (``ImageSets/Main`` split): every object, difficult/truncated included."""

    task = "boxes"
    names = ("VOC2012-boxes", "VOC2007-boxes")

    def _target(self, path: Path) -> Sample:
        ann = read_voc_annotation(path)
        boxes = torch.tensor([o.box for o in ann.objects], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": boxes,
            "names": [o.name for o in ann.objects],
            "difficult": torch.tensor([o.difficult for o in ann.objects], dtype=torch.bool),
            "truncated": torch.tensor([o.truncated for o in ann.objects], dtype=torch.bool),
            "size": ann.size,
        }

    def _check_size(self, sample: Sample, image_path: Path, gt_path: Path) -> None:
        if tuple(sample["size"]) != tuple(sample["image"].shape[1:]):
            raise InputFileError(
                gt_path, f"<size> {sample['size']} differs from image {image_path.name}"
            )


class COCOStuff27(_PairedDataset):
    """COCO-Stuff-27, STEGO's curated val list; fine labels (0..181, 255) mapped to 27 classes."""

    task = "semantic"
    names = ("COCO-Stuff-27",)
    classes = COCOSTUFF27_CLASSES

    def _target(self, path: Path) -> Sample:
        return {"label": map_labels(load_label(path), _COCO_LUT)}


class Cityscapes27(_PairedDataset):
    """Cityscapes val, ``*_labelIds.png`` ids 7..33 → 27 classes; void ids → ignore (STEGO)."""

    task = "semantic"
    names = ("Cityscapes-27",)
    classes = CITYSCAPES27_CLASSES

    def _target(self, path: Path) -> Sample:
        return {"label": map_labels(load_label(path), _CITYSCAPES_LUT)}


def _load_mat(path: Path, key: str) -> np.ndarray:
    try:
        data = loadmat(path)
    except (OSError, ValueError, TypeError) as exc:
        raise InputFileError(path, f"not a readable .mat file ({exc})") from None
    if key not in data:
        raise InputFileError(path, f".mat file has no {key!r} array")
    return np.asarray(data[key])


class Potsdam3(_PairedDataset):
    """Potsdam-3 (STEGO's .mat tiles, ``labelled_test.txt``): RGB of ``img``, ``gt`` → 3 classes."""

    task = "semantic"
    names = ("Potsdam-3",)
    classes = POTSDAM3_CLASSES

    def _image(self, path: Path) -> torch.Tensor:
        img = _load_mat(path, "img")
        if img.ndim != 3 or img.shape[2] < 3:
            raise InputFileError(path, f"'img' has shape {img.shape}, expected [H, W, >=3]")
        rgb = img[..., :3]
        if rgb.dtype != np.uint8:
            rgb = rgb.astype(np.float64)
            rgb = rgb * 255.0 if rgb.max() <= 1.0 else rgb
            rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
        return _image_tensor(rgb)

    def _target(self, path: Path) -> Sample:
        return {"label": map_labels(_load_mat(path, "gt"), _POTSDAM_LUT)}
