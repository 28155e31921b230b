"""Ceilings for issue 20: the FOUND-style head's 1x1 conv trained WITH labels (an upper bound).

The unsupervised head (``bench/found_pool.py``) is a linear map of ``efficientnet_lite2``
``s16+s32`` keys. Here the same map is fitted as a logistic regression on the ground truth, on the
pipeline's training inputs (320x320 centre crops, the label cropped with the image's geometry,
:func:`~unseg.data.resize.resize_image`), and scored as ``found_pool.score`` scores the
unsupervised heads (unrefined, at short side 320). THIS USES THE LABELS: it bounds what any
linear head on these features can reach, it is not a method.

Fit: BCE on the 20x20 patch grid against the ground truth's foreground fraction in each patch
(VOC's void pixels left out of the fraction and weighting the patch by its labelled share),
keys standardised per channel (folded back into the conv), L2 ``lam / 2 * |w|^2`` on the
weights, full-batch L-BFGS to convergence. ``lam`` is chosen per seed on a seeded random fifth
of the TRAINING images (mean per-image IoU of the patch masks, ``p > 0.5`` against the
fraction ``> 0.5``), then the head is refitted on all training images. A second row moves its
cut: the logit offset (-4 … +4) with the best patch IoU on the same held-out fifth, added to
the bias (still a linear head, chosen without the scored set). The seed only draws that
held-out fifth (L-BFGS on a convex loss is deterministic), so seeds that pick the same ``lam``
and offset give the same head.

Tasks (training set with labels → scored set):

- ``ecssd_a→ecssd_b`` / ``ecssd_b→ecssd_a``: ECSSD images 0–499 → 500–999 and the reverse (IoU);
- ``voc12→ecssd``: the 217 VOC2012 val images (foreground = any class, 255 void) → all ECSSD;
- ``voc07→ecssd``: the 422 VOC2007 images with their segmentation labels (the unsupervised
  ``saliency`` task's own training images) → all ECSSD;
- ``ecssd→voc07``: all 1000 ECSSD → CorLoc on the 422 VOC2007 images;
- ``ecssd422→voc07``: ECSSD's first 422 (the ``corloc`` task's training images) → CorLoc.

``--unsup`` adds the unsupervised heads found in ``WORK/heads`` (``found_pool.py train``) scored
on the same halves of ECSSD. ``--sweep`` adds, for information only, the scored value of the head
refitted at every ``lam`` of the grid (never used to choose it). ``--crf`` adds each head's score
through the pipeline's dense CRF (``found_pool.score_crf``, the unrefined map kept where the CRF
erased the object; the head without the offset).

    python bench/found_pool.py --work W prep          # the cached inputs this script reads
    python bench/found_ceiling.py --work W --cache C --seeds 0 1 2 --unsup --sweep

``--work`` is only read; ``train_voc12.pt`` (the VOC2012 crops' keys, the one input
``found_pool.py prep`` does not cache) is computed once into ``--cache`` (default: ``--work``).
Progress lines go to stderr; stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import load_average, machine
from found_pool import (
    BACKBONE,
    DATA,
    ECSSD,
    SIZE,
    TAP,
    VOC,
    _backbone,
    _config,
    _head_path,
    _load,
    score,
    score_crf,
)

from unseg.data.image import list_images, load_label
from unseg.data.resize import resize_image
from unseg.features import extract_features
from unseg.utils.batch import BatchReport

VOC12 = DATA / "VOC2012" / "VOCdevkit" / "VOC2012"
LAMS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
OFFSETS = tuple(x / 2 for x in range(-8, 9))  # logit offsets tried for the cut, -4 … +4
TASKS = {  # task: (training set, its images, scored set, its images)
    "ecssd_a→ecssd_b": ("ecssd", slice(0, 500), "ecssd", slice(500, 1000)),
    "ecssd_b→ecssd_a": ("ecssd", slice(500, 1000), "ecssd", slice(0, 500)),
    "voc12→ecssd": ("voc12", slice(None), "ecssd", slice(None)),
    "voc07→ecssd": ("voc", slice(None), "ecssd", slice(None)),
    "ecssd→voc07": ("ecssd", slice(None), "voc", slice(None)),
    "ecssd422→voc07": ("ecssd", slice(0, 422), "voc", slice(None)),
}


def _voc12_paths() -> list[Path]:
    names = (VOC12 / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return [VOC12 / "JPEGImages" / f"{n}.jpg" for n in names]


def _train_paths(name: str) -> list[Path]:
    """The images of a cached training set, in ``found_pool.prep``'s order."""
    if name == "ecssd":
        return list_images(ECSSD / "images")
    if name == "voc":
        return list_images(VOC / "JPEGImages")
    return _voc12_paths()


def _label(name: str, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and labelled pixels ``[H, W]`` bool of a training image's ground truth."""
    if name == "ecssd":
        gt = load_label(ECSSD / "ground_truth_mask" / f"{image.stem}.png")
        return gt >= 128, np.ones(gt.shape, bool)  # binarize_gt's rule for 0/255 masks
    root = VOC if name == "voc" else VOC12
    lab = load_label(root / "SegmentationClass" / f"{image.stem}.png")
    return (lab != 0) & (lab != 255), lab != 255


def patch_targets(fg: np.ndarray, valid: np.ndarray, grid: tuple[int, int],
                  stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A label cropped as the pipeline crops its image (:func:`resize_image`, ``crop=True``:
    short side to ``SIZE``, bilinear antialiased, centre square) and averaged over each patch
    of ``grid``: the foreground fraction of the labelled pixels and the labelled fraction."""
    planes = np.stack([fg, valid, np.zeros_like(fg)], -1).astype(np.uint8) * 255
    x = resize_image(planes, SIZE, stride, crop=True)[:2].float() / 255
    fg_p, valid_p = F.adaptive_avg_pool2d(x[None], grid)[0]
    return (fg_p / valid_p.clamp_min(1e-6)).clamp(0, 1), valid_p


def voc12_features(cache: Path) -> Path:
    """``CACHE/train_voc12.pt``: the 217 VOC2012 images' keys as ``found_pool.prep`` computes
    the training sets' (320 centre crops), computed once."""
    path = cache / "train_voc12.pt"
    if not path.exists():
        backbone = _backbone()
        feats = extract_features(_voc12_paths(), backbone, size=SIZE, kind="keys",
                                 batch_size=_config(backbone, 0).batch_size, crop=True,
                                 report=BatchReport())
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"features": [feats[p].to(torch.float16) for p in feats.paths]}, path)
    return path


def training_set(work: Path, cache: Path, name: str, images: slice) -> dict:
    """Keys ``[N, C, h, w]`` float, patch targets and weights ``[N, h, w]`` of a training set."""
    path = voc12_features(cache) if name == "voc12" else work / f"train_{name}.pt"
    feats = _load(path)["features"][images]
    paths = _train_paths(name)[images]
    if len(paths) != len(feats):
        raise SystemExit(f"{path}: {len(feats)} images cached, {len(paths)} on disk")
    keys = torch.stack([f.float() for f in feats])
    stride = SIZE // keys.shape[-1]
    targets, weights = zip(*(patch_targets(*_label(name, p), tuple(keys.shape[-2:]), stride)
                             for p in paths), strict=True)
    return {"keys": keys, "target": torch.stack(targets), "weight": torch.stack(weights)}


def fit(keys: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted logistic regression of the patches (L-BFGS); the conv ``w [1, C, 1, 1]``,
    ``b [1]`` on the raw keys."""
    c = keys.shape[1]
    x = keys.permute(0, 2, 3, 1).reshape(-1, c)
    t, wt = target.reshape(-1), weight.reshape(-1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    v = torch.zeros(c, requires_grad=True)
    p0 = float((wt * t).sum() / wt.sum())
    b = torch.tensor([np.log(p0 / (1 - p0))], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([v, b], lr=1, max_iter=2000, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")
    total = wt.sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(z @ v + b, t, weight=wt, reduction="sum")
        loss = bce / total + 0.5 * lam * v.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w = v / std
        return w.view(1, c, 1, 1).clone(), (b - (w * mean).sum()).clone()


def patch_iou(keys: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
              w: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image IoU of the patch masks (logit > 0) against the targets' ``> 0.5``
    (unlabelled patches left out), in percent."""
    pred = F.conv2d(keys, w, b)[:, 0] > 0
    gt, known = target > 0.5, weight > 0.5
    inter = (pred & gt & known).flatten(1).sum(1).float()
    union = ((pred | gt) & known).flatten(1).sum(1).float()
    return 100 * float(torch.where(union > 0, inter / union.clamp_min(1), 1.0).mean())


def choose_lam(train: dict, seed: int) -> tuple[float, float, dict]:
    """The ``lam`` of :data:`LAMS` with the best patch IoU on a seeded fifth of the training
    images, fitted on the other four fifths, and the logit offset of :data:`OFFSETS` that
    maximises that IoU for the chosen ``lam`` (ties: the larger ``lam``, the offset nearer 0)."""
    n = train["keys"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = {k: v[order[: n // 5]] for k, v in train.items()}
    kept = {k: v[order[n // 5:]] for k, v in train.items()}
    curve, convs = {}, {}
    for lam in LAMS:
        convs[lam] = fit(kept["keys"], kept["target"], kept["weight"], lam)
        curve[lam] = round(patch_iou(held["keys"], held["target"], held["weight"],
                                     *convs[lam]), 2)
    lam = max(LAMS, key=lambda k: (curve[k], k))
    w, b = convs[lam]
    cut = {o: patch_iou(held["keys"], held["target"], held["weight"], w, b + o)
           for o in OFFSETS}
    offset = max(OFFSETS, key=lambda o: (round(cut[o], 2), -abs(o)))
    return lam, offset, {"lam": {str(k): v for k, v in curve.items()},
                         f"offset at lam {lam}": {str(o): round(v, 2) for o, v in cut.items()}}


def _subset(data: dict, images: slice) -> dict:
    return {k: data[k][images] for k in ("paths", "keys", "sizes")}


def _summary(values: list[float]) -> dict:
    a = np.array(values)
    return {"values": [round(v, 2) for v in values], "mean": round(float(a.mean()), 2),
            "std": round(float(a.std(ddof=1)), 2) if a.size > 1 else None,
            "min": round(float(a.min()), 2)}


def run_task(work: Path, cache: Path, task: str, seeds: list[int], sweep: bool, crf: bool,
             scored_sets: dict[str, dict]) -> dict:
    """Per seed: ``lam`` chosen on the training set, the head refitted on all of it, scored."""
    trained, train_images, scored, scored_images = TASKS[task]
    t0 = time.perf_counter()
    train = training_set(work, cache, trained, train_images)
    target = _subset(scored_sets[scored], scored_images)
    out: dict = {"task": task, "train_images": train["keys"].shape[0],
                 "scored_images": len(target["paths"]),
                 "metric": "IoU" if scored == "ecssd" else "CorLoc",
                 "train_foreground": round(100 * float((train["target"] * train["weight"]).sum()
                                                       / train["weight"].sum()), 2),
                 "seeds": []}
    heads: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    scores: dict[float, float] = {}
    crf_scores: dict[float, float] = {}
    offset_scores: dict[tuple[float, float], float] = {}
    for seed in seeds:
        lam, offset, curve = choose_lam(train, seed)
        if lam not in heads:
            heads[lam] = fit(train["keys"], train["target"], train["weight"], lam)
            scores[lam] = score(scored, target, *heads[lam])
        if (lam, offset) not in offset_scores:
            w, b = heads[lam]
            offset_scores[lam, offset] = score(scored, target, w, b + offset)
        if crf and lam not in crf_scores:
            crf_scores[lam] = score_crf(scored, target, *heads[lam])
        row = {"seed": seed, "lam": lam, "offset": offset, "held_out_patch_iou": curve,
               "score": round(scores[lam], 2),
               "score with the offset": round(offset_scores[lam, offset], 2)}
        if crf:
            row["score crf"] = round(crf_scores[lam], 2)
        out["seeds"].append(row)
        print(json.dumps({"task": task, **row}), file=sys.stderr, flush=True)
    out["score"] = _summary([r["score"] for r in out["seeds"]])
    out["score with the offset"] = _summary([r["score with the offset"] for r in out["seeds"]])
    if crf:
        out["score crf"] = _summary([r["score crf"] for r in out["seeds"]])
    if sweep:
        for lam in LAMS:
            if lam not in heads:
                heads[lam] = fit(train["keys"], train["target"], train["weight"], lam)
                scores[lam] = score(scored, target, *heads[lam])
        out["sweep (scored set, not used to choose)"] = {str(k): round(scores[k], 2)
                                                         for k in LAMS}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average"] = load_average()
    return out


def unsupervised(work: Path, scored_sets: dict[str, dict]) -> list[dict]:
    """The unsupervised heads in ``WORK/heads`` on the two halves of ECSSD (and all of it)."""
    rows = []
    for task in ("saliency", "transductive"):
        for seed in range(25):
            path = _head_path(work, task, seed)
            if not path.exists():
                continue
            h = _load(path)
            row = {"head": f"{task}_seed{seed}"}
            for part, images in (("0-499", slice(0, 500)), ("500-999", slice(500, 1000)),
                                 ("all", slice(None))):
                row[part] = round(score("ecssd", _subset(scored_sets["ecssd"], images),
                                        h["w"], h["b"]), 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="found_pool.py's folder of cached inputs")
    ap.add_argument("--cache", default=None,
                    help="folder for train_voc12.pt, the one input computed here (default: WORK)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--unsup", action="store_true",
                    help="also the unsupervised heads of WORK/heads on ECSSD's halves")
    ap.add_argument("--sweep", action="store_true",
                    help="also the scored value at every lam (information, not selection)")
    ap.add_argument("--crf", action="store_true",
                    help="also each head through the pipeline's dense CRF (found_pool.score_crf)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA}: no shared data beside the repository; nothing to run")
    work = Path(args.work)
    cache = Path(args.cache) if args.cache else work
    if not (work / "score_ecssd.pt").exists():
        raise SystemExit(f"{work}: no cached inputs; run bench/found_pool.py --work {work} prep")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    scored_sets = {name: _load(work / f"score_{name}.pt") for name in ("ecssd", "voc")}
    res: dict = {"benchmark": "linear heads trained WITH labels (upper bound, not a method)",
                 "backbone": BACKBONE, "tap": TAP, "size": SIZE, "lams": list(LAMS),
                 "load_average_start": load_average(),
                 "tasks": [run_task(work, cache, t, args.seeds, args.sweep, args.crf,
                                           scored_sets)
                           for t in args.tasks]}
    if args.unsup:
        res["unsupervised"] = unsupervised(work, scored_sets)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    json.dump({"machine": machine(), **res}, sys.stdout, indent=2, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
