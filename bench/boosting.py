"""Cost of the guided filter next to the backbone it refines.

Milliseconds of ``refine_masks`` (standardise, guided filter, restore; mean-RGB guide, ε = 1e-3)
on one 320x320 mask and on one full-size ECSSD image, for radii 2, 9 and 32, beside one
``dino_vits8`` forward at 320x320 (random weights) in the same process. Median of ``--repeats``
runs after one warm-up. Prints JSON.

    .venv/bin/python bench/boosting.py [--threads 1]

On a busy shared CPU, several torch threads per process make the filter's many small ops wait
on the scheduler; ``--threads 1`` measures the arithmetic cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from unseg.backbones import build_backbone
from unseg.data.image import load_image
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
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
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(dev),
        },
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
