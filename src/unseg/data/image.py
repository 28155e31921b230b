"""The one image loader: any common file → uint8 RGB ``[H, W, 3]``, or a clear error naming it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unseg.errors import InputFileError, UnsegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputFileError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputFileError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except UnidentifiedImageError:
        raise InputFileError(path, "not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputFileError(path, f"corrupt or truncated image ({exc})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputFileError(path, f"image too large ({exc})") from None
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255)
        return Image.fromarray(arr8.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> np.ndarray:
    """Load an image as uint8 RGB ``[H, W, 3]``, applying its EXIF orientation.

    Modes L, LA, P, RGBA, CMYK, I;16 and others are converted to RGB (transparency is composited
    on white). Missing, empty, truncated and non-image files raise :class:`InputFileError`.
    """
    path = Path(path)
    img = _open(path)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF blocks raise many kinds of errors
        raise InputFileError(path, f"unreadable EXIF orientation ({exc})") from None
    arr = np.asarray(_to_rgb(img), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputFileError(path, f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_label(path: str | Path) -> np.ndarray:
    """Load a label or mask PNG as its raw values ``[H, W]`` (palette indices for mode P).

    No EXIF rotation and no colour conversion: the stored values are the labels. RGB masks
    whose channels are equal are reduced to one channel; other multi-channel masks are an error.
    """
    path = Path(path)
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if img.mode in ("RGBA", "LA"):
            arr = arr[..., :-1]
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
            raise InputFileError(path, f"label image has {arr.shape[2]} different channels")
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``root`` (by extension, case-insensitive; hidden files skipped).

    ``root`` may also be a single image file. Raises :class:`UnsegError` if nothing is found.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UnsegError(f"{root}: no such file or folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UnsegError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files
