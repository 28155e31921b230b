"""Cost of the Boosting tricks: the guided filter next to the backbone, and head training.

Default: milliseconds of ``refine_masks`` (standardise, guided filter, restore; mean-RGB guide,
ε = 1e-3) on one 320x320 mask and on one full-size ECSSD image, for radii 2, 9 and 32, beside one
``dino_vits8`` forward at 320x320 (random weights) in the same process. Median of ``--repeats``
runs after one warm-up.

``--training``: head-training throughput on the first ``--n`` ECSSD images (320x320 centre crops,
``efficientnet_lite0`` features of tap ``--tap`` (default ``s16+s32``, stride 16) with its
packaged weights) for the SEMPART-style head and the
FOUND-style head, without multi-scale and with multi-scale crops from each crop mode of
:mod:`unseg.methods.crop_cache` (``cache``: a pool of ``--pool`` crops per image through the
backbone once; ``roi``: RoI-align of the full map; ``backbone``: the backbone on every crop at
every step). After a warm-up fit, each setting is fitted for 1 and for 3 epochs with the
library's own ``fit``; half the difference is one epoch (images/s = n / its seconds), the rest
of the 1-epoch fit is the one-off setup (crop cache, FOUND's pseudo-masks, polarity and collapse
checks). Also how far RoI-aligned crop features are
from the backbone's own features of the crops (cosine per cell, agreement of the τ = 0.4
affinity graph), and the extrapolated minutes for ``--epochs`` epochs over ``--target-images``
images (1,422 = ECSSD + VOC2007 here).

Why ``cache`` is the default crop mode: it gives the backbone's exact crop features (float16) at
``1 + pool`` backbone passes per image for the whole training, whereas ``roi`` is free but its
features of a half-side crop are an upsampled 10x10 piece of the 20x20 map (on ECSSD with
``efficientnet_lite0`` ``s16+s32``: cosine 0.58 to the real crop features on average, 69 % of
the crop's affinity graph the same), and ``backbone`` pays a backbone pass per image at every
step.

    .venv/bin/python bench/boosting.py [--threads 1]
    .venv/bin/python bench/boosting.py --training [--n 32] [--threads 2]
        [--heads sempart] [--variants base]

Prints JSON (with the machine and its load average). On a busy shared CPU, several torch threads
per process make the filter's many small ops wait on the scheduler; ``--threads 1`` measures the
arithmetic cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine

from unseg.backbones import build_backbone, create_backbone
from unseg.data.image import load_image
from unseg.data.resize import prepare_image
from unseg.methods.base import FitInputs
from unseg.methods.crop_cache import crop_images, roi_crop_features
from unseg.methods.found import FoundConfig, FoundHead
from unseg.methods.multiscale import sample_crops
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig
from unseg.refine.guided_filter import GuidedFilterConfig, refine_masks
from unseg.utils.device import resolve_device

ECSSD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ECSSD" / "images"
RADII = (2, 9, 32)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _full_size_image() -> tuple[np.ndarray, str]:
    files = sorted(ECSSD.glob("*.jpg"))
    if files:
        return load_image(files[0]), str(files[0].name)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), "synthetic 400x300"


VARIANTS = ("base", "multiscale_cache", "multiscale_roi", "multiscale_backbone")


def _training_set(
    n: int, dev: torch.device, tap: str
) -> tuple[Any, torch.Tensor, torch.Tensor, float]:
    """The backbone, keys ``[n, C, h, w]`` (float16), uint8 crops ``[n, 3, 320, 320]`` and the
    backbone's seconds per image."""
    files = sorted(ECSSD.glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} ECSSD images under {ECSSD}; found {len(files)}")
    model = create_backbone("efficientnet_lite0", device=dev, tap=tap)
    images = torch.stack([
        (prepare_image(load_image(p), 320, model.stride, crop=True) * 255).round().to(torch.uint8)
        for p in files
    ])
    t0 = time.perf_counter()
    with torch.inference_mode():
        feats = torch.cat([
            model.forward_features(images[i : i + 8].to(dev).float() / 255, "keys").cpu()
            for i in range(0, n, 8)
        ])
    return model, feats.half(), images, (time.perf_counter() - t0) / n


def _fit_seconds(head: Any, inputs: FitInputs, feature_fn: Callable) -> float:
    head.feature_fn = feature_fn
    t0 = time.perf_counter()
    head.fit(inputs)
    return time.perf_counter() - t0


def _roi_fidelity(feats: torch.Tensor, images: torch.Tensor, feature_fn: Callable) -> dict:
    """RoI-aligned crop features against the backbone's features of the same crops."""
    boxes = sample_crops(feats.shape[0], (0.5, 0.5), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        true = torch.cat([
            feature_fn(crop_images(images[i : i + 8], boxes[i : i + 8])).cpu().float()
            for i in range(0, feats.shape[0], 8)
        ])
    roi = roi_crop_features(feats.float(), boxes)

    def graph(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.flatten(2), dim=1)
        return x.transpose(1, 2) @ x > 0.4

    cos = F.cosine_similarity(true, roi, dim=1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_p10": float(cos.flatten().quantile(0.1)),
        "affinity_tau0.4_agreement": float((graph(true) == graph(roi)).float().mean()),
    }


def training(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """The ``--training`` benchmark (see the module docstring)."""
    load_start = list(os.getloadavg())
    model, feats, images, backbone_s = _training_set(args.n, dev, args.tap)
    inputs = FitInputs(list(feats), list(images))

    def feature_fn(x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x.to(dev), "keys")

    n, bs = args.n, args.batch_size
    heads: dict[str, Callable[[int, dict], Any]] = {
        "sempart": lambda e, kw: SaliencyHead(
            SaliencyHeadConfig(epochs=e, batch_size=bs, **kw), dev
        ),
        "found": lambda e, kw: FoundHead(
            FoundConfig(steps=e * -(-n // bs), batch_size=bs, **kw), dev
        ),
    }
    variants = {
        "base": {},
        "multiscale_cache": {"multiscale": True, "crop_mode": "cache", "crop_pool": args.pool},
        "multiscale_roi": {"multiscale": True, "crop_mode": "roi"},
        "multiscale_backbone": {"multiscale": True, "crop_mode": "backbone"},
    }
    heads = {k: v for k, v in heads.items() if k in args.heads}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    warm = FitInputs(list(feats[:bs]), list(images[:bs]))
    for make in heads.values():  # first calls pay one-off allocations and kernel choices
        for kw in (variants["base"], variants["multiscale_roi"]):
            _fit_seconds(make(1, kw), warm, feature_fn)
    for name, make in heads.items():
        rows[name] = {}
        for variant, kw in variants.items():
            if variant not in args.variants:
                continue
            t1 = _fit_seconds(make(1, kw), inputs, feature_fn)
            t3 = _fit_seconds(make(3, kw), inputs, feature_fn)
            epoch = max((t3 - t1) / 2, 1e-9)
            setup = max(t1 - epoch, 0.0)
            scale = args.target_images / n
            total = args.target_images * backbone_s + setup * scale + args.epochs * epoch * scale
            rows[name][variant] = {
                "epoch_s": epoch,
                "images_per_s": n / epoch,
                "setup_s": setup,
                "extrapolated_minutes": total / 60.0,
            }
            print(f"{name} {variant}: {rows[name][variant]}", file=sys.stderr)
    return {
        "machine": machine(dev),
        "load_average_at_start": load_start,
        "images": f"first {n} ECSSD images, 320x320 centre crops",
        "backbone": f"efficientnet_lite0, tap {args.tap} (packaged weights)",
        "batch_size": bs,
        "crop_pool": args.pool,
        "backbone_s_per_image": backbone_s,
        "extrapolation": {
            "images": args.target_images,
            "epochs": args.epochs,
            "formula": "minutes = (images x backbone_s + setup_s x images / n"
            " + epochs x epoch_s x images / n) / 60",
            "target_minutes": 30,
        },
        "heads": rows,
        "roi_vs_backbone_crop_features": _roi_fidelity(feats, images, feature_fn),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set)")
    ap.add_argument("--training", action="store_true", help="head-training throughput instead")
    ap.add_argument("--n", type=int, default=32, help="training images (--training)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per step (--training)")
    ap.add_argument("--pool", type=int, default=4, help="cached crops per image (--training)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs to extrapolate to")
    ap.add_argument("--target-images", type=int, default=1422, help="images to extrapolate to")
    ap.add_argument("--tap", default="s16+s32", help="efficientnet_lite0 tap (--training)")
    ap.add_argument("--heads", nargs="+", default=["sempart", "found"],
                    choices=["sempart", "found"], help="heads to time (--training; both)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="settings to time (--training; all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    if args.training:
        json.dump(training(args, dev), sys.stdout, indent=2)
        print()
        return 0
    gen = torch.Generator().manual_seed(0)

    model = build_backbone("dino_vits8").to(dev).eval()
    x320 = torch.rand(1, 3, 320, 320, generator=gen).to(dev)
    with torch.inference_mode():
        dino_ms = _median_ms(lambda: model.forward_features(x320, "tokens"), args.repeats, dev)

    full, full_name = _full_size_image()
    inputs = {
        "320x320": (torch.rand(1, 1, 320, 320, generator=gen), x320.cpu()),
        "ecssd_full": (
            torch.rand(1, 1, *full.shape[:2], generator=gen),
            torch.from_numpy(full.copy()).permute(2, 0, 1)[None].float() / 255.0,
        ),
    }
    gf_ms: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, (mask, image) in inputs.items():
            mask, image = mask.to(dev), image.to(dev)
            gf_ms[name] = {
                f"r{r}": _median_ms(
                    lambda r=r, m=mask, i=image: refine_masks(m, i, GuidedFilterConfig(radius=r)),
                    args.repeats,
                    dev,
                )
                for r in RADII
            }
    result = {
        "machine": machine(dev),
        "repeats": args.repeats,
        "dino_vits8_forward_320_ms": dino_ms,
        "guided_filter_ms": gf_ms,
        "ecssd_image": {"file": full_name, "height": full.shape[0], "width": full.shape[1]},
        "ratio_gf_r9_320_to_dino_forward": gf_ms["320x320"]["r9"] / dino_ms,
        "target_ratio_below": 0.02,
        "ratio_r32_to_r2_320": gf_ms["320x320"]["r32"] / gf_ms["320x320"]["r2"],
        "ratio_r32_to_r2_ecssd": gf_ms["ecssd_full"]["r32"] / gf_ms["ecssd_full"]["r2"],
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
