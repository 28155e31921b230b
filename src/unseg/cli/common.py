"""Arguments and messages shared by the commands: backbone choice, semantic pipeline settings,
the output folder (refused, resumed or overwritten; its manifest), the report written at the end,
the completion line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unseg.data.datasets import dataset_images
from unseg.data.image import DEFAULT_MAX_PIXELS
from unseg.data.resize import MAX_SIDE_FACTOR
from unseg.errors import UnsegError
from unseg.layout import MANIFEST_FILE
from unseg.outdir import Mode, recorded
from unseg.pipelines.backbone import MAX_SIZE, check_resolution, choose_backbone
from unseg.pipelines.kind import DEFAULT_SIZE, Settings
from unseg.refine.semantic import DEFAULT_PSEUDO_REFINE, DEFAULT_REFINE, REFINES
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.timing import log_totals

logger = logging.getLogger(__name__)

# what does not change a command's outputs, left out of the settings --resume compares
NOT_SETTINGS = frozenset(
    {"func", "command", "spec_name", "out", "verbose", "quiet", "overwrite", "resume", "report",
     "gt", "workers"}
)
INPUT_ARGUMENTS = frozenset({"images", "data"})  # the positional arguments naming the images
# settings naming files or folders: compared as absolute paths
PATH_SETTINGS = frozenset(
    {"images", "data", "run", "train_images", "saliency", "cache_dir", "weights", "embeddings"}
)


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
        help="the backbone's feature tap (default: its registered default, except that spectral "
        "discovery and the FOUND-style head take s16+s32 where the backbone has it, measured "
        "better for them; `unseg backbones` lists them); recorded in runs",
    )


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")


def add_image_arguments(p: argparse.ArgumentParser, max_side: bool = True) -> None:
    """``--max-side`` (the working resolution's long side; left out where a run fixes it) and
    ``--max-pixels`` (the per-file pixel limit), for the commands that read images."""
    if max_side:
        p.add_argument(
            "--max-side", type=int, default=None, metavar="PIXELS",
            help=f"long side of the working resolution at which features, proposals and "
            f"refinement run (default {MAX_SIDE_FACTOR} x --size, 1280 at 320; 0: no limit); "
            "panoramas get a shorter short side; masks are still written at the input's size",
        )
    p.add_argument(
        "--max-pixels", type=int, default=None, metavar="N",
        help=f"accept images of up to N pixels (default Pillow's decompression-bomb limit, "
        f"{DEFAULT_MAX_PIXELS}; 0: no limit); larger files are reported and skipped",
    )


def add_semantic_arguments(p: argparse.ArgumentParser) -> None:
    """The semantic pipeline's own options (``unseg fit`` of a semantic method, ``segment``)."""
    p.add_argument(
        "--size", type=int, default=None,
        help=f"feature short side in pixels ({DEFAULT_SIZE}; 2 x the backbone's stride to "
        f"{MAX_SIZE})",
    )
    add_image_arguments(p)
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
    p.add_argument(
        "--workers", type=int, default=None,
        help="threads for the PriMaPs pseudo-labels and the CRF refinement (images at once)",
    )
    p.add_argument(
        "--cache-dir", default=None,
        help="feature and pseudo-label cache, shareable between runs; its features/ is what "
        "`unseg features --out CACHE_DIR/features` writes (default: RUN/cache)",
    )
    add_device_argument(p)


# Settings fields and the argument each comes from (where the command has it)
_SETTINGS_ARGS = {
    "weights": "weights", "tap": "tap", "size": "size", "label_factor": "label_factor",
    "refine": "refine", "pseudo_refine": "pseudo_refine", "seed": "seed", "device": "device",
    "num_workers": "workers", "cache_dir": "cache_dir", "embeddings": "embeddings",
    "max_side": "max_side", "max_pixels": "max_pixels", "saliency": "saliency",
    "discover": "discover",
}


def run_settings(args: argparse.Namespace, command: str) -> Settings:
    """The pipeline's :class:`Settings` from the options the command has; the backbone choice is
    announced on stderr (with ``--embeddings`` the embedding run's backbone is used instead);
    ``--size`` and ``--max-side`` are checked where the command sets the feature size
    (:func:`check_resolution`)."""
    embeddings = getattr(args, "embeddings", None)
    backbone = args.backbone if embeddings else resolve_backbone(args.backbone, command)
    values = {name: getattr(args, arg) for name, arg in _SETTINGS_ARGS.items()
              if getattr(args, arg, None) is not None}
    settings = Settings(backbone=backbone, **values)
    if not embeddings and hasattr(args, "size"):
        check_resolution(settings.feature_size, settings.max_side, backbone, settings.tap)
    return settings


def resolve_backbone(name: str | None, command: str) -> str:
    """``name``, or the default backbone; says on stderr which one is used and why."""
    chosen, why = choose_backbone(name)
    if dist.is_main_env():
        print(f"unseg {command}: {why}", file=sys.stderr)
    return chosen


def add_output_arguments(p: argparse.ArgumentParser, report: bool) -> None:
    """``--overwrite`` / ``--resume`` for a command's ``--out``; with ``report``, ``--no-report``
    and ``--gt`` for the report written at the end."""
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument(
        "--overwrite", action="store_true",
        help=f"--out holds an earlier unseg command's outputs: replace them (only the files "
        f"its {MANIFEST_FILE} records; they are deleted when this command ends, and put back "
        "if it fails)",
    )
    reuse.add_argument(
        "--resume", action="store_true",
        help="--out holds the outputs of this same command and configuration (e.g. killed "
        "midway): continue, reusing what is finished",
    )
    if report:
        p.add_argument("--no-report", dest="report", action="store_false",
                       help="do not write OUT/report.html at the end")
        p.add_argument(
            "--gt", default=None, metavar="DIR",
            help="ground truth (label or mask PNGs, or a dataset root) for the report's "
            "metrics and charts",
        )


def _flag(dest: str) -> str:
    return "--" + dest.removeprefix("cfg__").replace("__", "-").replace("_", "-")


def command_settings(args: argparse.Namespace, positional: Sequence[str]) -> dict[str, Any]:
    """The options of ``args`` that shape the outputs, by name (``positional`` ones bare, the
    others as ``--flag``), paths made absolute: what ``--resume`` compares."""
    settings: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in NOT_SETTINGS or callable(value):
            continue
        if dest in PATH_SETTINGS and value is not None:
            value = os.path.realpath(value)  # Path.resolve raises on a link loop
        settings[dest if dest in positional else _flag(dest)] = (
            list(value) if isinstance(value, tuple) else value
        )
    return dict(sorted(settings.items()))


@dataclass
class Outcome:
    """What a command did: its completion text (what and where, without the time), its exit
    status, the inputs that failed, how to write its report (None: no report) and the method
    it chose, where the command chooses it (``discover --method auto``; recorded for the
    report)."""

    summary: str
    code: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    report: Callable[[], Path] | None = None
    method: str | None = None


def batch_outcome(report: BatchReport, where: str, what: str,
                  write_report: Callable[[], Path] | None = None) -> Outcome:
    """The :class:`Outcome` of a batch of masks: ``what`` (e.g. the method), the number of
    masks written to ``where``, the failures; exit status 1 if any input failed."""
    summary = (f"{what}, {len(report.written)} mask(s) written to {where}, "
               f"{len(report.failed)} input(s) failed")
    return Outcome(summary, 0 if report.ok else 1, list(report.failed), write_report)


def _write_report(write: Callable[[], Path]) -> Path | None:
    """The report's path, or None (logged as a warning) when it could not be written: the
    report never fails the command."""
    try:
        return write()
    except Exception as exc:  # any failure of the report is reported, never raised
        logger.warning("report not written: %s", exc)
        return None


def read_paths(args: argparse.Namespace) -> list[Path]:
    """The files and folders a command reads (its inputs, run, weights, ground truth): what
    ``--overwrite`` must not delete. The feature cache is not one: it is rebuilt."""
    names = (PATH_SETTINGS - {"cache_dir"}) | {"gt"}
    return [Path(v) for name in sorted(names) if (v := getattr(args, name, None)) is not None]


def run_into_output(
    args: argparse.Namespace,
    command: str,
    positional: Sequence[str],
    work: Callable[[], Outcome],
) -> int:
    """Run ``work`` as ``unseg command`` writing into ``args.out``: the folder is claimed and
    recorded in its manifest (:mod:`unseg.outdir`; ``--resume`` / ``--overwrite``), the report
    written at the end unless ``--no-report``, the stage timings logged at INFO, and one
    completion line printed (failures on stderr before it). Other torchrun ranks only work."""
    if not dist.is_main_env():
        return work().code
    if getattr(args, "gt", None) is not None and not Path(args.gt).exists():
        raise UnsegError(f"{args.gt}: no such ground-truth folder (--gt)")
    for name in INPUT_ARGUMENTS.intersection(positional):
        dataset_images(getattr(args, name))  # a typo or an empty folder: before --overwrite
    mode: Mode = "overwrite" if args.overwrite else "resume" if args.resume else "new"
    with recorded(args.out, command, command_settings(args, positional), mode,
                  sys.argv, reads=read_paths(args)) as record:
        outcome = work()
        record.record_outcome(outcome.failed, outcome.method)
        page = None
        if outcome.report is not None and getattr(args, "report", False):
            page = _write_report(outcome.report)
        record.exit_code = outcome.code
    log_totals(record.timings, f"unseg {command}")
    for path, problem in outcome.failed:
        print(f"failed: {path}: {problem}", file=sys.stderr)
    tail = f"; report {page}" if page is not None else ""
    print(f"unseg {command}: {outcome.summary}, in {record.seconds:.1f} s{tail}")
    return outcome.code
