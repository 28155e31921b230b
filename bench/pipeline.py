"""Benchmark the pipelines against their physical floor: `segment` and `discover` beside
`unseg features` on the same images, total seconds and seconds per stage, in one run.

Runs, one after the other in this process, each into a fresh folder (no cache shared):
``features`` (what `unseg features` does: list, hash, decode, backbone, cache), ``segment`` with
PriMaPs-EM and with k-means (K classes, the default refinement unless ``--refine``), ``discover``
(spectral, guided filter; unless ``--no-discover``), then ``features`` again (the better of the
two is the ``features`` figure, so warm-up costs do not count against it), and each method's
own floor: the extraction with the extras its defaults need — k-means the image and its mirror
(``features`` + flip), PriMaPs-EM the image, its mirror and the student view (three images
through the backbone per image). Per run: total seconds, seconds per stage (decode, backbone,
proposals, fitting, predicting, refinement, writing; the run's own record), total /
``features`` and total / its own floor, and issue 19's targets (PriMaPs-EM and k-means at most
1.5x their own floor on the 217 VOC2012 images; PriMaPs-EM at most 4x ``features`` on a
40-image folder) with whether this run met them. When the images are a VOC root the
segmentations are scored (Hungarian mIoU and pixel accuracy against the ground truth of the
images used). ``--device cuda`` runs every step on the GPU (each timed step ends by writing
its results to disk, so the host waits for the device inside it). Prints JSON.

Usage: python bench/pipeline.py [--images ../shared/data/VOC2012] [--max-images N]
       [--num-classes 21] [--backbone efficientnet_lite0] [--refine crf] [--workers N]
       [--no-discover] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from _machine import add_allocator_option, keep_memory_as_the_command, machine
from _scratch import scratch_folder

from unseg.backbones import create_backbone
from unseg.data.datasets import dataset_images
from unseg.data.layouts import find_layout
from unseg.errors import UnsegError
from unseg.features import extract_features
from unseg.pipelines.backbone import resolve_backbone_name
from unseg.pipelines.evaluate import evaluate_semantic
from unseg.pipelines.folder import discover, segment
from unseg.pipelines.kind import Settings
from unseg.refine.semantic import DEFAULT_REFINE, REFINES
from unseg.utils.device import resolve_device
from unseg.utils.timing import Timings

REPO = Path(__file__).resolve().parents[1]
VOC2012 = REPO.parent / "shared" / "data" / "VOC2012"


def _link_images(paths: list[Path], folder: Path) -> Path:
    """A folder of links to ``paths`` (names kept): the commands take folders."""
    folder.mkdir(parents=True)
    for p in paths:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def _ground_truth(root: Path, stems: list[str], folder: Path) -> Path | None:
    """A folder of links to the semantic ground truth of ``stems``, when ``root`` has one."""
    layout = find_layout(root, "semantic")
    if layout is None:
        return None
    folder.mkdir(parents=True)
    for s in stems:
        (folder / f"{s}{layout.gt_suffix}").symlink_to(layout.gt_path / f"{s}{layout.gt_suffix}")
    return folder


def _features(
    images: Path, out: Path, backbone: str, device: str, extras: tuple[str, ...] = ()
) -> dict[str, Any]:
    timings = Timings()
    start = time.perf_counter()
    model = create_backbone(backbone, device=device)
    extract_features(dataset_images(images), model, cache_dir=out, timings=timings, extras=extras)
    return {"seconds": round(time.perf_counter() - start, 3), "stages": timings.as_dict()}


def _segment(
    images: Path, out: Path, method: str, k: int, settings: Settings,
    gt: Path | None,
) -> dict[str, Any]:
    start = time.perf_counter()
    report = segment(images, out, method, k, settings=settings)
    seconds = time.perf_counter() - start
    meta = json.loads((out / "run" / "config.json").read_text())
    result: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "stages": meta["timings"],
        "masks": len(report.written),
        "failed": len(report.failed),
        "refine": meta["predict"]["refine"],
    }
    if gt is not None:
        scores = evaluate_semantic(out / "masks", gt, num_classes=k)
        result.update(miou=round(scores.miou, 4), acc=round(scores.acc, 4))
    return result


def _discover(images: Path, out: Path, backbone: str, device: str) -> dict[str, Any]:
    timings = Timings()
    start = time.perf_counter()
    report = discover(images, out, "spectral", settings=Settings(backbone=backbone, device=device),
                      timings=timings)
    return {"seconds": round(time.perf_counter() - start, 3), "stages": timings.as_dict(),
            "masks": len(report.written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(VOC2012), help="dataset root or image folder")
    parser.add_argument("--max-images", type=int, default=None, help="the first N images only")
    parser.add_argument("--num-classes", "-k", type=int, default=21)
    parser.add_argument("--backbone", default=None, help="default: unseg's default backbone")
    parser.add_argument("--refine", choices=REFINES, default=DEFAULT_REFINE)
    parser.add_argument("--workers", type=int, default=None, help="refinement threads")
    parser.add_argument("--no-discover", action="store_true", help="skip the discover run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    add_allocator_option(parser)
    args = parser.parse_args()
    kept = keep_memory_as_the_command(args)
    try:  # the library's own check: no CUDA build, no GPU, no such index
        resolve_device(args.device)
    except UnsegError as exc:
        raise SystemExit(f"bench/pipeline.py: {exc}") from None
    args.backbone = resolve_backbone_name(args.backbone)
    root = Path(args.images).resolve()  # the links to its ground truth must not be relative
    paths = dataset_images(root)[: args.max_images]
    with scratch_folder(None, "unseg-bench-pipeline-") as work:
        images = _link_images(paths, work / "images")
        gt = _ground_truth(root, [p.stem for p in paths], work / "gt")
        settings = Settings(backbone=args.backbone, refine=args.refine, device=args.device,
                            num_workers=args.workers)
        load_before = os.getloadavg()
        runs: dict[str, Any] = {}
        first = _features(images, work / "features-1", args.backbone, args.device)
        for method in ("primaps-em", "kmeans"):
            runs[f"segment {method}"] = _segment(images, work / method, method, args.num_classes,
                                                 settings, gt)
        if not args.no_discover:
            runs["discover spectral"] = _discover(images, work / "discover", args.backbone,
                                                  args.device)
        second = _features(images, work / "features-2", args.backbone, args.device)
        floor = min(first, second, key=lambda r: r["seconds"])
        # each method's own floor: what its defaults cannot do without, in one batched forward
        floors = {
            "segment kmeans": _features(images, work / "floor-kmeans", args.backbone, args.device,
                                        ("flipped", "image")),
            "segment primaps-em": _features(images, work / "floor-primaps", args.backbone,
                                            args.device, ("flipped", "image", "student")),
        }
    for name, run in runs.items():
        run["over_features"] = round(run["seconds"] / floor["seconds"], 2)
        if name in floors:
            run["over_own_floor"] = round(run["seconds"] / floors[name]["seconds"], 2)
    em, km = runs["segment primaps-em"], runs["segment kmeans"]
    n = len(paths)

    def target(ratio: float, bound: float, folder: int) -> dict[str, Any]:
        return {"ratio": ratio, "met": ratio <= bound, "applies_to_this_run": n == folder}

    targets = {  # the targets, each set for one folder size
        "primaps-em <= 1.5x its own floor (217 VOC2012 images)":
            target(em["over_own_floor"], 1.5, 217),
        "kmeans <= 1.5x its own floor (217 VOC2012 images)": target(km["over_own_floor"], 1.5, 217),
        "primaps-em <= 4x features (the 40-image folder)": target(em["over_features"], 4.0, 40),
    }
    print(json.dumps({
        "benchmark": f"pipeline stages vs `unseg features` on the same images ({args.device})",
        "images": {"from": str(root), "count": len(paths)},
        "num_classes": args.num_classes,
        "backbone": args.backbone,
        "allocator_keeps_freed_memory": kept,
        "targets": targets,
        "features": {"seconds": floor["seconds"], "stages": floor["stages"],
                     "runs_seconds": [first["seconds"], second["seconds"]]},
        "own_floors": floors,
        "runs": runs,
        "machine": {**machine(args.device),
                    "load_average_before": [round(v, 2) for v in load_before]},
    }, indent=2))


if __name__ == "__main__":
    main()
