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
from collections.abc import Callable

from unseg.cli.common import (
    Outcome,
    add_backbone_arguments,
    add_device_argument,
    add_output_arguments,
    add_semantic_arguments,
    check_resolution,
    resolve_backbone,
    run_into_output,
    semantic_settings,
)
from unseg.cli.options import add_method_options, given_options
from unseg.pipelines.fitting import FitResult, build_config
from unseg.pipelines.maskcontrast import MaskContrastSettings, fit_maskcontrast
from unseg.pipelines.saliency import fit_saliency
from unseg.pipelines.semantic import fit_semantic
from unseg.registry import MethodSpec, get_method, list_methods


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
        if spec.output == "semantic":
            m.add_argument("--num-classes", "-k", type=int, required=True,
                           help="number of classes K")
            add_semantic_arguments(m)
            m.add_argument(
                "--embeddings", default=None, metavar="RUN",
                help="fit on the pixel embeddings of a maskcontrast run instead of the "
                "backbone's features (its backbone, tap, weights and size are used; recorded "
                "in the run, applied again at prediction)",
            )
            m.set_defaults(func=_semantic)
        elif spec.output == "embedding":
            m.add_argument("--saliency", required=True, metavar="DIR",
                           help="folder of 8-bit saliency PNGs named by the images' stems "
                           "(e.g. `unseg discover` output)")
            m.add_argument("--size", type=int, default=320,
                           help="feature short side in pixels (320)")
            m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
            m.add_argument("--cache-dir", default=None,
                           help="feature cache folder (default: RUN/cache)")
            add_device_argument(m)
            m.set_defaults(func=_embedding)
        else:
            m.add_argument("--cache-dir", default=None, help="feature cache folder")
            add_device_argument(m)
            m.set_defaults(func=_saliency)
        add_output_arguments(m, report=False)
        add_method_options(m, [spec], f"{spec.name} options")
        m.set_defaults(spec_name=spec.name)


def _spec(args: argparse.Namespace) -> MethodSpec:
    return get_method(args.spec_name)


def _fit_into_run(args: argparse.Namespace, fit: Callable[[MethodSpec], Outcome]) -> int:
    spec = _spec(args)
    args.method = spec.name  # an alias and the name are the same configuration
    return run_into_output(args, f"fit {spec.name}", ("method", "data"), lambda: fit(spec))


def _outcome(result: FitResult, what: str, where: str) -> Outcome:
    summary = (f"{what}{result.n_images} image(s) fitted, run in {where}, "
               f"{len(result.report.failed)} input(s) failed")
    return Outcome(summary, 0 if result.report.ok else 1, list(result.report.failed))


def _semantic(args: argparse.Namespace) -> int:
    return _fit_into_run(args, lambda spec: _fit_semantic(args, spec))


def _fit_semantic(args: argparse.Namespace, spec: MethodSpec) -> Outcome:
    result = fit_semantic(
        args.data, args.out, spec.name, args.num_classes,
        options=given_options(args, spec),
        settings=semantic_settings(args, f"fit {spec.name}"),
    )
    return _outcome(result, f"{args.num_classes} classes, ", args.out)


def _embedding(args: argparse.Namespace) -> int:
    return _fit_into_run(args, lambda spec: _fit_embedding(args, spec))


def _fit_embedding(args: argparse.Namespace, spec: MethodSpec) -> Outcome:
    backbone = resolve_backbone(args.backbone, f"fit {spec.name}")
    check_resolution(args.size, None, backbone, args.tap)
    result = fit_maskcontrast(
        args.data, args.saliency, args.out,
        options=given_options(args, spec),
        settings=MaskContrastSettings(
            backbone=backbone, weights=args.weights,
            tap=args.tap, size=args.size, seed=args.seed, device=args.device,
            cache_dir=args.cache_dir,
        ),
    )
    return _outcome(result, f"{result.masks.summary()}; ", args.out)


def _saliency(args: argparse.Namespace) -> int:
    return _fit_into_run(args, lambda spec: _saliency_outcome(_fit_saliency(args, spec), args.out))


def _saliency_outcome(result: FitResult, where: str) -> Outcome:
    """The fit's outcome; a head whose training diverged or collapsed (``facts["collapse"]``)
    is saved but reported as failed: its verdict in the completion line, exit status 1."""
    outcome = _outcome(result, "", where)
    collapse = result.facts.get("collapse") or {}
    if collapse.get("failed"):
        outcome.summary += (f"; TRAINING FAILED ({collapse['verdict']}: see training.collapse "
                            f"in {where}/config.json)")
        outcome.code = 1
    return outcome


def _fit_saliency(args: argparse.Namespace, spec: MethodSpec) -> FitResult:
    return fit_saliency(
        args.data,
        args.out,
        build_config(spec, given_options(args, spec), {}),
        resolve_backbone(args.backbone, f"fit {spec.name}"),
        args.weights,
        args.device,
        args.cache_dir,
        method=spec.name,
        tap=args.tap,
    )
