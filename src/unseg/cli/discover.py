"""`unseg discover IMAGES --out DIR`: object masks and boxes, spectral or with a trained head."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from unseg.cli.common import (
    Outcome,
    add_backbone_arguments,
    add_device_argument,
    add_image_arguments,
    add_output_arguments,
    batch_outcome,
    resolve_backbone,
    run_into_output,
)
from unseg.cli.options import add_method_options, given_options
from unseg.data.datasets import ImageListing
from unseg.errors import UnsegError
from unseg.pipelines.folder import discover
from unseg.pipelines.kind import Settings
from unseg.pipelines.kinds import create_kind
from unseg.pipelines.saliency import (
    AUTO,
    AUTO_TRAINED,
    FILTER_UNUSED,
    METHOD,
    MIN_TRAIN_IMAGES,
    dense_crf_on,
    filter_asked,
    method_tap,
    resolve_discover_method,
    spectral_unused,
)
from unseg.registry import config_options, get_method, list_methods
from unseg.report.html import write_report
from unseg.utils import dist


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``discover`` command."""
    p = sub.add_parser(
        "discover",
        help="foreground masks (OUT/masks/*.png) and boxes (OUT/boxes.json) for images",
    )
    specs = list_methods("saliency")
    names = [n for s in specs for n in (s.name, *s.aliases)]
    p.add_argument("images", help="dataset root, image folder (recursive) or image file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--method",
        choices=[AUTO, "spectral", *names],
        default=AUTO,
        help=f"{AUTO} (default): the best measured method the folder allows — the FOUND-style "
        f"head (the mean of --ensemble heads, {get_method('found').config().ensemble} by "
        f"default) trained on IMAGES themselves (no labels) when they hold at least "
        f"{MIN_TRAIN_IMAGES} images or --train-images is given, else spectral; the command "
        "says which ran; spectral: training-free TokenCut bipartition; "
        + "; ".join(f"{s.name}: {s.summary}, trained first (its run is kept in OUT/run)"
                    for s in specs),
    )
    add_backbone_arguments(p)
    p.add_argument(
        "--train-images",
        default=None,
        help="images to train the head on (default: IMAGES themselves; no labels are used)",
    )
    p.add_argument("--cache-dir", default=None,
                   help="feature cache for the head's training (in CACHE_DIR/features, where "
                   "`unseg features --out CACHE_DIR/features --kind keys --crop` writes)")
    add_device_argument(p)
    add_image_arguments(p)
    add_output_arguments(p, report=True)
    add_method_options(
        p, specs, "method options (the guided filter and the dense CRF apply to spectral too)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # the method, the backbone and the options are checked before --overwrite deletes anything;
    # the images are listed once (auto counts them) for choosing, training and predicting
    images = ImageListing(args.images)
    method, why = resolve_discover_method(args.method, images, args.train_images)
    settings = method_tap(method, Settings(
        backbone=resolve_backbone(args.backbone, "discover"), weights=args.weights,
        tap=args.tap, device=args.device, cache_dir=args.cache_dir,
        max_pixels=args.max_pixels, max_side=args.max_side,
    ))
    spec = get_method(METHOD if method == "spectral" else method)
    given = _spectral_options(args) if method == "spectral" else given_options(args, spec)
    create_kind(method, None, given, settings)
    if dist.is_main_env():
        tap = f", tap {settings.tap}" if settings.tap else ""
        print(f"unseg discover: {why}{tap}{_heads(spec, given)}, {_refinement(given)}",
              file=sys.stderr)
    return run_into_output(args, "discover", ("images",),
                           lambda: _discover(args, images, method, given, settings))


def _spectral_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options spectral discovery uses (:func:`spectral_unused` says which it does not);
    a head's training option (of any saliency head: ``auto`` trains the FOUND-style one) is
    an error with ``--method spectral`` and a warning under ``auto``; so is
    ``--train-images``, which ``auto`` would train the head on."""
    if args.train_images is not None:
        raise UnsegError("--train-images: images to train a head on, and spectral discovery "
                         f"trains nothing (--method {AUTO} or {AUTO_TRAINED} trains the "
                         "head on them)")
    spec = get_method(METHOD)
    own = {o.dest for o in config_options(spec)}
    other = {o.dest: o.flags[0] for s in list_methods("saliency") for o in config_options(s)
             if o.dest not in own}
    given_other = [d for d in vars(args) if d in other]
    given = given_options(argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in other}), spec)
    unused = spectral_unused(given)
    if not unused and not given_other:
        return given
    flags = ", ".join([*(o.flags[0] for o in config_options(spec)
                         if ".".join(o.path) in unused), *(other[d] for d in given_other)])
    message = f"{flags}: a head's training option, and spectral discovery trains nothing"
    if args.method == "spectral":
        raise UnsegError(f"{message} (it uses only --image-size and the guided-filter and "
                         "dense-CRF options)")
    if dist.is_main_env():
        print(f"unseg discover: warning: {message}; ignored (--method "
              f"{AUTO_TRAINED} trains the head on these images anyway)", file=sys.stderr)
    return {k: v for k, v in given.items() if k not in unused}


def _refinement(given: dict[str, Any]) -> str:
    """Which refinement the masks get: the dense CRF, the guided filter or none (the options
    given, else the measured default); says so when guided-filter options were given for
    nothing."""
    if dense_crf_on(given.get("dense_crf")):
        if filter_asked(given.get("guided_filter"), any(k.startswith("guided.") for k in given)):
            return f"refined by the dense CRF (warning: {FILTER_UNUSED})"
        return "refined by the dense CRF"
    return "refined by the guided filter" if given.get("guided_filter", True) else "unrefined"


def _heads(spec: Any, given: dict[str, Any]) -> str:
    """", the mean of N heads" for a head trained as an ensemble (``ensemble`` > 1), else ""."""
    n = given.get("ensemble", getattr(spec.config(), "ensemble", 1))
    return f", the mean of {n} heads" if n > 1 else ""


def _discover(args: argparse.Namespace, images: ImageListing, method: str,
              given: dict[str, Any], settings: Settings) -> Outcome:
    report = discover(
        images, args.out, method, train_images=args.train_images,
        options=given, settings=settings,
    )
    outcome = batch_outcome(
        report, f"{args.out}/masks (boxes in {args.out}/boxes.json)", method,
        lambda: write_report(args.out, args.images, args.gt),
    )
    outcome.method = method
    return outcome
