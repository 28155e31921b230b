"""`unseg fit saliency IMAGES --out RUN`: train the saliency head (no labels) on a folder."""

from __future__ import annotations

import argparse

from unseg.cli.common import add_backbone_arguments, resolve_backbone
from unseg.methods.saliency import SaliencyHeadConfig
from unseg.pipelines.saliency import fit_saliency
from unseg.refine.guided_filter import GuidedFilterConfig

_DEFAULTS = SaliencyHeadConfig()


def register(methods: argparse._SubParsersAction) -> None:
    """Add ``unseg fit saliency``."""
    p = methods.add_parser(
        "saliency", help="SEMPART-style saliency head trained with the soft normalized cut"
    )
    p.add_argument("images", help="image file or folder (searched recursively)")
    p.add_argument("--out", required=True, help="run folder to write")
    add_backbone_arguments(p)
    p.add_argument(
        "--epochs", type=int, default=_DEFAULTS.epochs,
        help=f"training epochs (paper: {_DEFAULTS.epochs})",
    )
    p.add_argument(
        "--lr", type=float, default=_DEFAULTS.lr, help=f"AdamW learning rate ({_DEFAULTS.lr})"
    )
    p.add_argument(
        "--batch-size", type=int, default=_DEFAULTS.batch_size,
        help=f"images per step ({_DEFAULTS.batch_size})",
    )
    p.add_argument("--size", type=int, default=_DEFAULTS.image_size, help="training crop side")
    p.add_argument(
        "--multiscale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="multi-scale consistency (Boosting trick; default: off)",
    )
    p.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=list(_DEFAULTS.crop_scale),
        metavar=("LO", "HI"),
        help="crop side as a fraction of the image side (0.5 0.5)",
    )
    p.add_argument(
        "--fixed-crop",
        action="store_true",
        help="reproduce the reference code's near-fixed (top-left) crop, for comparison",
    )
    p.add_argument(
        "--guided-filter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="guided filter at prediction time (default: on)",
    )
    p.add_argument(
        "--guide", choices=["mean", "luma"], default="mean",
        help="guided-filter guide: mean of RGB (reference code, default) or BT.601 luma",
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed")
    p.add_argument("--cache-dir", default=None, help="feature cache folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = SaliencyHeadConfig(
        image_size=args.size,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        multiscale=args.multiscale,
        crop_scale=tuple(args.crop_scale),
        fixed_crop=args.fixed_crop,
        guided_filter=args.guided_filter,
        guided=GuidedFilterConfig(guide=args.guide),
        seed=args.seed,
    )
    result = fit_saliency(
        args.images,
        args.out,
        cfg,
        resolve_backbone(args.backbone, "fit saliency"),
        args.weights,
        args.device,
        args.cache_dir,
    )
    return 0 if result.report.ok else 1
