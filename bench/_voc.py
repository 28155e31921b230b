"""The VOC segmentation set of the benchmark scripts that read one: VOC2012's place beside the
repo (``../shared/data/VOC2012``), the ``--voc`` option naming it, and its samples, or the
script's exit with a "skipped: ..." line when the real data is absent.

Imported by the scripts as ``from _voc import ...`` (``python bench/x.py`` puts ``bench/``
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unseg.data.datasets import layout_pairs
from unseg.data.layouts import DatasetLayout, find_layout

VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "VOC2012"


def add_voc_argument(parser: argparse.ArgumentParser) -> None:
    """``--voc ROOT``, by default :data:`VOC`."""
    parser.add_argument("--voc", default=str(VOC), help="VOC root (default ../shared/data/VOC2012)")


def voc_pairs(root: str | Path) -> tuple[DatasetLayout, list[tuple[str, Path, Path]]]:
    """The semantic layout found at ``root`` and its ``(stem, image, label)`` samples; exits
    the script with "skipped: ..." when there is none (the real data is absent)."""
    layout = find_layout(root, "semantic")
    if layout is None:
        sys.exit(f"skipped: no VOC segmentation layout at {root} (the real data is absent)")
    return layout, layout_pairs(layout)
