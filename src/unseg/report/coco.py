"""COCO-style results JSON with RLE masks, from the label or saliency PNGs of a run.

The file is a list in COCO's results format (what ``COCO.loadRes`` and ``pycocotools.mask.decode``
read), one entry per image and cluster (semantic: every label present in the PNG except the
ignore value 255) or per image and object (saliency: the foreground ``v >= 128``, as the boxes;
an empty mask gives no entry)::

    {"image_id": 1, "file_name": "sub/name.png", "category_id": 3,
     "segmentation": {"size": [H, W], "counts": "..."}, "area": 1234,
     "bbox": [x, y, w, h], "score": 1.0}

``image_id`` numbers the masks 1.. in sorted order and ``file_name`` names the mask (relative to
the masks folder) so the ids can be mapped to images; ``category_id`` is the cluster id as stored
in the PNG (semantic) or 1 (saliency); ``score`` is 1 for labels and the mean foreground
probability inside the mask for saliency. RLE is COCO's: runs over the mask in column-major order,
starting with a run of zeros, written as COCO's compressed counts string (``rleToString``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from unseg.data.image import load_label, max_pixels_default
from unseg.outdir import recorded_max_pixels
from unseg.report.outputs import RunOutputs, find_outputs
from unseg.utils.io import atomic_write

COCO_FILE = "coco_results.json"
IGNORE_LABEL = 255
OBJECT_CATEGORY = 1


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask ``[H, W]`` in column-major order, the first run counting
    zeros (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def counts_string(counts: list[int]) -> str:
    """COCO's compressed counts string: each count (minus the one two before it, from the
    fourth on) in 5-bit groups, least significant first, a continuation bit 0x20, plus 48."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE ``{"size": [H, W], "counts": str}`` of a binary mask ``[H, W]``."""
    h, w = np.shape(mask)
    return {"size": [int(h), int(w)], "counts": counts_string(rle_counts(mask))}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """``[x, y, w, h]`` of the set pixels of a binary mask ``[H, W]`` (COCO's ``toBbox``;
    zeros when empty)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def _entry(image_id: int, name: str, category: int, mask: np.ndarray, score: float) -> dict:
    return {
        "image_id": image_id,
        "file_name": name,
        "category_id": category,
        "segmentation": encode_rle(mask),
        "area": int(np.count_nonzero(mask)),
        "bbox": mask_bbox(mask),
        "score": score,
    }


def coco_results(outputs: RunOutputs) -> list[dict[str, Any]]:
    """The COCO results entries of every mask of ``outputs`` (see the module docstring)."""
    results: list[dict[str, Any]] = []
    for image_id, path in enumerate(outputs.masks, start=1):
        name = path.relative_to(outputs.masks_dir).as_posix() if outputs.masks_dir else path.name
        values = load_label(path)
        if outputs.kind == "semantic":
            for label in np.unique(values):
                if int(label) != IGNORE_LABEL:
                    results.append(_entry(image_id, name, int(label), values == label, 1.0))
        else:
            fg = values >= 128
            if fg.any():
                score = float(values[fg].astype(np.float64).mean() / 255.0)
                results.append(_entry(image_id, name, OBJECT_CATEGORY, fg, round(score, 6)))
    return results


def write_coco(
    output_dir: str | Path, out: str | Path | None = None, max_pixels: int | None = None
) -> Path:
    """Write the COCO results JSON of a run or output folder; returns its path (default
    ``OUTPUT_DIR/coco_results.json``). Written atomically. ``max_pixels``: the per-file pixel
    limit (default: the ``--max-pixels`` the folder's run was given, else Pillow's)."""
    outputs = find_outputs(output_dir)
    if max_pixels is None:
        max_pixels = recorded_max_pixels(outputs.output_dir)
    with max_pixels_default(max_pixels):
        text = json.dumps(coco_results(outputs), separators=(",", ":")) + "\n"
    target = Path(out) if out is not None else outputs.output_dir / COCO_FILE
    atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))
    return target
