"""`unseg fit primaps-em|kmeans DATA --num-classes K --out RUN`: fit semantic class prototypes."""

from __future__ import annotations

import argparse

from unseg.cli.common import add_backbone_arguments, resolve_backbone
from unseg.pipelines.semantic import fit_semantic


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the semantic fit commands and ``unseg segment``."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="PriMaPs-EM epochs (paper: 50)")
    budget.add_argument("--steps", type=int, default=None, help="PriMaPs-EM steps instead")
    p.add_argument(
        "--crf", action=argparse.BooleanOptionalAction, default=True,
        help="dense CRF at prediction time (default: on; stored in the run)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=320, help="feature short side in pixels (320)")
    p.add_argument(
        "--label-factor", type=int, default=2,
        help="features are upsampled by this factor for training and prediction (default 2)",
    )
    p.add_argument("--workers", type=int, default=None, help="PriMaPs/CRF processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")


def register(methods: argparse._SubParsersAction) -> None:
    """Add ``unseg fit primaps-em`` and ``unseg fit kmeans``."""
    helps = {
        "primaps-em": "PriMaPs-EM: class prototypes fitted to principal mask proposals",
        "kmeans": "cosine k-means of the backbone features (the baseline)",
    }
    for method, text in helps.items():
        p = methods.add_parser(method, help=text)
        p.add_argument("data", help="dataset root, image folder (recursive) or image file")
        p.add_argument("--num-classes", "-k", type=int, required=True, help="number of classes K")
        p.add_argument("--out", required=True, help="run folder to write")
        add_backbone_arguments(p)
        add_training_arguments(p)
        if method == "primaps-em":
            p.add_argument(
                "--student-augs", action="store_true",
                help="train θ on a photometrically augmented view (paper: optional; off)",
            )
            p.add_argument(
                "--logit-scale", type=float, default=1.0,
                help="M-step logits = scale x cosine (default 1: the spec's unit-gain classifier)",
            )
        p.set_defaults(func=_run, semantic_method=method, student_augs=False, logit_scale=1.0)


def _run(args: argparse.Namespace) -> int:
    result = fit_semantic(
        args.data,
        args.out,
        args.semantic_method,
        args.num_classes,
        resolve_backbone(args.backbone, f"fit {args.semantic_method}"),
        weights=args.weights,
        size=args.size,
        epochs=args.epochs,
        steps=args.steps,
        crf=args.crf,
        label_factor=args.label_factor,
        student_augs=args.student_augs,
        logit_scale=args.logit_scale,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
    )
    return 0 if result.report.ok else 1
