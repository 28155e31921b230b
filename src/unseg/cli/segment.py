"""`unseg segment IMAGES --out DIR`: fit a semantic model on a folder and segment it, in one go.

Writes ``DIR/masks/*.png`` (pixel value = class id, palette embedded), ``DIR/overlays/*.jpg`` and
``DIR/run/`` (the fitted model, reusable with ``unseg predict``).
"""

from __future__ import annotations

import argparse

from unseg.cli.common import add_backbone_arguments, finish, resolve_backbone
from unseg.cli.fit_semantic import add_training_arguments
from unseg.pipelines.semantic import DEFAULT_SEGMENT_CLASSES, METHODS, segment


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` command."""
    p = sub.add_parser(
        "segment", help="fit and predict semantic classes shared across a folder of images"
    )
    p.add_argument("images", help="image file or folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder: masks/, overlays/, run/")
    p.add_argument("--method", choices=METHODS, default="primaps-em", help="(primaps-em)")
    p.add_argument(
        "--num-classes", "-k", type=int, default=DEFAULT_SEGMENT_CLASSES,
        help=f"number of classes K (default {DEFAULT_SEGMENT_CLASSES})",
    )
    add_backbone_arguments(p)
    add_training_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = segment(
        args.images,
        args.out,
        args.method,
        args.num_classes,
        resolve_backbone(args.backbone, "segment"),
        weights=args.weights,
        size=args.size,
        epochs=args.epochs,
        steps=args.steps,
        crf=args.crf,
        label_factor=args.label_factor,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
    )
    return finish(report, f"{args.out}/masks (overlays in {args.out}/overlays)")
