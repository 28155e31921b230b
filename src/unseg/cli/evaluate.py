"""`unseg evaluate semantic|saliency|corloc`: score prediction files against ground truth."""

from __future__ import annotations

import argparse
import math
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from unseg.data.image import max_pixels_default
from unseg.metrics.saliency import BETA2, FOUND_BETA2
from unseg.outdir import recorded_max_pixels
from unseg.pipelines.evaluate import evaluate_corloc, evaluate_saliency, evaluate_semantic
from unseg.utils.io import write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` with the subcommands ``semantic``, ``saliency`` and ``corloc``."""
    p = sub.add_parser("evaluate", help="score predictions against ground truth (values in [0, 1])")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    sem = tasks.add_parser(
        "semantic", help="Hungarian-matched pixel accuracy and mIoU (STEGO/PriMaPs protocol)"
    )
    _common(sem, "ground-truth label PNGs, or a dataset root (e.g. VOCdevkit/VOC2012, "
            "STEGO's potsdam folder)")
    sem.add_argument(
        "--num-classes", "-k", type=int, default=None,
        help="number of classes K (default: the dataset layout's, e.g. 21 for VOC)",
    )
    sem.add_argument(
        "--ignore-index", type=int, default=255,
        help="ground-truth label to skip (255; CamVid: 11); a predicted 255 (no label) counts "
        "as wrong, whatever this is",
    )
    sem.add_argument(
        "--match", choices=["pixels", "iou"], default="pixels",
        help="Hungarian on pixel counts (STEGO/PriMaPs, default) or on IoU (MaskContrast)",
    )
    sem.set_defaults(func=_semantic)

    sal = tasks.add_parser("saliency", help="Acc, IoU, maxFβ and MAE of 8-bit saliency maps")
    _common(sal, "ground-truth mask PNGs, or a dataset root (ECSSD, DUTS-TE, DUT-OMRON)")
    sal.add_argument(
        "--fbeta-mode", choices=["curve", "image-mean"], default="curve",
        help="maxFβ of the mean P/R curve (SOD literature, default) or of per-image F "
        "(Boosting code)",
    )
    sal.add_argument(
        "--beta2", type=float, default=BETA2,
        help=f"β² of Fβ (default {BETA2}; {FOUND_BETA2} reproduces the FOUND/SelfMask code)",
    )
    sal.set_defaults(func=_saliency)

    cor = tasks.add_parser("corloc", help="CorLoc of one box per image against VOC boxes")
    cor.add_argument(
        "--pred", required=True,
        help="folder of masks (PNG), or boxes.json (or a folder holding it) mapping image stem "
        "to [x0, y0, x1, y1]",
    )
    cor.add_argument(
        "--annotations", required=True,
        help="folder of VOC XML files (sub-folders included), or a VOC root (e.g. "
        "VOCdevkit/VOC2007)",
    )
    _options(cor)
    cor.set_defaults(func=_corloc)


def _common(p: argparse.ArgumentParser, gt_help: str) -> None:
    p.add_argument("--pred", required=True, help="folder of prediction PNGs, matched by stem")
    p.add_argument("--gt", required=True, help=gt_help)
    _options(p)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    p.add_argument(
        "--max-pixels", type=int, default=None, metavar="N",
        help="accept predictions and ground truth of up to N pixels (default: the --max-pixels "
        "the command that wrote --pred was given, else Pillow's decompression-bomb limit; 0: "
        "no limit)",
    )
    p.add_argument(
        "--allow-missing", action="store_true",
        help="score even if predictions are missing or unusable: they count as wrong and are "
        "reported (exit status 1)",
    )


def _pixel_limit(args: argparse.Namespace) -> AbstractContextManager[None]:
    """The per-file pixel limit for the files read: ``--max-pixels``, else the one the
    command that wrote ``--pred`` was given (its manifest)."""
    given = args.max_pixels
    pred = Path(args.pred)
    return max_pixels_default(given if given is not None or not pred.is_dir()
                              else recorded_max_pixels(pred))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _finish(
    args: argparse.Namespace, result: Any, rows: list[tuple[str, Any]], started: float
) -> int:
    """Print the table of ``rows`` and the completion line; write ``--json``."""
    data = result.to_dict()
    if result.dataset:
        rows.insert(0, ("dataset", result.dataset))
    rows += [("images", result.n_images), ("missing", result.n_missing)]
    if result.n_extra:
        rows.append(("extra (ignored)", result.n_extra))
    width = max(len(name) for name, _ in rows)
    print(f"unseg evaluate {args.task}")
    for name, value in rows:
        print(f"  {name:<{width}}  {_fmt(value)}")
    if args.json:
        write_json_atomic(args.json, _json_safe(data))
    saved = f", results in {args.json}" if args.json else ""
    print(f"unseg evaluate {args.task}: {result.n_images} image(s) scored, {result.n_missing} "
          f"missing{saved}, in {time.perf_counter() - started:.1f} s")
    return 1 if result.n_missing else 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _semantic(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _pixel_limit(args):
        r = evaluate_semantic(
            args.pred, args.gt, num_classes=args.num_classes, ignore_index=args.ignore_index,
            match=args.match, allow_missing=args.allow_missing,
        )
    rows: list[tuple[str, Any]] = [
        ("pixel acc", r.acc), ("mIoU", r.miou), ("match", r.match), ("classes", r.num_classes),
    ]
    names = r.class_names or [str(c) for c in range(r.num_classes)]
    rows += [
        (f"IoU {name}", "absent" if v is None else v)
        for name, v in zip(names, r.per_class_iou, strict=True)
    ]
    return _finish(args, r, rows, started)


def _saliency(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _pixel_limit(args):
        r = evaluate_saliency(
            args.pred, args.gt, fbeta_mode=args.fbeta_mode, beta2=args.beta2,
            allow_missing=args.allow_missing,
        )
    rows: list[tuple[str, Any]] = [
        ("maxFβ", r.max_fbeta), ("IoU", r.iou), ("Acc", r.acc), ("MAE", r.mae),
        ("Fβ mode", r.fbeta_mode), ("β²", r.beta2),
    ]
    return _finish(args, r, rows, started)


def _corloc(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _pixel_limit(args):
        r = evaluate_corloc(args.pred, args.annotations, allow_missing=args.allow_missing)
    rows: list[tuple[str, Any]] = [("CorLoc", r.corloc), ("correct", r.n_correct),
                                   ("boxes from", r.source)]
    return _finish(args, r, rows, started)
