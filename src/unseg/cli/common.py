"""Arguments and messages shared by the commands: backbone choice, batch summaries."""

from __future__ import annotations

import argparse
import sys

from unseg.pipelines.backbone import choose_backbone
from unseg.utils import dist
from unseg.utils.batch import BatchReport


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """``--backbone`` (default announced on stderr) and ``--weights``."""
    p.add_argument("--backbone", default=None, help="backbone name (default: see stderr)")
    p.add_argument(
        "--weights",
        default=None,
        help="backbone weights file, .pth or .safetensors (default: packaged or cached weights)",
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
