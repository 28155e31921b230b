"""`unseg features DATA --backbone NAME --out DIR`: cache dense features of a folder or dataset.

Runs alone or under ``torchrun --nproc_per_node=N`` (the images are split across processes).
The cache folder is meant to be reused and shared (entries are keyed by what they depend on),
so it is not claimed like the other commands' output folders (``unseg.outdir``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from unseg.cli.common import (
    add_backbone_arguments,
    add_image_arguments,
    check_resolution,
    resolve_backbone,
)
from unseg.data.resize import resolve_max_side
from unseg.features import extract_dataset
from unseg.pipelines.kind import DEFAULT_SIZE
from unseg.utils import dist
from unseg.utils.timing import collect, log_totals

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``features`` command."""
    p = sub.add_parser(
        "features",
        help="extract and cache dense backbone features (torchrun splits the images)",
    )
    p.add_argument("data", help="dataset root, image folder (searched recursively) or image file")
    p.add_argument("--out", required=True,
                   help="cache folder (reused: cached images are skipped); the other "
                   "commands' `--cache-dir C` read C/features")
    add_backbone_arguments(p)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"short side in pixels (default {DEFAULT_SIZE})")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype")
    p.add_argument("--kind", choices=["tokens", "keys"], default="tokens", help="feature kind")
    p.add_argument("--crop", action="store_true", help="centre-crop to size x size")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    add_image_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    backbone = resolve_backbone(args.backbone, "features")
    check_resolution(args.size, args.max_side, backbone, args.tap)
    main = dist.is_main_env()
    with collect() as timings:
        fs = extract_dataset(
            args.data,
            args.out,
            backbone=backbone,
            weights=args.weights,
            size=args.size,
            kind=args.kind,
            batch_size=args.batch_size,
            crop=args.crop,
            dtype=DTYPES[args.dtype],
            device=args.device,
            num_workers=args.workers,
            tap=args.tap,
            max_side=resolve_max_side(args.size, args.max_side),
            max_pixels=args.max_pixels,
        )
    if main:
        log_totals(timings, "unseg features")
        for path, problem in fs.report.failed:
            print(f"failed: {path}: {problem}", file=sys.stderr)
        s = fs.stats
        print(
            f"unseg features: {backbone}, {s['images']} images: {s['computed']} computed, "
            f"{s['cached']} from cache, {s['failed']} failed; features in {fs.cache_dir}, "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return 0 if fs.report.ok else 1
