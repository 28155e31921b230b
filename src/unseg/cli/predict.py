"""`unseg predict RUN IMAGES --out DIR`: apply a fitted run (any registered method) to images."""

from __future__ import annotations

import argparse
from typing import Any

from unseg.cli.common import (
    Outcome,
    add_device_argument,
    add_image_arguments,
    add_output_arguments,
    batch_outcome,
    run_into_output,
)
from unseg.pipelines.folder import predict
from unseg.pipelines.kinds import run_kind
from unseg.refine.semantic import REFINES
from unseg.report.html import write_report


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command."""
    p = sub.add_parser("predict", help="predict masks for images with a fitted run folder")
    p.add_argument("run", help="run folder written by `unseg fit`, `segment` or `discover`")
    p.add_argument("images", help="dataset root, image folder (recursive) or image file")
    p.add_argument("--out", required=True, help="output folder for one PNG per image")
    p.add_argument(
        "--refine", choices=REFINES, default=None,
        help="refinement of the class maps (semantic runs; default: as fitted)",
    )
    p.add_argument(
        "--guided-filter",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="guided-filter refinement (saliency runs; default: as fitted)",
    )
    p.add_argument(
        "--guide",
        choices=["mean", "luma"],
        default=None,
        help="guided-filter guide (saliency runs; default: as fitted)",
    )
    p.add_argument(
        "--dense-crf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="2-label dense-CRF refinement instead of the guided filter (saliency runs; "
        "default: as fitted, and on where the run left it to the default)",
    )
    p.add_argument(
        "--num-classes", "-k", type=int, default=None,
        help="classes K: background + K - 1 clusters (maskcontrast runs, required)",
    )
    p.add_argument(
        "--clusters", choices=["predicted", "training"], default=None,
        help="fit the clusters on the predicted images (default, as the paper) or on the run's "
        "training images (maskcontrast runs)",
    )
    p.add_argument("--seed", type=int, default=None,
                   help="k-means seed (maskcontrast runs; default: the run's seed)")
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights file (default: the one the run was fitted with; hash-checked)",
    )
    add_device_argument(p)
    add_image_arguments(p, max_side=False)
    add_output_arguments(p, report=True)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    run_kind(args.run, overrides, args.device)  # the run and options, before --overwrite
    return run_into_output(args, "predict", ("run", "images"),
                           lambda: _predict(args, overrides))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings this command changes (the options given)."""
    given = {
        "refine": args.refine,
        "guided_filter": args.guided_filter,
        "guide": args.guide,
        "dense_crf": args.dense_crf,
        "weights": args.weights,
        "num_classes": args.num_classes,
        "clusters": args.clusters,
        "seed": args.seed,
        "max_pixels": args.max_pixels,
    }
    return {k: v for k, v in given.items() if v is not None}


def _predict(args: argparse.Namespace, overrides: dict[str, Any]) -> Outcome:
    report = predict(args.run, args.images, args.out, overrides, device=args.device)
    return batch_outcome(
        report, f"{args.out}/masks", f"run {args.run}",
        lambda: write_report(args.out, args.images, args.gt, run=args.run),
    )
