"""`unseg fit METHOD ...`: fit a model on a folder of images; each method adds its subcommand."""

from __future__ import annotations

import argparse

from unseg.cli import fit_saliency, fit_semantic


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fit`` with one subcommand per method (primaps-em, kmeans, saliency)."""
    p = sub.add_parser("fit", help="fit a model on unlabeled images and save it as a run folder")
    methods = p.add_subparsers(dest="method", metavar="METHOD")
    methods.required = True
    fit_semantic.register(methods)
    fit_saliency.register(methods)
