"""``segment`` and ``discover`` with ``dino_vits8`` on the CPU and on CUDA: seconds and agreement.

Writes random ``dino_vits8`` weights in the official checkpoint format (unseg's own random
init, saved as a ``.pth``; no DINO download needed), then runs, with those weights passed as
``--weights``, on the first ``--limit`` images (sorted) under ``--images``:

- ``segment`` (PriMaPs-EM, ``-k`` classes, the defaults otherwise: 320 short side, CRF) and
- ``discover`` (spectral, the defaults otherwise),

once with ``device="cpu"`` and once with ``device="cuda"``, each timed end to end in this
process (the CUDA run after a warm-up forward). Prints JSON: the machine, torch and GPU, the
load average, seconds per run and per stage (from the run's timings where recorded), and the
share of identical mask pixels between the CPU and CUDA outputs of each command, plus the
largest difference of the fitted PriMaPs-EM prototypes. cuDNN's TF32 convolutions (torch's
default on Ampere and later) make the CUDA patch embedding differ from the CPU's beyond float32
round-off; ``--no-tf32`` turns them off to measure round-off alone.

    .venv/bin/python bench/vit_cuda.py --images ../shared/data/VOC2012 --limit 40 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import machine
from PIL import Image

from unseg.backbones import build_backbone
from unseg.pipelines.folder import discover, segment
from unseg.pipelines.kind import Settings
from unseg.runs import load_fitted

EXTENSIONS = {".jpg", ".jpeg", ".png"}


def _images(root: Path, limit: int, out: Path) -> Path:
    """A folder of links to the first ``limit`` images under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
    files = [p for p in files if "Segmentation" not in p.parent.name][:limit]
    if not files:
        sys.exit(f"no images under {root}")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    return folder


def _agreement(a: Path, b: Path) -> float:
    """Share of identical pixels over the PNG masks in ``a`` and ``b`` (same names)."""
    same = total = 0
    for m in sorted(a.glob("*.png")):
        x, y = np.asarray(Image.open(m)), np.asarray(Image.open(b / m.name))
        same += int((x == y).sum())
        total += x.size
    return same / max(total, 1)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("-k", type=int, default=21)
    ap.add_argument("--no-tf32", action="store_true")
    ap.add_argument("--devices", default="cpu,cuda",
                    help="devices to run (default cpu,cuda; the comparison needs both)")
    args = ap.parse_args()
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares the CPU with CUDA (--devices cpu "
                 "runs the CPU half alone)")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    images = _images(args.images, args.limit, args.out)
    weights = args.out / "dino_vits8_random.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("dino_vits8").state_dict(), weights)
    if "cuda" in devices:
        warm = build_backbone("dino_vits8").cuda().eval()
        with torch.no_grad():
            warm(torch.rand(1, 3, 320, 320, device="cuda"))
        del warm
    result: dict[str, Any] = {
        "machine": machine("cuda" if "cuda" in devices else "cpu"),
        "images": len(list(images.iterdir())), "k": args.k,
        "tf32": (not args.no_tf32) if "cuda" in devices else None,
    }
    for device in devices:
        settings = Settings(backbone="dino_vits8", weights=str(weights), device=device)
        seg = args.out / f"segment-{device}"
        disc = args.out / f"discover-{device}"
        result[f"segment_{device}_s"] = _timed(
            lambda s=settings, o=seg: segment(images, o, "primaps-em", args.k, settings=s))
        result[f"discover_{device}_s"] = _timed(
            lambda s=settings, o=disc: discover(images, o, "spectral", settings=s))
        meta = json.loads((seg / "run" / "config.json").read_text())
        result[f"segment_{device}_stages_s"] = meta.get("timings")
    if devices != ["cpu", "cuda"]:
        print(json.dumps(result, indent=1))
        return
    result["segment_identical_pixels"] = _agreement(args.out / "segment-cpu" / "masks",
                                                    args.out / "segment-cuda" / "masks")
    result["discover_identical_pixels"] = _agreement(args.out / "discover-cpu" / "masks",
                                                     args.out / "discover-cuda" / "masks")
    _, cpu_em, _ = load_fitted(args.out / "segment-cpu" / "run", "semantic", "cpu")
    _, cuda_em, _ = load_fitted(args.out / "segment-cuda" / "run", "semantic", "cpu")
    result["prototypes_max_abs_diff"] = float((cpu_em.prototypes_ - cuda_em.prototypes_)
                                              .abs().max())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
