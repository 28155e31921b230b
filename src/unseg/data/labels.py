"""The datasets' class names and their raw-label → class-id tables (the one label table).

COCO-Stuff's 182 fine labels and Cityscapes' label ids map to 27 classes as in STEGO; Potsdam's
6 to 3. Unmapped values become the ignore index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from unseg.data.layouts import IGNORE_INDEX

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


_LUTS = {
    "COCO-Stuff-27": _lut(COCOSTUFF_FINE_TO_27),
    "Cityscapes-27": _lut({i: i - CITYSCAPES_FIRST_ID for i in range(CITYSCAPES_FIRST_ID, 34)}),
    "Potsdam-3": _lut(POTSDAM_FINE_TO_3),
}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "VOC2012": VOC_CLASSES,
    "VOC2007": VOC_CLASSES,
    "COCO-Stuff-27": COCOSTUFF27_CLASSES,
    "Cityscapes-27": CITYSCAPES27_CLASSES,
    "Potsdam-3": POTSDAM3_CLASSES,
}


def label_lut(dataset: str | None) -> np.ndarray | None:
    """Raw ground-truth value → class id table (uint8 ``[256]``, unmapped → ignore) of the
    datasets whose files hold raw ids (COCO-Stuff, Cityscapes, Potsdam), else ``None``."""
    return _LUTS.get(dataset or "")


def map_labels(raw: np.ndarray, lut: np.ndarray) -> torch.Tensor:
    """Raw label values ``[H, W]`` → long ``[H, W]`` through ``lut`` (out of range → ignore)."""
    raw = np.asarray(raw).astype(np.int64)
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.int64)
    inside = (raw >= 0) & (raw < len(lut))
    out[inside] = lut[raw[inside]]
    return torch.from_numpy(out)
