"""`segment` on a CUDA device: seconds per stage beside `features`, and the dense CRF alone.

Runs in this process, each into a fresh folder: ``features`` twice (the better one counts),
``segment`` with each method (PriMaPs-EM and k-means, default settings, ``device="cuda"``),
then the torch dense CRF alone on the same images at the features' resolution (K = 21 smooth
random logits; all images in one batch, and one at a time), timed with CUDA synchronisation,
beside the backbone's seconds per image. Prints JSON. Exits 2 when no CUDA device is visible.
``--device cpu`` runs the same steps on the CPU (a dry run of the script: ``--max-images 4``).
Each method's own floor, the scores and issue 19's targets on a GPU: ``python bench/pipeline.py
--device cuda``.

Usage: python bench/device.py [--images ../shared/data/VOC2012] [--max-images N] [-k 21]
                              [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _machine import machine
from _scratch import scratch_folder

from unseg.backbones import create_backbone
from unseg.data.datasets import dataset_images
from unseg.features import extract_features
from unseg.pipelines.backbone import resolve_backbone_name
from unseg.pipelines.folder import segment
from unseg.pipelines.kind import Settings
from unseg.refine.crf import crf_marginals
from unseg.utils.timing import Timings

REPO = Path(__file__).resolve().parents[1]
VOC2012 = REPO.parent / "shared" / "data" / "VOC2012"


DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _features(paths: list[Path], out: Path, backbone: str) -> tuple[dict[str, Any], Any]:
    timings = Timings()
    _sync()
    start = time.perf_counter()
    model = create_backbone(backbone, device=DEVICE)
    feats = extract_features(paths, model, cache_dir=out, timings=timings, extras=("image",))
    _sync()
    return {"seconds": round(time.perf_counter() - start, 3), "stages": timings.as_dict()}, feats


def _crf_alone(images: list[torch.Tensor], k: int) -> dict[str, float]:
    """Seconds of the torch CRF on the device: the batch at once, then image by image."""
    unaries = []
    gen = torch.Generator().manual_seed(0)
    for img in images:
        h, w = img.shape[:2]
        noise = torch.randn(1, k, max(1, h // 8), max(1, w // 8), generator=gen)
        logits = F.interpolate(F.avg_pool2d(noise, 5, 1, 2) * 12, size=(h, w), mode="bilinear")
        unaries.append((-torch.log_softmax(logits[0], 0)).to(DEVICE))
    crf_marginals(images[:1], unaries[:1])  # warm-up
    _sync()
    start = time.perf_counter()
    crf_marginals(images, unaries)
    _sync()
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for img, un in zip(images, unaries, strict=True):
        crf_marginals([img], [un])
    _sync()
    single = time.perf_counter() - start
    return {"batched_seconds": round(batched, 3), "one_at_a_time_seconds": round(single, 3),
            "per_image_batched": round(batched / len(images), 4),
            "per_image_one_at_a_time": round(single / len(images), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(VOC2012), help="dataset root or image folder")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--num-classes", "-k", type=int, default=21)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu (a dry run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench/device.py: no CUDA device visible to torch", file=sys.stderr)
        return 2
    backbone = resolve_backbone_name(args.backbone)
    paths = dataset_images(Path(args.images))[: args.max_images]
    with scratch_folder(None, "unseg-bench-device-") as work:
        folder = work / "images"
        folder.mkdir()
        for p in paths:
            (folder / p.name).symlink_to(p.resolve())
        first, _ = _features(paths, work / "features-1", backbone)
        second, feats = _features(paths, work / "features-2", backbone)
        floor = min(first, second, key=lambda r: r["seconds"])
        runs: dict[str, Any] = {}
        for method in ("primaps-em", "kmeans"):
            out = work / method
            _sync()
            start = time.perf_counter()
            segment(folder, out, method, args.num_classes,
                    settings=Settings(backbone=backbone, device=str(DEVICE)))
            _sync()
            seconds = time.perf_counter() - start
            meta = json.loads((out / "run" / "config.json").read_text())
            runs[f"segment {method}"] = {"seconds": round(seconds, 3), "stages": meta["timings"],
                                         "over_features": round(seconds / floor["seconds"], 2)}
        images = [feats.extra(p, "image").to(DEVICE).permute(1, 2, 0).contiguous() for p in paths]
        crf = _crf_alone(images, args.num_classes)
        backbone_s = floor["stages"].get("backbone", floor["seconds"])
        crf["per_image_over_backbone_per_image"] = round(
            crf["per_image_batched"] / (backbone_s / len(paths)), 3)
    print(json.dumps({
        "benchmark": f"segment on {DEVICE}: seconds per stage beside features",
        "images": {"from": args.images, "count": len(paths)},
        "backbone": backbone,
        "features": floor,
        "runs": runs,
        "crf_alone_k21": crf,
        "machine": machine(DEVICE),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
