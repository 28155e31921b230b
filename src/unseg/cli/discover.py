"""`unseg discover IMAGES --out DIR`: object masks and boxes, spectral or with a trained head."""

from __future__ import annotations

import argparse

from unseg.cli.common import add_backbone_arguments, finish, resolve_backbone
from unseg.methods.saliency import SaliencyHeadConfig
from unseg.pipelines.saliency import discover
from unseg.refine.guided_filter import GuidedFilterConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``discover`` command."""
    p = sub.add_parser(
        "discover",
        help="foreground masks (OUT/masks/*.png) and boxes (OUT/boxes.json) for images",
    )
    p.add_argument("images", help="image file or folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--method",
        choices=["spectral", "head"],
        default="spectral",
        help="spectral: training-free TokenCut bipartition (default); head: train the "
        "saliency head first (its run is kept in OUT/run)",
    )
    add_backbone_arguments(p)
    p.add_argument(
        "--train-images",
        default=None,
        help="images to train the head on (default: IMAGES themselves; no labels are used)",
    )
    p.add_argument("--epochs", type=int, default=None, help="head training epochs (default 30)")
    p.add_argument(
        "--guided-filter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="guided-filter refinement of the masks (default: on)",
    )
    p.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="multi-scale consistency while training the head (default: off)",
    )
    p.add_argument(
        "--guide",
        choices=["mean", "luma"],
        default="mean",
        help="guided-filter guide: mean of RGB (reference code, default) or BT.601 luma",
    )
    p.add_argument("--cache-dir", default=None, help="feature cache for the head's training")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = SaliencyHeadConfig(
        guided_filter=args.guided_filter,
        multiscale=args.multiscale,
        guided=GuidedFilterConfig(guide=args.guide),
    )
    if args.epochs is not None:
        cfg.epochs = args.epochs
    report = discover(
        args.images,
        args.out,
        args.method,
        resolve_backbone(args.backbone, "discover"),
        args.train_images,
        cfg,
        device=args.device,
        cache_dir=args.cache_dir,
        weights=args.weights,
    )
    return finish(report, f"{args.out}/masks (boxes in {args.out}/boxes.json)")
