"""Images a caller holds in memory (PIL images, ``H×W×3`` uint8 arrays) beside image files.

:func:`image_inputs` turns what a user hands :class:`unseg.Segmenter` — a folder, one file, or
a list of paths, PIL images and arrays — into the paths the pipeline works on plus the pixels
of the in-memory ones, each keyed by a stand-in path ``<image N>`` (``N``: its position in the
list). A PIL image is converted as :func:`unseg.data.image.load_image` converts a file (EXIF
orientation applied, every mode to RGB), so an image and the file it came from give the same
pixels. Bad entries are refused with an error naming their position and the problem.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from unseg.data.image import image_size, rgb_pixels
from unseg.data.inputs import too_small, unreadable
from unseg.errors import InputFileError, UnsegError


def pixels_sha256(pixels: np.ndarray) -> str:
    """sha256 of an in-memory image's shape and bytes (its identity in caches and seeds)."""
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def memory_path(index: int) -> Path:
    """The stand-in path of the ``index``-th image of a list when it is held in memory."""
    return Path(f"<image {index}>")


@dataclass
class ImageInputs:
    """What a caller's images are: ``paths`` in order (stand-ins for in-memory images), the
    pixels of those stand-ins (``arrays``), and the folder file names mirror (``names_root``:
    the folder given, else None)."""

    paths: list[Path]
    arrays: dict[Path, np.ndarray] = field(default_factory=dict)
    names_root: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)


def as_pixels(image: Any, where: str) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a PIL image or a uint8 array: ``H×W×3`` RGB, or ``H×W``
    (``H×W×1``) grey and ``H×W×4`` RGBA, converted as a grey or RGBA file is (alpha
    composited on white); ``where`` names the entry in errors."""
    if isinstance(image, Image.Image):
        try:  # a lazily opened file decodes here: its errors are not EXIF ones
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnsegError(f"{where}: corrupt or truncated image ({exc})") from None
        try:
            image = ImageOps.exif_transpose(image)
        except Exception as exc:  # malformed EXIF blocks raise many kinds of errors
            raise UnsegError(f"{where}: unreadable EXIF orientation ({exc})") from None
        return rgb_pixels(image)
    if not isinstance(image, np.ndarray):
        raise UnsegError(
            f"{where}: expected a path, a PIL image or an H×W×3 uint8 array, got "
            f"{type(image).__name__}"
        )
    channels = image.shape[2] if image.ndim == 3 else 1
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
        hint = (" (a float image in [0, 1]: (image * 255).round().astype(np.uint8))"
                if np.issubdtype(image.dtype, np.floating) else "")
        if image.ndim == 3 and channels not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
            hint += " (channels first, as torch has them? image.transpose(1, 2, 0))"
        raise UnsegError(
            f"{where}: expected an H×W×3 uint8 array (RGB; H×W grey and H×W×4 RGBA are taken "
            f"as their files are), got {image.dtype} of shape {tuple(image.shape)}{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UnsegError(f"{where}: empty image of shape {tuple(image.shape)}")
    if channels != 3:  # grey / RGBA: converted as a file of that mode is (alpha on white)
        return rgb_pixels(Image.fromarray(np.ascontiguousarray(
            image.reshape(image.shape[:2]) if channels == 1 else image)))
    return np.ascontiguousarray(image)


def image_inputs(images: Any, stride: int) -> ImageInputs:
    """The caller's ``images`` (a folder or file path, one PIL image or array, an array stack
    ``[N, H, W, C]``, or a list or tuple of paths, PIL images and arrays) as
    :class:`ImageInputs`. A folder is listed as the commands list it
    (:func:`unseg.data.datasets.resolve_inputs`: its usable images; refused ones are an error
    here). Raises :class:`UnsegError` naming the first bad entry."""
    from unseg.data.datasets import resolve_inputs
    from unseg.utils.batch import BatchReport

    if isinstance(images, (str, os.PathLike)):
        report = BatchReport()
        paths = resolve_inputs(images, report, stride)
        if report.failed:
            path, problem = report.failed[0]
            raise UnsegError(f"{path}: {problem}")
        root = Path(images)
        return ImageInputs(paths, names_root=root if root.is_dir() else None)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)  # a stack [N, H, W, C]: N images (was refused as one image)
    if isinstance(images, (Image.Image, np.ndarray)):  # one image, named "images" in errors
        if isinstance(images, np.ndarray):
            return _one_array(images, stride)
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (bytes, bytearray)):
        raise UnsegError(
            f"images: expected a folder, a file, or a list of paths, PIL images or arrays; got "
            f"{type(images).__name__}"
        )
    if not images:
        raise UnsegError("images: the list is empty")
    out = ImageInputs([])
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            problem = unreadable(path)
            if problem is None:  # its header, as a folder's files are checked
                try:
                    problem = too_small(*image_size(path, 0), stride)
                except InputFileError as exc:
                    problem = exc.problem
            if problem is not None:
                raise UnsegError(f"{path}: {problem}")
            out.paths.append(path)
            continue
        pixels = as_pixels(image, f"images[{i}]")
        problem = too_small(pixels.shape[0], pixels.shape[1], stride)
        if problem is not None:
            raise UnsegError(f"images[{i}]: {problem}")
        key = memory_path(i)
        out.paths.append(key)
        out.arrays[key] = pixels
    return out


def _one_array(image: np.ndarray, stride: int) -> ImageInputs:
    """One array given alone: as a list of it, its errors naming ``images`` (not
    ``images[0]``) and a 3-D array that is no image hinting at a stack."""
    try:
        return image_inputs([image], stride)
    except UnsegError as exc:
        message = str(exc).replace("images[0]: ", "images: ", 1)
        if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            message += ("; a stack of N grey images is [N, H, W, 1] (or a list of [H, W] "
                        "arrays), of colour ones [N, H, W, 3]")
        raise UnsegError(message) from None
