"""Potsdam-3's ``.mat`` tiles as STEGO released them (its ``src/data.py``, class ``Potsdam``,
after IIC's ``potsdam.py``): ``imgs/<id>.mat`` holds ``"img"``, uint8 ``[H, W, 4]`` (RGB then
near-infrared, channels last), and ``gt/<id>.mat`` holds ``"gt"``, int32 ``[H, W]`` with the six
fine classes 0..5 (255 where unlabelled). STEGO reads the image as its first three channels
(``permute(2, 0, 1)[:3]``); so does :func:`mat_rgb`.

Only MATLAB v4/v5 files are read (scipy's :func:`~scipy.io.loadmat`, what STEGO uses); a file
that is not one, lacks the array or holds another shape raises :class:`InputFileError` naming
the file and what was expected. :mod:`unseg.data.image` sends ``.mat`` paths here, so every
reader of images and labels takes the tiles; only a Potsdam root lists them
(:func:`unseg.data.datasets.dataset_images`), a plain folder's ``.mat`` files stay ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unseg.data.inputs import unreadable
from unseg.errors import InputFileError

MAT_SUFFIX = ".mat"
IMAGE_KEY = "img"
LABEL_KEY = "gt"
_TILE = "STEGO's Potsdam tile"


def is_mat(path: str | Path) -> bool:
    """True for a ``.mat`` file name (any case)."""
    return Path(path).suffix.lower() == MAT_SUFFIX


def _check_bytes(path: Path) -> None:
    problem = unreadable(path)
    if problem is not None:
        raise InputFileError(path, problem)


def _unreadable_mat(path: Path, exc: Exception) -> InputFileError:
    if isinstance(exc, NotImplementedError):  # scipy's answer to an HDF5-based file
        return InputFileError(path, "MATLAB v7.3 (HDF5) .mat file: only v4/v5 .mat files are "
                              f"read (as {_TILE}s are stored)")
    if isinstance(exc, PermissionError):
        return InputFileError(path, "permission denied (cannot read the file)")
    detail = str(exc) or type(exc).__name__
    return InputFileError(path, f"not a readable .mat file, corrupt or truncated ({detail})")


def read_mat(path: str | Path, key: str) -> np.ndarray:
    """The array ``key`` of the ``.mat`` file ``path``; :class:`InputFileError` when the file
    cannot be read as a MATLAB v4/v5 file or has no such array (the message lists its arrays)."""
    from scipy.io import loadmat

    path = Path(path)
    _check_bytes(path)
    try:
        data = loadmat(path, variable_names=[key])
    except Exception as exc:  # scipy's parser raises many kinds on malformed files
        raise _unreadable_mat(path, exc) from None
    if key not in data:
        raise InputFileError(path, f"no {key!r} array in the .mat file ({_holds(path)}); "
                             f"expected {_TILE}")
    return np.asarray(data[key])


def _holds(path: Path) -> str:
    from scipy.io import whosmat

    try:
        names = [name for name, _, _ in whosmat(path)]
    except Exception:  # listed for the message only
        return "its arrays cannot be listed"
    return f"it holds {', '.join(repr(n) for n in names)}" if names else "it holds no arrays"


def _image_shape_problem(shape: tuple[int, ...]) -> str | None:
    channels_first = len(shape) == 3 and shape[0] in (3, 4) and shape[2] > 4
    if len(shape) == 3 and shape[2] >= 3 and shape[0] > 0 and shape[1] > 0 and not channels_first:
        return None
    hint = " (it looks channels-first)" if channels_first else ""
    return (f"{IMAGE_KEY!r} has shape {tuple(shape)}{hint}, expected [H, W, C] with C >= 3 "
            f"(RGB first, as in {_TILE}s)")


def mat_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of the tile's ``"img"`` from the file's header (its data is not read)."""
    from scipy.io import whosmat

    path = Path(path)
    _check_bytes(path)
    try:
        arrays = {name: shape for name, shape, _ in whosmat(path)}
    except Exception as exc:  # scipy's parser raises many kinds on malformed files
        raise _unreadable_mat(path, exc) from None
    if IMAGE_KEY not in arrays:
        raise InputFileError(path, f"no {IMAGE_KEY!r} array in the .mat file ({_holds(path)}); "
                             f"expected {_TILE}")
    shape = tuple(arrays[IMAGE_KEY])
    problem = _image_shape_problem(shape)
    if problem is not None:
        raise InputFileError(path, problem)
    return int(shape[0]), int(shape[1])


def mat_rgb(path: str | Path) -> np.ndarray:
    """The tile's RGB, uint8 ``[H, W, 3]``: the first three channels of ``"img"`` (the fourth,
    near-infrared, is dropped as STEGO does). uint8 is taken as it is; other integers must lie in
    0..255; floats in [0, 1] are scaled by 255 (as ``to_pil_image`` takes them), other floats
    must lie in 0..255 (rounded)."""
    path = Path(path)
    img = read_mat(path, IMAGE_KEY)
    problem = _image_shape_problem(img.shape)
    if problem is not None:
        raise InputFileError(path, problem)
    rgb = img[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if rgb.dtype.kind not in "biuf":
        raise InputFileError(path, f"{IMAGE_KEY!r} holds {rgb.dtype} values, not pixels")
    values = rgb.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputFileError(path, f"{IMAGE_KEY!r} holds NaN or infinite values")
    if rgb.dtype.kind == "f" and values.max() <= 1.0:
        values = values * 255.0
    low, high = values.min(), values.max()
    if low < 0 or high > 255:
        raise InputFileError(path, f"{IMAGE_KEY!r} values {low:g}..{high:g} ({rgb.dtype}) do "
                             "not fit 0..255 (8-bit RGB)")
    return np.round(values).astype(np.uint8)


def mat_label(path: str | Path) -> np.ndarray:
    """The tile's raw labels ``"gt"``, ``[H, W]`` integers (int64; a trailing axis of one is
    dropped)."""
    path = Path(path)
    gt = read_mat(path, LABEL_KEY)
    if gt.ndim == 3 and gt.shape[2] == 1:
        gt = gt[..., 0]
    if gt.ndim != 2 or 0 in gt.shape:
        raise InputFileError(path, f"{LABEL_KEY!r} has shape {gt.shape}, expected [H, W] "
                             f"(as in {_TILE}s)")
    if gt.dtype.kind in "biu":
        return gt.astype(np.int64)
    if gt.dtype.kind == "f" and np.isfinite(gt).all() and (gt == np.round(gt)).all():
        return gt.astype(np.int64)
    raise InputFileError(path, f"{LABEL_KEY!r} holds {gt.dtype} values that are not class ids")
