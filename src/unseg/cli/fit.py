"""`unseg fit METHOD DATA --out RUN`: fit a registered method on unlabeled images.

One subcommand per method of the registry (``unseg.registry``), with one option per field of
its config; semantic methods add the semantic pipeline's options (``-k``, ``--size``,
``--refine``, ``--embeddings``, ...), saliency methods the feature cache, embedding methods
(MaskContrast) the saliency mask folder (``--saliency``). The run folder is claimed as an
output folder (``unseg.outdir``: ``--resume`` continues a killed fit, ``--overwrite`` replaces
an earlier one) and the command ends with one completion line. A saliency head whose training
diverged or collapsed (``unseg.methods.collapse``) is saved with its verdict in the run's
``training.collapse``, and the command says so and exits with status 1.
"""

from __future__ import annotations

import argparse

from unseg.cli.common import (
    Outcome,
    add_backbone_arguments,
    add_device_argument,
    add_image_arguments,
    add_output_arguments,
    add_semantic_arguments,
    run_into_output,
    run_settings,
)
from unseg.cli.options import add_method_options, given_options
from unseg.pipelines.folder import fit
from unseg.pipelines.kind import FitResult, Settings
from unseg.pipelines.kinds import create_kind
from unseg.registry import MethodSpec, get_method, list_methods


def _semantic_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--num-classes", "-k", type=int, required=True, help="number of classes K")
    add_semantic_arguments(m)
    m.add_argument(
        "--embeddings", default=None, metavar="RUN",
        help="fit on the pixel embeddings of a maskcontrast run instead of the backbone's "
        "features (its backbone, tap, weights, size and max-side are used, other ones given "
        "are refused; recorded in the run, applied again at prediction)",
    )


def _embedding_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--saliency", required=True, metavar="DIR",
                   help="folder of 8-bit saliency PNGs named by the images' stems "
                   "(e.g. `unseg discover` output)")
    m.add_argument("--size", type=int, default=320, help="feature short side in pixels (320)")
    add_image_arguments(m)
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--cache-dir", default=None,
                   help="feature cache folder (features in CACHE_DIR/features; default: RUN/cache)")
    add_device_argument(m)


def _saliency_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--cache-dir", default=None,
                   help="feature cache folder (features in CACHE_DIR/features, as `unseg "
                   "features --out CACHE_DIR/features --kind keys --crop` writes them)")
    add_image_arguments(m, max_side=False)
    add_device_argument(m)


# the pipeline's options each output kind takes (its config fields are added for every method)
ARGUMENTS = {"semantic": _semantic_arguments, "embedding": _embedding_arguments,
             "saliency": _saliency_arguments}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fit`` with one subcommand per registered method."""
    p = sub.add_parser("fit", help="fit a model on unlabeled images and save it as a run folder")
    methods = p.add_subparsers(dest="method", metavar="METHOD")
    methods.required = True
    for spec in list_methods():
        m = methods.add_parser(spec.name, aliases=list(spec.aliases), help=spec.summary)
        m.add_argument("data", help="dataset root, image folder (recursive) or image file")
        m.add_argument("--out", required=True, help="run folder to write")
        add_backbone_arguments(m)
        ARGUMENTS[spec.output](m)
        add_output_arguments(m, report=False)
        add_method_options(m, [spec], f"{spec.name} options")
        m.set_defaults(func=_run, spec_name=spec.name)


def _run(args: argparse.Namespace) -> int:
    spec = get_method(args.spec_name)
    args.method = spec.name  # an alias and the name are the same configuration
    # every option is checked before --overwrite deletes anything
    settings = run_settings(args, f"fit {spec.name}")
    create_kind(spec.name, getattr(args, "num_classes", None), given_options(args, spec),
                settings)
    return run_into_output(args, f"fit {spec.name}", ("method", "data"),
                           lambda: _fit(args, spec, settings))


def _fit(args: argparse.Namespace, spec: MethodSpec, settings: Settings) -> Outcome:
    result = fit(args.data, args.out, spec.name, getattr(args, "num_classes", None),
                 options=given_options(args, spec), settings=settings)
    return _outcome(result, args.out)


def _outcome(result: FitResult, where: str) -> Outcome:
    """The fit's outcome; a head whose training diverged or collapsed (``facts["collapse"]``)
    is saved but reported as failed: its verdict in the completion line, exit status 1."""
    summary = (f"{result.notes}{result.n_images} image(s) fitted, run in {where}, "
               f"{len(result.report.failed)} input(s) failed")
    outcome = Outcome(summary, 0 if result.report.ok else 1, list(result.report.failed))
    collapse = result.facts.get("collapse") or {}
    if collapse.get("failed"):
        outcome.summary += (f"; TRAINING FAILED ({collapse['verdict']}: see training.collapse "
                            f"in {where}/config.json)")
        outcome.code = 1
    elif collapse.get("flagged"):
        outcome.summary += (f"; check the masks ({collapse['verdict']}: see training.collapse "
                            f"in {where}/config.json)")
    return outcome
