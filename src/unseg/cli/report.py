"""`unseg report RUN_OR_OUTPUT_DIR`: an HTML page about a run, or (``--format coco``) its masks
as COCO-style results JSON with RLE masks."""

from __future__ import annotations

import argparse
import time

from unseg.layout import REPORT_FILE
from unseg.outdir import record_written
from unseg.report.coco import COCO_FILE, write_coco
from unseg.report.html import DEFAULT_MAX_IMAGES, write_report
from unseg.report.outputs import find_outputs


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    p = sub.add_parser(
        "report",
        help="a self-contained HTML report of a run (gallery, metrics, charts, configuration), "
        "or --format coco: COCO results JSON with RLE masks",
    )
    p.add_argument(
        "path", metavar="RUN_OR_OUTPUT_DIR",
        help="output folder of segment/discover/predict, or a run folder",
    )
    p.add_argument(
        "--format", choices=["html", "coco"], default="html",
        help=f"html: the report page (default, OUT/{REPORT_FILE}); coco: COCO results JSON, one "
        f"RLE mask per image and cluster or object (OUT/{COCO_FILE})",
    )
    p.add_argument("--out", default=None, metavar="FILE", help="where to write (default above)")
    p.add_argument(
        "--images", default=None, metavar="DIR",
        help="the original images (default: the folder the run records, if any)",
    )
    p.add_argument(
        "--run", default=None, metavar="DIR",
        help="the run folder that made the masks, when it is not inside the folder "
        "(`unseg predict RUN IMAGES --out DIR`)",
    )
    p.add_argument(
        "--gt", default=None, metavar="DIR",
        help="ground truth (label or mask PNGs, or a dataset root): adds metrics and charts",
    )
    p.add_argument(
        "--annotations", default=None, metavar="DIR",
        help="VOC XML annotations (or a VOC root): adds CorLoc of the boxes",
    )
    p.add_argument(
        "--num-classes", type=int, default=None,
        help="ground-truth classes K (default: the dataset's, else the largest label + 1)",
    )
    p.add_argument(
        "--match", choices=["pixels", "iou"], default="pixels",
        help="Hungarian matching on pixel counts (default) or IoU",
    )
    p.add_argument(
        "--max-images", type=int, default=DEFAULT_MAX_IMAGES,
        help=f"images shown in the gallery, evenly spread over the run (default "
        f"{DEFAULT_MAX_IMAGES})",
    )
    p.add_argument(
        "--max-pixels", type=int, default=None, metavar="N",
        help="accept images and masks of up to N pixels (default: the --max-pixels the "
        "folder's command was given, else Pillow's decompression-bomb limit; 0: no limit)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.format == "coco":
        path = write_coco(args.path, out=args.out, max_pixels=args.max_pixels)
        record_written(find_outputs(args.path).output_dir, path)
        print(f"unseg report: COCO results written to {path}, in "
              f"{time.perf_counter() - started:.1f} s")
        return 0
    path = write_report(
        args.path,
        images=args.images,
        gt=args.gt,
        annotations=args.annotations,
        run=args.run,
        out=args.out,
        num_classes=args.num_classes,
        match=args.match,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
    )
    record_written(find_outputs(args.path, args.images, args.run).output_dir, path)
    print(f"unseg report: report written to {path}, in {time.perf_counter() - started:.1f} s")
    return 0
