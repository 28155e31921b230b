"""FOUND's background threshold, scored on its pseudo-masks before any training.

For every image: the backbone's features at ``--size`` (short side), the border background seed
and each patch's cosine similarity to it (:mod:`unseg.methods.found`), then foreground =
similarity ≤ t for each rule: fixed thresholds, per-image rules (Otsu on a 64-bin histogram of
the image's similarities, their mean, a quantile) and the same on mean-centred features (``C``
rules). The 0/1 patch mask is upsampled (nearest) to the image, without refinement. ECSSD (the first
``--ecssd N`` images): mean IoU with the ground truth; VOC2007 (the first ``--voc N``): CorLoc
of the largest component's box. ``fg`` is the mean share called foreground. No labels are used
to make the masks. Prints JSON.

    python bench/found_threshold.py --ecssd 300 --voc 422
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _machine import machine
from PIL import Image

from unseg.backbones import create_backbone
from unseg.data.image import list_images, load_image
from unseg.data.resize import prepare_image
from unseg.data.voc import parse_voc_xml
from unseg.methods.found import background_seed, background_similarity
from unseg.metrics.corloc import is_correct, largest_component_box
from unseg.metrics.saliency import binarize_gt

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
Rule = Callable[[np.ndarray], float]


def otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values`` over a ``bins``-bin histogram (a bin centre)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def _constant(t: float, values: np.ndarray) -> float:
    return t


def _quantile(q: float, values: np.ndarray) -> float:
    return float(np.quantile(values, q))


def rules() -> dict[str, Rule]:
    """Rule name → threshold of an image's similarities ``[h·w]``; ``C…`` on centred features."""
    fixed: dict[str, Rule] = {f"fixed {t}": partial(_constant, t)
                              for t in (0.1, 0.15, 0.2, 0.25, 0.3)}
    out = dict(fixed)
    out.update({f"quantile {q} %": partial(_quantile, q / 100) for q in (25, 35, 45)})
    out["otsu"] = otsu
    out["mean"] = lambda s: float(s.mean())
    out.update({f"C {k}": v for k, v in fixed.items()})
    out.update({"C fixed 0.0": partial(_constant, 0.0), "C fixed 0.05": partial(_constant, 0.05),
                "C otsu": otsu})
    return out


@torch.inference_mode()
def similarities(backbone, path: Path, size: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """``((H, W), sim, centred sim)``: each patch's similarity ``[h, w]`` to the border seed, on
    the features and on the features minus their image mean (the same seed)."""
    image = load_image(path)
    feats = backbone.forward_features(prepare_image(image, size, backbone.stride)[None], "keys")
    seed = background_seed(feats)
    sim = background_similarity(feats, seed)[0].numpy()
    centred = background_similarity(feats - feats.mean(dim=(2, 3), keepdim=True), seed)[0]
    return image.shape[:2], sim, centred.numpy()


def upsampled(sim: np.ndarray, t: float, hw: tuple[int, int]) -> np.ndarray:
    """Foreground (``sim ≤ t``) ``[h, w]`` upsampled (nearest) to ``hw``: bool ``[H, W]``."""
    mask = Image.fromarray((sim <= t).astype(np.uint8) * 255)
    return np.asarray(mask.resize((hw[1], hw[0]), Image.NEAREST)) > 0


def score(backbone, paths: list[Path], size: int, truth: Callable[[Path, np.ndarray], float]
          ) -> dict[str, dict[str, float]]:
    """Per rule: the mean of ``truth(path, mask)`` and the mean foreground share."""
    table = rules()
    scores: dict[str, list[float]] = {r: [] for r in table}
    fg: dict[str, list[float]] = {r: [] for r in table}
    for path in paths:
        hw, sim, centred = similarities(backbone, path, size)
        for name, rule in table.items():
            values = centred if name.startswith("C ") else sim
            mask = upsampled(values, rule(values.ravel()), hw)
            scores[name].append(truth(path, mask))
            fg[name].append(float(mask.mean()))
    return {r: {"score": round(100 * float(np.mean(scores[r])), 2),
                "fg": round(100 * float(np.mean(fg[r])), 1)} for r in table}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--tap", default="s16+s32")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ecssd", type=int, default=300, help="first N ECSSD images (0: skip)")
    ap.add_argument("--voc", type=int, default=422, help="first N VOC2007 images (0: skip)")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: no shared data beside the repository; nothing to score")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backbone = create_backbone(args.backbone, tap=args.tap)
    result: dict = {"machine": machine(),
                    "backbone": args.backbone, "tap": args.tap, "size": args.size}
    if args.ecssd:
        gt_dir = DATA / "ECSSD" / "ground_truth_mask"

        def iou(path: Path, mask: np.ndarray) -> float:
            gt = binarize_gt(np.asarray(Image.open(gt_dir / f"{path.stem}.png").convert("L")))
            return float((mask & gt).sum() / max((mask | gt).sum(), 1))

        paths = list_images(DATA / "ECSSD" / "images")[: args.ecssd]
        result["ecssd_iou"] = {"images": len(paths),
                               "rules": score(backbone, paths, args.size, iou)}
    if args.voc:
        root = DATA / "VOC2007" / "VOCdevkit" / "VOC2007"

        def hit(path: Path, mask: np.ndarray) -> float:
            _, boxes, _ = parse_voc_xml(root / "Annotations" / f"{path.stem}.xml")
            return float(is_correct(largest_component_box(mask), boxes))

        paths = list_images(root / "JPEGImages")[: args.voc]
        result["voc07_corloc"] = {"images": len(paths),
                                  "rules": score(backbone, paths, args.size, hit)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
