"""`unseg predict RUN IMAGES --out DIR`: apply a fitted run (any method) to images."""

from __future__ import annotations

import argparse

from unseg.cli.common import finish
from unseg.pipelines import predict_run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command."""
    p = sub.add_parser("predict", help="predict masks for images with a fitted run folder")
    p.add_argument("run", help="run folder written by `unseg fit` or `unseg segment`")
    p.add_argument("images", help="image file or folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for one PNG per image")
    p.add_argument(
        "--crf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dense CRF refinement (semantic runs; default: as fitted)",
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
        "--weights",
        default=None,
        help="backbone weights file (default: the one the run was fitted with; hash-checked)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    given = {
        "crf": args.crf,
        "guided_filter": args.guided_filter,
        "guide": args.guide,
        "weights": args.weights,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    report = predict_run(args.run, args.images, args.out, overrides, device=args.device)
    return finish(report, str(args.out))
