"""Class balance of predicted label maps: the share of pixels each class holds.

A class that a fitted model leaves (nearly) empty is invisible in pixel accuracy and costs its
whole IoU; the shares say so. ``nearly_empty`` flags classes holding under ``fraction`` of the
uniform share ``1/K`` (default a tenth: under 0.91 % of the pixels at K = 11, 0.48 % at K = 21).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from unseg.errors import UnsegError

logger = logging.getLogger(__name__)

NEARLY_EMPTY = 0.1  # a class is nearly empty under this fraction of the uniform share 1/K


def class_counts(labels: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """Pixels per class ``[K]`` (int64) over label maps ``[H, W]``; ids ``>= K`` are not counted."""
    if num_classes < 1:
        raise UnsegError(f"number of classes must be at least 1, got {num_classes}")
    counts = np.zeros(num_classes, dtype=np.int64)
    for lab in labels:
        ids = np.asarray(lab).reshape(-1).astype(np.int64)
        counts += np.bincount(ids[(ids >= 0) & (ids < num_classes)], minlength=num_classes)
    return counts


def read_labels(paths: Iterable[str | Path]) -> Iterable[np.ndarray]:
    """The label PNGs at ``paths`` as ``[H, W]`` arrays of class ids (palette indices), one at
    a time; a file that cannot be read is logged and left out, so one corrupt mask does not
    hide the balance of the others."""
    for path in paths:
        try:
            with Image.open(path) as im:
                yield np.asarray(im if im.mode in ("P", "L") else im.convert("L"))
        except (OSError, ValueError) as exc:
            logger.warning("class balance: skipping %s: %s", path, exc)


def class_shares(counts: np.ndarray) -> np.ndarray:
    """Shares ``[K]`` (float64, summing to 1; zeros when there are no pixels) of ``counts``."""
    total = int(counts.sum())
    return counts / total if total else np.zeros(len(counts), dtype=np.float64)


def nearly_empty(shares: np.ndarray, fraction: float = NEARLY_EMPTY) -> list[int]:
    """Classes whose share is under ``fraction / K``."""
    limit = fraction / len(shares)
    return [int(c) for c in np.flatnonzero(shares < limit)]


def balance_message(shares: np.ndarray, fraction: float = NEARLY_EMPTY) -> str | None:
    """One line naming the nearly empty classes with their shares, or None when there are none."""
    empty = nearly_empty(shares, fraction)
    if not empty:
        return None
    k = len(shares)
    listed = ", ".join(f"{c}: {100 * shares[c]:.2f} %" for c in empty)
    return (f"class balance: {len(empty)} of {k} classes hold under {100 * fraction / k:.2f} % "
            f"of the pixels each ({listed}); a nearly empty class is invisible in pixel accuracy "
            "and scores no IoU — fewer classes (-k) or another method may fit these images")


def shares_line(shares: np.ndarray) -> str:
    """Every class's share in one line: ``0: 41.2 %, 1: 3.1 %, ...``."""
    return ", ".join(f"{c}: {100 * s:.1f} %" for c, s in enumerate(shares))


def log_class_balance(paths: Iterable[str | Path], num_classes: int) -> np.ndarray:
    """Count the classes of the label PNGs at ``paths``; log every share (info, ``-v``) and the
    nearly empty classes (warning). Returns the shares ``[K]``."""
    shares = class_shares(class_counts(read_labels(paths), num_classes))
    logger.info("class shares of the predicted pixels: %s", shares_line(shares))
    message = balance_message(shares)
    if message:
        logger.warning(message)
    return shares
