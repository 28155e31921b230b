"""Benchmark `unseg evaluate`: seconds for all 1000 ECSSD masks and the 217-image VOC2012 subset.

Predictions are generated once into a temporary folder (perturbed ground truth: soft 8-bit
saliency maps, at full and at half resolution so the bilinear-resize path is timed too; a noisy
relabelling of the VOC labels), then each pipeline call is timed end to end (file reading
included) and the metric alone on arrays already in memory. Prints JSON.

Usage: python bench/metrics.py [--data ../shared/data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from _machine import machine

from unseg.data.image import load_label
from unseg.data.voc import parse_voc_xml
from unseg.metrics.saliency import SaliencyMeter
from unseg.metrics.semantic import ConfusionMatrix, semantic_scores
from unseg.pipelines.evaluate import evaluate_corloc, evaluate_saliency, evaluate_semantic
from unseg.utils.io import save_png_atomic

REPO = Path(__file__).resolve().parents[1]


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _soft(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = cv2.GaussianBlur((gt >= 128).astype(np.float64) * 255, (0, 0), 4.0)
    p = np.roll(p, int(rng.integers(-10, 10)), axis=1) + rng.normal(0, 20, gt.shape)
    return np.clip(np.round(p), 0, 255).astype(np.uint8)


def _timing(seconds: float, n: int) -> dict[str, float]:
    return {"seconds": round(seconds, 4), "ms_per_image": round(1000 * seconds / n, 3)}


def bench_saliency(root: Path, tmp: Path, repeat: int) -> dict:
    masks = sorted((root / "ground_truth_mask").glob("*.png"))
    rng = np.random.default_rng(0)
    full, half = tmp / "sal_full", tmp / "sal_half"
    gts, preds = [], []
    for path in masks:
        gt = load_label(path)
        pred = _soft(gt, rng)
        save_png_atomic(full / path.name, pred)
        h, w = gt.shape
        save_png_atomic(half / path.name, cv2.resize(pred, (w // 2, h // 2),
                                                      interpolation=cv2.INTER_AREA))
        gts.append(gt)
        preds.append(pred)

    def metric_only() -> float:
        meter = SaliencyMeter()
        for p, g in zip(preds, gts, strict=True):
            meter.update(p, g)
        return meter.scores().max_fbeta

    t_full, r_full = _best(lambda: evaluate_saliency(full, root), repeat)
    t_half, r_half = _best(lambda: evaluate_saliency(half, root), repeat)
    t_metric, _ = _best(metric_only, repeat)
    n = len(masks)
    return {
        "n_images": n,
        "pipeline_full_resolution": {**_timing(t_full, n), "max_fbeta": r_full.max_fbeta},
        "pipeline_half_resolution_bilinear": {**_timing(t_half, n), "max_fbeta": r_half.max_fbeta},
        "metric_only_in_memory": _timing(t_metric, n),
    }


def bench_semantic(root: Path, tmp: Path, repeat: int) -> dict:
    labels = sorted((root / "SegmentationClass").glob("*.png"))
    rng = np.random.default_rng(0)
    perm = rng.permutation(21)
    pred_dir = tmp / "sem"
    gts, preds = [], []
    for path in labels:
        gt = load_label(path)
        pred = perm[np.minimum(gt, 20)].astype(np.uint8)
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, 21, int(noise.sum()))
        save_png_atomic(pred_dir / path.name, pred)
        gts.append(gt)
        preds.append(pred)

    def metric_only() -> float:
        conf = ConfusionMatrix(21)
        for p, g in zip(preds, gts, strict=True):
            conf.update(p, g)
        return semantic_scores(conf).miou

    out: dict = {"n_images": len(labels), "num_classes": 21}
    for match in ("pixels", "iou"):
        t, r = _best(lambda m=match: evaluate_semantic(pred_dir, root, 21, match=m), repeat)
        out[f"pipeline_match_{match}"] = {**_timing(t, len(labels)), "miou": r.miou}
    out["metric_only_in_memory"] = _timing(_best(metric_only, repeat)[0], len(labels))
    return out


def bench_corloc(root: Path, tmp: Path, repeat: int) -> dict:
    xmls = sorted((root / "Annotations").glob("*.xml"))
    boxes = {p.stem: parse_voc_xml(p)[1][0] for p in xmls}
    (tmp / "boxes.json").write_text(json.dumps(boxes))
    t, r = _best(lambda: evaluate_corloc(tmp / "boxes.json", root), repeat)
    return {"n_images": len(xmls), "boxes_json": {**_timing(t, len(xmls)), "corloc": r.corloc}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed runs")
    args = parser.parse_args()
    data = Path(args.data)
    result: dict = {
        "benchmark": "metrics",
        "machine": {**machine(), "numpy": np.__version__},
        "target_ms_per_image": 10,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        todo = [
            ("saliency_ecssd", "ECSSD", bench_saliency),
            ("semantic_voc2012", "VOC2012/VOCdevkit/VOC2012", bench_semantic),
            ("corloc_voc2007", "VOC2007/VOCdevkit/VOC2007", bench_corloc),
        ]
        for key, sub, fn in todo:
            root = data / sub
            if not root.is_dir():
                result[key] = {"skipped": f"{root} is absent"}
                continue
            result[key] = fn(root, tmp_path, args.repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
