"""The fast guided filter against the exact one on fitted VOC runs: same models, same logits.

Reads the run folders and feature caches that ``bench/semantic_results.py`` leaves in ``--work``
(its ``<set>/<method>-s<seed>-none/run`` and ``<set>/cache/features``), predicts every image's
logits once, refines them with none / the exact guided filter / the fast one (subsample 2),
and prints JSON: Hungarian mIoU and Acc over the set for each (ground truth at full size, 255
ignored), the guided filter's ms per image at each subsample, and the machine.

Usage: python bench/guided_fast.py [--work out/semantic-results]
       [--runs VOC2012/primaps-em-cosine-s0-none VOC2012/kmeans-s0-none ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine

from unseg.data.image import load_label
from unseg.feature_store import load_cache
from unseg.metrics.semantic import ConfusionMatrix, semantic_scores
from unseg.pipelines.label_maps import PredictSettings, class_logits
from unseg.pipelines.pseudo_labels import hwc
from unseg.refine.semantic import RefineConfig, refine_logits
from unseg.runs import load_fitted

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RUNS = ("VOC2012/primaps-em-cosine-s0-none", "VOC2012/kmeans-s0-none",
        "VOC2007/primaps-em-cosine-s0-none")
MODES = {"none": RefineConfig("none"), "exact": RefineConfig("guided", subsample=1),
         "fast2": RefineConfig("guided", subsample=2)}


def score_run(work: Path, name: str) -> dict:
    """mIoU/Acc (%) per mode and guided ms/image of one fitted run."""
    dataset = name.split("/")[0]
    labels = DATA / dataset / "VOCdevkit" / dataset / "SegmentationClass"
    cache = next((work / dataset / "cache" / "features").iterdir())
    _, estimator, meta = load_fitted(work / name / "run", "semantic", torch.device("cpu"))
    feats = load_cache(cache)
    settings = PredictSettings(**meta["predict"])
    confusion = {m: ConfusionMatrix(int(meta["num_classes"])) for m in MODES}
    seconds = dict.fromkeys(MODES, 0.0)
    for path in feats.paths:
        gt = load_label(labels / f"{path.stem}.png")
        logits = class_logits(estimator, feats, path, settings, torch.device("cpu"))
        image = hwc(feats.extra(path, "image"))
        for mode, cfg in MODES.items():
            start = time.perf_counter()
            probs = refine_logits(logits, image, cfg)
            seconds[mode] += time.perf_counter() - start
            up = F.interpolate(probs[None], size=gt.shape, mode="bilinear", align_corners=False)
            confusion[mode].update(up[0].argmax(0).numpy(), gt)
    out: dict = {"images": len(feats.paths)}
    for mode, cm in confusion.items():
        s = semantic_scores(cm)
        out[mode] = {"miou": round(100 * s.miou, 2), "acc": round(100 * s.acc, 2),
                     "ms_per_image": round(1000 * seconds[mode] / len(feats.paths), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "out" / "semantic-results"))
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    args = parser.parse_args()
    work = Path(args.work)
    if not DATA.is_dir() or not work.is_dir():
        sys.exit(f"skipped: needs {DATA} and the runs of bench/semantic_results.py in {work}")
    torch.set_num_threads(1)
    results = {name: score_run(work, name) for name in args.runs}
    print(json.dumps({
        "benchmark": "fast (subsample 2) vs exact guided refinement, same models and logits",
        "runs": results,
        "machine": machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
