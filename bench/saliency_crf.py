"""A 2-label dense CRF on the saliency masks, against the guided filter, label-free.

Each image's foreground probability ``p [H, W]`` (at the image's size) is refined by

- ``none``: as it is;
- ``gf``: the guided filter, as ``unseg discover`` runs it (``GuidedFilterConfig()``);
- ``crf <name>``: the 2-label dense CRF of :mod:`unseg.refine.saliency_crf` (``unseg discover
  --dense-crf``: unary from ``p`` clipped to ``[eps, 1 − eps]``, foreground logit
  ``logit(p) / T``, background 0; pairwise on the RGB image; the foreground marginal is the
  refined map), at the image's size. The settings (:data:`SETTINGS`) are fixed here, not tuned
  per set;
- ``crf <name> kept``: the same, with the unrefined map kept where the CRF erased the object (no
  pixel at 0.5 or above left; :func:`unseg.pipelines.saliency.unless_erased`, as the pipeline
  now refines; its seconds are the check's alone).

Sources of ``p`` (``--source``):

- ``found``: FOUND's pseudo-masks before any training (cosine similarity to the border seed
  ≤ ``--threshold``, 0.2: the CNN default), the 0/1 patch mask upsampled (nearest), as
  ``bench/found_threshold.py`` scores them;
- ``spectral``: the training-free TokenCut mask, as ``unseg discover --method spectral`` makes it
  (nearest);
- ``masks``: the 8-bit probability maps a prediction wrote (``--saliency-masks DIR`` for ECSSD,
  ``--corloc-masks DIR`` for VOC2007; e.g. the unfiltered ``found`` rows of
  ``bench/boosting_ablation.py``), named ``<stem>.png``; given several folders, their mean
  (e.g. a trained head's maps and the FOUND pseudo-masks that ``--save-source`` wrote).

``--save-source DIR`` writes each image's unrefined ``p`` to ``DIR/<task>/<stem>.png`` (8-bit).

Scores: ECSSD (first ``--ecssd N``): IoU (p > 0.5), Acc, maxFβ (β² = 0.3, curve mode) of the 8-bit
map with :class:`unseg.metrics.saliency.SaliencyMeter`; VOC2007 (first ``--voc N``): CorLoc of
the largest 4-connected component of the 8-bit map ≥ 128, as ``unseg evaluate corloc``.
``fg``: the mean share called foreground; ``s_per_image`` / ``cpu_s_per_image``: the
refinement's mean wall / CPU seconds per image (one torch thread; wall time grows with the
machine's load, CPU time much less). Prints JSON.

    python bench/saliency_crf.py --source found --ecssd 300 --voc 422
    python bench/saliency_crf.py --source masks --ecssd 1000 --voc 0 \
        --saliency-masks RUN/seed0/saliency/found/masks
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine
from PIL import Image

from unseg.backbones import create_backbone
from unseg.data.image import list_images, load_image
from unseg.data.resize import prepare_image
from unseg.data.voc import parse_voc_xml
from unseg.methods.found import background_seed, background_similarity
from unseg.metrics.corloc import is_correct, largest_component_box
from unseg.metrics.saliency import SaliencyMeter, binarize_gt
from unseg.pipelines.saliency import _refine, eight_bit, unless_erased
from unseg.proposals.spectral import SpectralConfig, ncut_bipartition
from unseg.refine.guided_filter import GuidedFilterConfig
from unseg.refine.saliency_crf import SaliencyCRFConfig, crf_foreground

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


SEM = dict(gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
           bilateral_compat=4)  # the semantic CRF's kernels (CRFConfig())
PYD = dict(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13,
           bilateral_compat=10)  # pydensecrf's example, the one SelfMask-style code uses
SETTINGS = {  # eps 0.05 in all; "pyd T1" became the library's default (SaliencyCRFConfig())
    "sem T1": SaliencyCRFConfig(temperature=1.0, **SEM),
    "sem T2": SaliencyCRFConfig(temperature=2.0, **SEM),
    "sem srgb13": SaliencyCRFConfig(temperature=1.0, **{**SEM, "bilateral_srgb": 13}),
    "pyd T1": SaliencyCRFConfig(temperature=1.0, **PYD),
    "pyd T2": SaliencyCRFConfig(temperature=2.0, **PYD),
}


def to8(prob: torch.Tensor) -> np.ndarray:
    """``[H, W]`` probability → uint8, as the pipeline writes its masks."""
    return eight_bit(prob).numpy()


@torch.inference_mode()
def source_fn(name: str, backbone, size: int, threshold: float
              ) -> Callable[[Path, np.ndarray], torch.Tensor]:
    """``(path, image [H, W, 3]) → p [H, W]`` for a feature source (``found``, ``spectral``)."""

    def prob(path: Path, image: np.ndarray) -> torch.Tensor:
        x = prepare_image(image, size, backbone.stride)[None]
        feats = backbone.forward_features(x, "keys").float()
        if name == "found":
            sim = background_similarity(feats, background_seed(feats))[0]
            m = (sim <= threshold).float()
        else:
            m = torch.from_numpy(ncut_bipartition(feats[0], SpectralConfig()).mask.astype(
                np.float32))
        return F.interpolate(m[None, None], size=image.shape[:2], mode="nearest")[0, 0]

    return prob


def masks_fn(folders: list[Path]) -> Callable[[Path, np.ndarray], torch.Tensor]:
    """``(path, image) → p [H, W]``: the mean of ``folder/<stem>.png`` (8-bit) over ``folders``."""

    def prob(path: Path, image: np.ndarray) -> torch.Tensor:
        maps = []
        for folder in folders:
            m = np.asarray(Image.open(folder / f"{path.stem}.png").convert("L"))
            if m.shape != image.shape[:2]:
                raise SystemExit(f"{folder / path.stem}: mask {m.shape} against image "
                                 f"{image.shape[:2]}")
            maps.append(m.astype(np.float32) / 255.0)
        return torch.from_numpy(np.mean(maps, axis=0))

    return prob


def saving(prob: Callable[[Path, np.ndarray], torch.Tensor], folder: Path
           ) -> Callable[[Path, np.ndarray], torch.Tensor]:
    """``prob`` that also writes each map to ``folder/<stem>.png`` (8-bit)."""
    folder.mkdir(parents=True, exist_ok=True)

    def saved(path: Path, image: np.ndarray) -> torch.Tensor:
        p = prob(path, image)
        Image.fromarray(to8(p)).save(folder / f"{path.stem}.png")
        return p

    return saved


def score(paths: list[Path], prob: Callable[[Path, np.ndarray], torch.Tensor],
          settings: list[str], task: str, voc_root: Path | None = None) -> dict:
    """Every refinement's scores over ``paths`` for ``task`` (``saliency`` or ``corloc``)."""
    names = ["none", "gf", *(n for s in settings for n in (f"crf {s}", f"crf {s} kept"))]
    meters = {n: SaliencyMeter() for n in names}
    hits: dict[str, list[float]] = {n: [] for n in names}
    fg: dict[str, list[float]] = {n: [] for n in names}
    secs: dict[str, float] = dict.fromkeys(names, 0.0)
    cpu: dict[str, float] = dict.fromkeys(names, 0.0)
    gt_dir = DATA / "ECSSD" / "ground_truth_mask"
    for path in paths:
        image = load_image(path)
        p = prob(path, image)
        crf_maps: dict[str, torch.Tensor] = {}
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            if n == "none":
                q = p
            elif n == "gf":
                q = _refine(p, image, GuidedFilterConfig())
            elif n.endswith(" kept"):
                q = unless_erased(crf_maps[n[:-5]], p)
            else:
                q = crf_maps[n] = crf_foreground(p, image, SETTINGS[n[4:]])
            secs[n] += time.perf_counter() - t0
            cpu[n] += time.process_time() - c0
            m8 = to8(q)
            fg[n].append(float((m8 >= 128).mean()))
            if task == "saliency":
                gt = binarize_gt(np.asarray(Image.open(gt_dir / f"{path.stem}.png").convert("L")))
                meters[n].update(m8, gt)
            else:
                assert voc_root is not None
                _, boxes, _ = parse_voc_xml(voc_root / "Annotations" / f"{path.stem}.xml")
                hits[n].append(float(is_correct(largest_component_box(m8 >= 128), boxes)))
    out = {}
    for n in names:
        row: dict[str, float] = {"fg": round(100 * float(np.mean(fg[n])), 1),
                                 "s_per_image": round(secs[n] / len(paths), 4),
                                 "cpu_s_per_image": round(cpu[n] / len(paths), 4)}
        if task == "saliency":
            s = meters[n].scores()
            row.update(iou=round(100 * s.iou, 2), acc=round(100 * s.acc, 2),
                       max_fbeta=round(100 * s.max_fbeta, 2))
        else:
            row["corloc"] = round(100 * float(np.mean(hits[n])), 2)
        out[n] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=["found", "spectral", "masks"], default="found")
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--tap", default="s16+s32")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--threshold", type=float, default=0.2, help="found: background threshold")
    ap.add_argument("--ecssd", type=int, default=300, help="first N ECSSD images (0: skip)")
    ap.add_argument("--voc", type=int, default=422, help="first N VOC2007 images (0: skip)")
    ap.add_argument("--saliency-masks", type=Path, nargs="+",
                    help="masks: the ECSSD maps' folder (several: their mean)")
    ap.add_argument("--corloc-masks", type=Path, nargs="+",
                    help="masks: the VOC2007 maps' folder (several: their mean)")
    ap.add_argument("--save-source", type=Path, help="write the unrefined maps here")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: no shared data beside the repository; nothing to score")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                    "settings": {k: vars(v) for k, v in SETTINGS.items()
                                 if k in args.settings}}
    backbone = None
    if args.source != "masks":
        backbone = create_backbone(args.backbone, tap=args.tap)
    voc_root = DATA / "VOC2007" / "VOCdevkit" / "VOC2007"
    for task, n, folder, images in (
        ("saliency", args.ecssd, args.saliency_masks, DATA / "ECSSD" / "images"),
        ("corloc", args.voc, args.corloc_masks, voc_root / "JPEGImages"),
    ):
        if not n:
            continue
        if args.source == "masks":
            if folder is None:
                raise SystemExit(f"--source masks needs the {task} masks' folder")
            prob = masks_fn(folder)
        else:
            prob = source_fn(args.source, backbone, args.size, args.threshold)
        if args.save_source is not None:
            prob = saving(prob, args.save_source / task)
        paths = list_images(images)[:n]
        t0 = time.perf_counter()
        result[task] = {"images": len(paths), "rows": score(paths, prob, args.settings, task,
                                                            voc_root),
                        "wall_s": round(time.perf_counter() - t0, 1)}
    result["load_end"] = machine().get("load_average")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
