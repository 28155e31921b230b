"""The one image loader: any common file → uint8 RGB ``[H, W, 3]``, or a clear error naming it.

Pillow's decompression-bomb guard becomes unseg's own per-file limit (``max_pixels``: None =
Pillow's default :data:`DEFAULT_MAX_PIXELS`, 0 = no limit), reported as an
:class:`InputFileError` that names the option to pass; no Pillow warning reaches stderr.
:func:`max_pixels_default` sets what ``None`` stands for within a block: ``report`` and
``evaluate`` use it to apply the limit an output folder's run was given.
A file of several frames (animated GIF, WebP or PNG, multi-page TIFF) is read as its first frame,
as other image tools do, with a warning naming the file and its frame count (once per process).
A ``.mat`` file is read as a Potsdam tile (:mod:`unseg.data.mat`: the RGB of its ``"img"``, the
labels of its ``"gt"``); only a Potsdam root lists such files (:func:`list_images` does not).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unseg.data.inputs import unreadable
from unseg.data.mat import is_mat, mat_label, mat_rgb, mat_size
from unseg.errors import InputFileError, UnsegError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"
)
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's bomb limit
_EXIF_ORIENTATION = 0x0112
_PILLOW_GUARD = threading.Lock()
_NOTED_FRAMES: set[Path] = set()  # multi-frame files already warned about in this process
_NOTED_LOCK = threading.Lock()
_MAX_PIXELS_DEFAULT: ContextVar[int | None] = ContextVar("unseg_max_pixels", default=None)

logger = logging.getLogger(__name__)


@contextmanager
def _without_pillow_guard() -> Iterator[None]:
    """Pillow's own bomb check off (unseg checks the size itself), restored afterwards."""
    with _PILLOW_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def max_pixels_default(max_pixels: int | None) -> Iterator[None]:
    """Within the block, ``max_pixels=None`` stands for ``max_pixels`` (None: Pillow's default,
    0: no limit) in this thread."""
    token = _MAX_PIXELS_DEFAULT.set(max_pixels)
    try:
        yield
    finally:
        _MAX_PIXELS_DEFAULT.reset(token)


def pixel_limit(max_pixels: int | None) -> int | None:
    """The pixel limit ``max_pixels`` stands for: None → the :func:`max_pixels_default` of the
    block, else Pillow's default; 0 → no limit."""
    if max_pixels is None:
        max_pixels = _MAX_PIXELS_DEFAULT.get()
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if max_pixels < 0:
        raise UnsegError(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    return max_pixels or None


def _check_pixels(path: Path, img: Image.Image, max_pixels: int | None) -> None:
    try:
        _check_size(path, *img.size, max_pixels)
    except InputFileError:
        img.close()
        raise


def _check_size(path: Path, w: int, h: int, max_pixels: int | None) -> None:
    limit = pixel_limit(max_pixels)
    if limit is not None and w * h > limit:
        raise InputFileError(
            path,
            f"image too large: {w}x{h} = {w * h} pixels ({w * h / 1e6:.1f} MP) is over the "
            f"limit of {limit} pixels that guards against decompression bombs; if the file is "
            f"trusted, pass --max-pixels {w * h} or more (0: no limit)",
        )


def _open(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Open ``path`` lazily (header read, pixels not decoded), its size within the limit."""
    problem = unreadable(path)
    if problem is not None:
        raise InputFileError(path, problem)
    try:
        with _without_pillow_guard():
            img = Image.open(path)
    except PermissionError:
        raise InputFileError(path, "permission denied (cannot read the file)") from None
    except UnidentifiedImageError:
        raise InputFileError(path, "not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputFileError(path, f"corrupt or truncated image ({exc})") from None
    _check_pixels(path, img, max_pixels)
    return img


def _decode(path: Path, img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image; broken data raises :class:`InputFileError`."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputFileError(path, f"corrupt or truncated image ({exc})") from None
    return img


def _note_frames(path: Path, img: Image.Image) -> None:
    """Warn (once per file and process) that only the first of several frames is used."""
    try:
        frames = getattr(img, "n_frames", 1)
    except (OSError, EOFError, SyntaxError, ValueError):  # a broken file fails when decoded
        return
    if frames <= 1:
        return
    with _NOTED_LOCK:
        if path in _NOTED_FRAMES:
            return
        _NOTED_FRAMES.add(path)
    kind = "animated GIF" if img.format == "GIF" else f"{img.format or 'image'} file"
    logger.warning("%s: %s (%d frames): the first frame is used", path, kind, frames)


def _oriented(img: Image.Image) -> bool:
    """True when the EXIF orientation swaps the stored width and height (5 to 8)."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # malformed EXIF blocks raise many kinds of errors
        return False


def image_size(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of ``path`` after EXIF orientation, from its header (no decoding).

    Raises :class:`InputFileError` as :func:`load_image` does for missing, unreadable,
    non-image and too large files, and warns of several frames as it does: the extraction reads
    each header here in the main process before its data-loader workers start, so the workers
    (which inherit what was noted) and later reads do not warn again.
    """
    path = Path(path)
    if is_mat(path):
        h, w = mat_size(path)
        _check_size(path, w, h, max_pixels)
        return h, w
    with _open(path, max_pixels) as img:
        _note_frames(path, img)
        w, h = img.size
        return (w, h) if _oriented(img) else (h, w)


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


def load_image(
    path: str | Path,
    max_pixels: int | None = None,
    min_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Load an image as uint8 RGB ``[H, W, 3]``, applying its EXIF orientation.

    Modes L, LA, P, RGBA, CMYK, I;16 and others are converted to RGB (transparency is composited
    on white); of several frames (an animated GIF) the first is used, with a warning. Missing,
    empty, unreadable, truncated, non-image and too large files (more than
    ``max_pixels``, see :func:`pixel_limit`) raise :class:`InputFileError`. ``min_size``
    ``(H, W)``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as the
    result is at least that large, which cuts the memory of big photos by up to 64x.
    A ``.mat`` tile gives its first three channels (:func:`unseg.data.mat.mat_rgb`).
    """
    path = Path(path)
    if is_mat(path):
        image_size(path, max_pixels)  # the pixel limit, from the header before the data
        return mat_rgb(path)
    img = _open(path, max_pixels)
    _note_frames(path, img)
    if min_size is not None and img.format == "JPEG":
        h, w = min_size
        img.draft(None, (h, w) if _oriented(img) else (w, h))
    img = _decode(path, img)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF blocks raise many kinds of errors
        raise InputFileError(path, f"unreadable EXIF orientation ({exc})") from None
    arr = rgb_pixels(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputFileError(path, f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a decoded image of any mode (see :func:`load_image`)."""
    return np.ascontiguousarray(np.asarray(_to_rgb(img), dtype=np.uint8))


def load_label(path: str | Path) -> np.ndarray:
    """Load a label or mask PNG as its raw values ``[H, W]`` (palette indices for mode P).

    No EXIF rotation and no colour conversion: the stored values are the labels. RGB masks
    whose channels are equal are reduced to one channel; other multi-channel masks are an error.
    A ``.mat`` file gives its ``"gt"`` (:func:`unseg.data.mat.mat_label`, Potsdam's raw ids).
    """
    path = Path(path)
    if is_mat(path):
        return mat_label(path)
    img = _decode(path, _open(path))
    arr = np.asarray(img)
    if arr.ndim == 3:
        alpha = img.mode in ("RGBA", "LA")
        one = label_channel(arr, alpha)
        if one is None:
            raise InputFileError(path, f"label image has {arr.shape[2] - alpha} different "
                                 "channels")
        arr = one
    return np.ascontiguousarray(arr)


def label_channel(arr: np.ndarray, alpha: bool) -> np.ndarray | None:
    """The values ``[H, W]`` of a label image's channels ``[H, W, C]``: the last one dropped
    when it is ``alpha``, the others equal (a grey image stored as RGB); None when they
    differ (a colour-coded label image, which holds no class ids)."""
    if alpha:
        arr = arr[..., :-1]
    if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[2])):
        return None
    return arr[..., 0]


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``root`` (by extension, case-insensitive; hidden files skipped).

    Symbolic links named like images are listed even when they lead nowhere (broken, or a loop),
    so that the commands report them (:func:`unseg.data.inputs.unreadable`); linked folders are
    not entered. ``root`` may also be a single image file. Raises :class:`UnsegError` if nothing
    is found.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if root.is_symlink() and not root.exists():  # a broken link or a loop: name its problem
        raise UnsegError(f"{root}: {unreadable(root)}")
    if not root.is_dir():
        raise UnsegError(f"{root}: no such file or folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p
        for p in root.glob(pattern)
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UnsegError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files
