"""Arguments and messages shared by the commands: backbone choice, semantic pipeline settings,
batch summaries."""

from __future__ import annotations

import argparse
import sys

from unseg.pipelines.backbone import choose_backbone
from unseg.pipelines.semantic import SemanticSettings
from unseg.refine.semantic import DEFAULT_PSEUDO_REFINE, DEFAULT_REFINE, REFINES
from unseg.utils import dist
from unseg.utils.batch import BatchReport


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """``--backbone`` (default announced on stderr), ``--weights`` and ``--tap``."""
    p.add_argument("--backbone", default=None, help="backbone name (default: see stderr)")
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights file, .pth or .safetensors (default: packaged or cached weights)",
    )
    p.add_argument(
        "--tap", default=None,
        help="the backbone's feature tap (default: its registered default; "
        "`unseg backbones` lists them); recorded in runs",
    )


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")


def add_semantic_arguments(p: argparse.ArgumentParser) -> None:
    """The semantic pipeline's own options (``unseg fit`` of a semantic method, ``segment``)."""
    p.add_argument("--size", type=int, default=320, help="feature short side in pixels (320)")
    p.add_argument(
        "--label-factor", type=int, default=2,
        help="logits at this multiple of the feature resolution, training and prediction (2)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--refine", choices=REFINES, default=DEFAULT_REFINE,
        help=f"refinement of the predicted class maps, stored in the run as its default "
        f"(default {DEFAULT_REFINE})",
    )
    p.add_argument(
        "--pseudo-refine", choices=REFINES, default=DEFAULT_PSEUDO_REFINE,
        help=f"refinement of the PriMaPs pseudo-labels (default {DEFAULT_PSEUDO_REFINE}, as "
        "the paper)",
    )
    p.add_argument("--workers", type=int, default=None, help="PriMaPs/refinement processes")
    p.add_argument(
        "--cache-dir", default=None,
        help="feature and pseudo-label cache, shareable between runs (default: RUN/cache)",
    )
    add_device_argument(p)


def semantic_settings(args: argparse.Namespace, command: str) -> SemanticSettings:
    """:class:`SemanticSettings` from :func:`add_semantic_arguments`' and the backbone's
    options; the backbone choice is announced on stderr (with ``--embeddings`` the embedding
    run's backbone is used instead)."""
    embeddings = getattr(args, "embeddings", None)
    return SemanticSettings(
        backbone=args.backbone if embeddings else resolve_backbone(args.backbone, command),
        weights=args.weights,
        tap=args.tap,
        size=args.size,
        label_factor=args.label_factor,
        refine=args.refine,
        pseudo_refine=args.pseudo_refine,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
        cache_dir=args.cache_dir,
        embeddings=embeddings,
    )


def resolve_backbone(name: str | None, command: str) -> str:
    """``name``, or the default backbone; says on stderr which one is used and why."""
    chosen, why = choose_backbone(name)
    if dist.is_main_env():
        print(f"unseg {command}: {why}", file=sys.stderr)
    return chosen


def finish(report: BatchReport, where: str) -> int:
    """Print a one-line summary of a batch of masks and its failures; return 0, or 1 if any
    input failed."""
    if not dist.is_main_env():
        return 0 if report.ok else 1
    print(f"{len(report.written)} mask(s) written to {where}; {len(report.failed)} input(s) failed")
    for path, problem in report.failed:
        print(f"failed: {path}: {problem}", file=sys.stderr)
    return 0 if report.ok else 1
