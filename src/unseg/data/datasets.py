"""Datasets in their official layouts (see :mod:`unseg.data.layouts`), as indexable samples.

Every sample is a dict with ``"image"`` (uint8 ``[3, H, W]``), ``"path"`` and ``"stem"``, plus
``"label"`` (long ``[H, W]``, 255 = ignore) for semantic datasets, ``"mask"`` (bool ``[H, W]``,
ground truth ≥ 128) for saliency datasets, or ``"boxes"`` (float ``[N, 4]``, ``x0 y0 x1 y1``),
``"names"``, ``"difficult"``, ``"truncated"`` and ``"size"`` ``(H, W)`` for VOC boxes.
An optional ``transform`` maps each sample dict to a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unseg.data.image import IMAGE_EXTENSIONS, image_size, list_images, load_image, load_label
from unseg.data.inputs import output_name, same_name, too_small, unreadable
from unseg.data.labels import (
    CITYSCAPES27_CLASSES,
    COCOSTUFF27_CLASSES,
    POTSDAM3_CLASSES,
    VOC_CLASSES,
    label_lut,
    map_labels,
)
from unseg.data.layouts import DatasetLayout, Task, find_layout, resolve_image_dir
from unseg.data.mat import mat_label, mat_rgb
from unseg.data.voc import read_voc_annotation
from unseg.errors import InputFileError, ManyFilesError, UnsegError
from unseg.utils.batch import BatchReport

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]

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
    """Image files of ``root``: a dataset's split (or images folder), or any folder's images.

    Potsdam-3's images are ``.mat`` tiles (:mod:`unseg.data.mat`): its split's, or every
    ``imgs/*.mat`` when the split file is absent or its ``imgs`` folder is given (as a VOC
    root's ``JPEGImages`` gives every photo); a plain folder's ``.mat`` files are not images
    and stay ignored.
    """
    layout = find_layout(root)
    if layout is None:
        return image_files(root)
    if layout.split_path is not None and layout.split_path.is_file():
        return [p for _, p, _ in layout_pairs(layout)]
    return image_files(layout.image_path, layout)


def _tiles_layout(folder: Path) -> DatasetLayout | None:
    """The layout whose images folder ``folder`` is, when its images are not image files
    (Potsdam-3's ``imgs/*.mat``); else None."""
    try:
        layout = find_layout(folder.parent) if folder.is_dir() else None
    except OSError:  # a parent folder that cannot be listed holds no dataset we can read
        return None
    if layout is None or layout.image_suffix.lower() in IMAGE_EXTENSIONS:
        return None
    return layout if layout.image_path.resolve() == folder.resolve() else None


def image_files(folder: str | Path, layout: DatasetLayout | None = None) -> list[Path]:
    """The images of ``folder`` as :func:`~unseg.data.image.list_images` lists them, or the
    tiles (``*.mat``), sorted, of the images folder of a dataset stored as tiles: ``layout``'s,
    or Potsdam-3's ``imgs`` found from the folder above when it holds no image files (a photo
    folder named ``imgs`` beside a ``gt`` folder keeps its photos)."""
    folder = Path(folder)
    if layout is None:
        try:
            return list_images(folder)
        except UnsegError:
            tiles = _tiles_layout(folder)  # looked for only where no image is found
            if tiles is None:
                raise
        layout = tiles
    if layout.image_suffix.lower() in IMAGE_EXTENSIONS:
        return list_images(folder, recursive=layout.recursive)
    suffix = layout.image_suffix
    pattern = f"*/*{suffix}" if layout.recursive else f"*{suffix}"
    files = sorted(p for p in folder.glob(pattern)
                   if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    if not files:
        raise UnsegError(f"{folder}: no {layout.name} images found (looked for *{suffix})")
    return files


class ImageListing:
    """The images of ``root`` (:func:`dataset_images`) for a command whose stages take them
    several times (discovery's training and prediction, then the method chained after it):
    the folder is walked and each file checked once, and each header is read at most once,
    whatever ``stride`` each stage asks with (:meth:`usable`). Lazy: nothing is read before the
    first :meth:`usable`. Functions taking ``str | Path | ImageListing`` reuse a listing given
    (:meth:`of`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = root
        self._files: list[tuple[Path, str | None]] | None = None  # (path, why unreadable)
        self._sizes: dict[Path, tuple[int, int] | str] = {}  # (H, W), or why not read

    @cached_property
    def names_root(self) -> Path:
        """The folder the images' mask names are taken under (:func:`resolve_image_dir`)."""
        return resolve_image_dir(self.root)

    @classmethod
    def of(cls, images: str | Path | ImageListing) -> ImageListing:
        """``images`` itself when it is a listing, else a new listing of it."""
        return images if isinstance(images, ImageListing) else cls(images)

    def usable(self, report: BatchReport, stride: int | None = None) -> list[Path]:
        """The usable images, in order; the others are recorded in ``report`` with the rules of
        :mod:`unseg.data.inputs` (see :func:`resolve_inputs`). Raises
        :func:`no_usable_images`'s error when none is left."""
        if self._files is None:
            self._files = [(path, unreadable(path)) for path in dataset_images(self.root)]
        first: dict[Path, Path] = {}
        usable = []
        for path, problem in self._files:
            name = output_name(path, self.names_root)
            if problem is None and name in first:
                problem = same_name(name, first[name])
            if problem is None and stride is not None:
                problem = self._too_small(path, stride)
            if problem is None:
                first[name] = path
                usable.append(path)
            else:
                report.fail(path, problem)
        if not usable:
            raise no_usable_images(self.root, report)
        return usable

    def _too_small(self, path: Path, stride: int) -> str | None:
        """Why ``path`` is refused at ``stride`` (its header read once: its size or why not)."""
        if path not in self._sizes:
            try:
                self._sizes[path] = image_size(path, 0)
            except InputFileError as exc:
                self._sizes[path] = exc.problem
        size = self._sizes[path]
        return size if isinstance(size, str) else too_small(*size, stride)


def resolve_inputs(
    root: str | Path | ImageListing, report: BatchReport, stride: int | None = None
) -> list[Path]:
    """The usable images of ``root`` (see :func:`dataset_images`; a listing: its own), in
    order; the others are recorded in ``report`` with the rules of :mod:`unseg.data.inputs`:
    unreadable files (broken or looping links, permission, empty), a second input with the same
    mask name, and, when the backbone's ``stride`` is given, files whose header Pillow cannot
    read and images smaller than one patch. Every command lists its inputs here. Raises
    :func:`no_usable_images`'s error when none is left.
    """
    return ImageListing.of(root).usable(report, stride)


def no_usable_images(root: str | Path, report: BatchReport, limit: int = 10) -> UnsegError:
    """The error of a command none of whose inputs could be used: each input with its problem
    (the first ``limit``)."""
    shown = "; ".join(f"{p}: {m}" for p, m in report.failed[:limit])
    more = f" (and {len(report.failed) - limit} more)" if len(report.failed) > limit else ""
    return UnsegError(f"{root}: no image could be used: {shown}{more}")


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
        return {"label": map_labels(load_label(path), label_lut("COCO-Stuff-27"))}


class Cityscapes27(_PairedDataset):
    """Cityscapes val, ``*_labelIds.png`` ids 7..33 → 27 classes; void ids → ignore (STEGO)."""

    task = "semantic"
    names = ("Cityscapes-27",)
    classes = CITYSCAPES27_CLASSES

    def _target(self, path: Path) -> Sample:
        return {"label": map_labels(load_label(path), label_lut("Cityscapes-27"))}


class Potsdam3(_PairedDataset):
    """Potsdam-3 (STEGO's .mat tiles, ``labelled_test.txt``): the RGB of ``img`` (its first three
    channels, :func:`~unseg.data.mat.mat_rgb`), ``gt``'s fine classes → 3 classes."""

    task = "semantic"
    names = ("Potsdam-3",)
    classes = POTSDAM3_CLASSES

    def _image(self, path: Path) -> torch.Tensor:
        return _image_tensor(mat_rgb(path))

    def _target(self, path: Path) -> Sample:
        return {"label": map_labels(mat_label(path), label_lut("Potsdam-3"))}
