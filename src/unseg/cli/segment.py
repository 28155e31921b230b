"""`unseg segment IMAGES --out DIR`: fit a semantic model on a folder and segment it, in one pass.

Writes ``DIR/masks/*.png`` (pixel value = class id, palette embedded), ``DIR/overlays/*.jpg``,
``DIR/run/`` (the fitted model, reusable with ``unseg predict``; its config.json holds the
seconds per stage), ``DIR/report.html`` (unless ``--no-report``) and ``DIR/unseg-manifest.json``
(``unseg.outdir``: what wrote each file; ``--resume`` / ``--overwrite`` for a used folder).
Every option of every semantic method's config is available here.
``--method maskcontrast`` runs discover → fit → predict: the masks of ``unseg discover``
(``DIR/discover``; ``--discover`` picks its method) or of ``--saliency DIR``.
"""

from __future__ import annotations

import argparse

from unseg.cli.common import (
    Outcome,
    add_backbone_arguments,
    add_output_arguments,
    add_semantic_arguments,
    batch_outcome,
    run_into_output,
    run_settings,
)
from unseg.cli.options import add_method_options, given_options
from unseg.data.datasets import ImageListing
from unseg.pipelines.folder import check_discovery, segment
from unseg.pipelines.kind import Settings
from unseg.pipelines.kinds import create_kind
from unseg.pipelines.saliency import MaskSource
from unseg.pipelines.semantic import DEFAULT_SEGMENT_CLASSES
from unseg.registry import get_method, list_methods
from unseg.report.html import write_report


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``segment`` command."""
    p = sub.add_parser(
        "segment", help="fit and predict semantic classes shared across a folder of images"
    )
    specs = list_methods("semantic") + list_methods("embedding")
    discovery = [n for s in list_methods("saliency") for n in (s.name, *s.aliases)]
    p.add_argument("images", help="dataset root, image folder (recursive) or image file")
    p.add_argument("--out", required=True, help="output folder: masks/, overlays/, run/")
    p.add_argument(
        "--method", choices=[s.name for s in specs], default="primaps-em",
        help="; ".join(f"{s.name}: {s.summary}" for s in specs) + " (default primaps-em)",
    )
    p.add_argument(
        "--num-classes", "-k", type=int, default=DEFAULT_SEGMENT_CLASSES,
        help=f"number of classes K (default {DEFAULT_SEGMENT_CLASSES})",
    )
    add_backbone_arguments(p)
    add_semantic_arguments(p)
    p.add_argument(
        "--saliency", default=None, metavar="DIR",
        help="maskcontrast: folder of saliency PNGs named by the images' stems (default: run "
        "`unseg discover` first, into OUT/discover)",
    )
    p.add_argument(
        "--discover", choices=["auto", "spectral", *discovery], default="auto",
        help="maskcontrast: the discover method giving the masks (default auto, as `unseg "
        "discover`'s: the FOUND-style head trained on the images when there are enough, else "
        "spectral; the FOUND-style head here keeps the reference's background threshold 0.3, "
        "measured best for MaskContrast)",
    )
    add_output_arguments(p, report=True)
    add_method_options(p, specs, "method options")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # every option is checked before --overwrite deletes anything
    spec = get_method(args.method)
    settings = run_settings(args, "segment")
    kind = create_kind(spec.name, args.num_classes, given_options(args, spec), settings)
    images = ImageListing(args.images)  # listed once: discovery's choice, its stages, the fit
    source = None
    if kind.needs_masks:  # MaskContrast's chained discovery: its checks too; the run then
        source = check_discovery(images, settings)  # reuses the source it resolved
    return run_into_output(args, "segment", ("images",),
                           lambda: _segment(args, images, settings, source))


def _segment(args: argparse.Namespace, images: ImageListing, settings: Settings,
             source: MaskSource | None) -> Outcome:
    spec = get_method(args.method)
    report = segment(
        images, args.out, spec.name, args.num_classes,
        options=given_options(args, spec), settings=settings, source=source,
    )
    return batch_outcome(
        report, f"{args.out}/masks (overlays in {args.out}/overlays)",
        f"{spec.name}, {args.num_classes} classes",
        lambda: write_report(args.out, args.images, args.gt),
    )
