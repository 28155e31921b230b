"""`unseg fit METHOD DATA --out RUN`: fit a registered method on unlabeled images.

One subcommand per method of the registry (``unseg.registry``), with one option per field of
its config; semantic methods add the semantic pipeline's options (``-k``, ``--size``,
``--refine``, ...), saliency methods the feature cache.
"""

from __future__ import annotations

import argparse

from unseg.cli.common import (
    add_backbone_arguments,
    add_device_argument,
    add_semantic_arguments,
    resolve_backbone,
    semantic_settings,
)
from unseg.cli.options import add_method_options, given_options
from unseg.pipelines.fitting import build_config
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
            m.set_defaults(func=_semantic)
        else:
            m.add_argument("--cache-dir", default=None, help="feature cache folder")
            add_device_argument(m)
            m.set_defaults(func=_saliency)
        add_method_options(m, [spec], f"{spec.name} options")
        m.set_defaults(spec_name=spec.name)


def _spec(args: argparse.Namespace) -> MethodSpec:
    return get_method(args.spec_name)


def _semantic(args: argparse.Namespace) -> int:
    spec = _spec(args)
    result = fit_semantic(
        args.data, args.out, spec.name, args.num_classes,
        options=given_options(args, spec),
        settings=semantic_settings(args, f"fit {spec.name}"),
    )
    return 0 if result.report.ok else 1


def _saliency(args: argparse.Namespace) -> int:
    spec = _spec(args)
    result = fit_saliency(
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
    return 0 if result.report.ok else 1
