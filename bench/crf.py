"""The torch dense CRF against ``pydensecrf2`` (the reference): agreement and speed, in one run.

Images: the first ``--max-images`` VOC2012 images at the pipelines' resolution (the features'
320 short side; decoded and cached by `extract_features` under ``--cache``). Two cases, the
two ways the pipelines call the CRF:

- ``voc21``: K = 21 with realistic probabilities (smooth random logits: Gaussian noise at 1/8
  of the image size, box-smoothed, scaled to a peaked softmax; seeded);
- ``primaps``: the PriMaPs pseudo-label case, the proposals' log-probabilities of the default
  backbone's features, upsampled to the image as `pseudo_labels_one` does.

Per case: mean absolute difference of the marginals and identical-argmax fraction (torch with
every label, and with the default ``label_floor``), and seconds per image on the same 2 cores:
pydensecrf2 in 2 single-threaded worker processes (the former pool), torch on CRFPool's 2
threads (one torch thread each, as the pipelines run it) with every label and with the
default floor, and torch one image at a time on 2 intra-op threads; all interleaved
``--repeats`` times, the best of each. Prints JSON.

Usage: python bench/crf.py [--images ../shared/data/VOC2012] [--max-images 16] [--glibc-defaults]
       [--cache DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _machine import add_allocator_option, keep_memory_as_the_command, machine
from _scratch import scratch_folder

from unseg.backbones import create_backbone
from unseg.data.datasets import dataset_images
from unseg.features import extract_features
from unseg.pipelines.backbone import resolve_backbone_name
from unseg.pipelines.pseudo_labels import hwc
from unseg.proposals.primaps import PriMaPsConfig, principal_masks, proposal_log_probs
from unseg.refine.crf import (
    CRFConfig,
    CRFPool,
    clear_kernel_cache,
    dense_crf,
    dense_crf_reference,
)

REPO = Path(__file__).resolve().parents[1]
VOC2012 = REPO.parent / "shared" / "data" / "VOC2012"
THREADS = 2
# variant -> (label floor, on CRFPool's threads); the floor is ignored for pydensecrf2
VARIANTS = {
    "pydensecrf2_2_processes": (0.0, False),
    "torch_pool_all_labels": (0.0, True),
    "torch_pool_default": (CRFConfig().label_floor, True),
    "torch_intraop_default": (CRFConfig().label_floor, False),
}


def smooth_logits(shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """``[k, H, W]`` smooth random logits: noise at 1/8 size, box-smoothed, scaled by 12."""
    gen = torch.Generator().manual_seed(seed)
    h, w = max(1, shape[0] // 8), max(1, shape[1] // 8)
    noise = torch.randn(1, k, h, w, generator=gen)
    return F.avg_pool2d(noise, 5, 1, 2, count_include_pad=False)[0] * 12.0


Cases = list[tuple[np.ndarray, torch.Tensor]]


def _reference_worker(args: tuple[np.ndarray, torch.Tensor]) -> np.ndarray:
    torch.set_num_threads(1)
    return dense_crf_reference(*args)


def _timed_reference(pool: Any, cases: Cases) -> tuple[float, list]:
    start = time.perf_counter()
    out = pool.map(_reference_worker, cases, chunksize=1)
    return time.perf_counter() - start, out


def _timed_torch(cases: Cases, config: CRFConfig, pooled: bool) -> tuple[float, list]:
    """Torch on 2 cores: 2 threads of :class:`CRFPool` (one torch thread each, the pipelines'
    way), or one image at a time on 2 intra-op threads. Each run starts with no Gaussian
    kernel kept from an earlier run: it builds one per image size, as a folder's first pass."""
    clear_kernel_cache()
    start = time.perf_counter()
    if pooled:
        with CRFPool(THREADS, config) as pool:
            out = pool.map([img for img, _ in cases], [lg for _, lg in cases])
    else:
        out = [dense_crf(img, lg, config) for img, lg in cases]
    return time.perf_counter() - start, out


def _agreement(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, float]:
    mad = np.mean([np.abs(a - b).mean() for a, b in zip(ours, ref, strict=True)])
    same = sum(int((a.argmax(0) == b.argmax(0)).sum()) for a, b in zip(ours, ref, strict=True))
    total = sum(b[0].size for b in ref)
    return {"mean_abs_diff": float(f"{mad:.3g}"), "argmax_identical": round(same / total, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(VOC2012))
    parser.add_argument("--max-images", type=int, default=16)
    parser.add_argument("--cache", default=None, help="feature cache (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=2)
    add_allocator_option(parser)
    args = parser.parse_args()
    kept = keep_memory_as_the_command(args)
    torch.set_num_threads(THREADS)
    paths = dataset_images(Path(args.images))[: args.max_images]
    with scratch_folder(args.cache, "unseg-bench-crf-") as cache:  # read while the cases are built
        backbone = resolve_backbone_name(None)
        feats = extract_features(paths, create_backbone(backbone, device="cpu"), cache_dir=cache,
                                 extras=("image",))
        images = [hwc(feats.extra(p, "image")) for p in paths]
        cases: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {"voc21": [], "primaps": []}
        for i, (p, img) in enumerate(zip(paths, images, strict=True)):
            cases["voc21"].append((img, smooth_logits(img.shape[:2], 21, i)))
            cfg = PriMaPsConfig()
            log_probs = proposal_log_probs(principal_masks(feats[p], cfg).masks, cfg)
            up = F.interpolate(log_probs[None], size=img.shape[:2], mode="bilinear",
                               align_corners=False)[0]
            cases["primaps"].append((img, up))

    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(THREADS) as pool:
        pool.map(_reference_worker, cases["voc21"][:THREADS], chunksize=1)  # warm the workers
        dense_crf(*cases["voc21"][0])  # and torch
        for name, items in cases.items():
            runs: dict[str, list[float]] = {k: [] for k in VARIANTS}
            outs: dict[str, list[np.ndarray]] = {}
            for _ in range(args.repeats):
                for variant, (floor, pooled) in VARIANTS.items():
                    if variant == "pydensecrf2_2_processes":
                        seconds, outs[variant] = _timed_reference(pool, items)
                    else:
                        seconds, outs[variant] = _timed_torch(
                            items, CRFConfig(label_floor=floor), pooled)
                    runs[variant].append(round(seconds, 2))
            n = len(items)
            ref = outs["pydensecrf2_2_processes"]
            best = {k: min(v) for k, v in runs.items()}
            result[name] = {
                "labels": sorted({int(lg.shape[0]) for _, lg in items}),
                "agreement_all_labels": _agreement(outs["torch_pool_all_labels"], ref),
                "agreement_default": _agreement(outs["torch_pool_default"], ref),
                "seconds_per_image": {k: round(v / n, 3) for k, v in best.items()},
                "pydensecrf2_over_torch": {
                    k: round(best["pydensecrf2_2_processes"] / v, 2)
                    for k, v in best.items() if k != "pydensecrf2_2_processes"
                },
                "runs_seconds": runs,
            }
    print(json.dumps({
        "benchmark": "torch dense CRF vs pydensecrf2, 2 cores each",
        "images": {"from": args.images, "count": len(paths),
                   "sizes": sorted({img.shape[:2] for img in images})[:3]},
        "default_label_floor": CRFConfig().label_floor,
        "cases": result,
        "allocator_keeps_freed_memory": kept,
        "machine": {**machine(), "load_average_before": [round(v, 2) for v in load_before]},
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
