"""A pool of single FOUND-style heads, and label-free ways to combine them (issue 20).

Three tasks, no labels in training, each head the pipeline's (``efficientnet_lite2`` ``s16+s32``,
every :class:`~unseg.methods.found.FoundConfig` default but ``ensemble=1``; the training inputs
are the pipeline's 320x320 centre crops, scored at short side 320 as ``unseg predict`` does):

- ``saliency``: trained on the 422 VOC2007 images, scored by IoU on all 1000 ECSSD images;
- ``corloc``: trained on the first 422 ECSSD images, scored by CorLoc on the 422 VOC2007 images;
- ``transductive``: trained on the 1000 ECSSD images, scored on them (``discover``'s default).

Steps (``--work DIR`` holds the cached inputs and the heads; every step prints JSON):

- ``prep``: the training inputs and the scoring keys of every task (the backbone once);
- ``train --task T --seeds ...``: one head per seed, saved, and its unrefined score;
- ``rules --task T --pool N --R R --subsets K``: K random R-subsets (seeded) of the heads of
  seeds 0..N-1, each scored as the mean of its members' scores (``single``: what one head
  gives on average), the mean of their convs (``mean``: ``FoundConfig.ensemble``), the mean of
  the ``R - R // 2`` heads that agree best with the others (``top``) and the best-agreeing head
  alone (``pick``); agreement: the mean IoU of the heads' patch masks on the training crops;
- ``ensemble --task T --R R --seeds ...``: the mean of heads ``R·s … R·s + R − 1`` for each seed
  ``s`` (the head ``--ensemble R --seed s`` trains), unrefined and with the pipeline's dense CRF
  (``--crf``: the unrefined map kept where the CRF erased the object).

    python bench/found_pool.py --work W prep
    python bench/found_pool.py --work W train --task saliency --seeds $(seq 0 24)
    python bench/found_pool.py --work W rules --task saliency --pool 15 --R 5 --subsets 20
    python bench/found_pool.py --work W ensemble --task saliency --R 5 --seeds 0 1 2 3 4 --crf

``prep --limit N`` caches the first N images of each set only (a smoke run of every step, in a
``--work`` of its own). Progress lines go to stderr; stdout is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine

from unseg.backbones import create_backbone
from unseg.data.image import list_images, load_image, load_label
from unseg.data.voc import parse_voc_xml
from unseg.features import extract_features
from unseg.methods.base import FitInputs
from unseg.methods.found import FoundConfig, FoundHead
from unseg.methods.restarts import mask_agreement
from unseg.metrics.corloc import is_correct, largest_component_box
from unseg.metrics.saliency import binary_scores
from unseg.pipelines.saliency import _keys, eight_bit, saliency_config, saliency_maps
from unseg.refine.saliency_crf import SaliencyCRFConfig
from unseg.registry import get_method
from unseg.utils.batch import BatchReport

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ECSSD = DATA / "ECSSD"
VOC = DATA / "VOC2007" / "VOCdevkit" / "VOC2007"
BACKBONE, TAP, SIZE = "efficientnet_lite2", "s16+s32", 320
TASKS = {  # task: (training set, scored set)
    "saliency": ("voc", "ecssd"),
    "corloc": ("ecssd422", "voc"),
    "transductive": ("ecssd", "ecssd"),
}


def _sets(limit: int | None = None) -> dict[str, list[Path]]:
    """The sets' images; with ``limit``, the first ``limit`` of each (a smoke run)."""
    ecssd = list_images(ECSSD / "images")
    sets = {"ecssd": ecssd, "ecssd422": ecssd[:422], "voc": list_images(VOC / "JPEGImages")}
    return {name: paths[:limit] for name, paths in sets.items()}


def _backbone():
    return create_backbone(BACKBONE, tap=TAP).eval()


def _config(backbone, seed: int) -> FoundConfig:
    spec = get_method("found")
    return saliency_config(spec, FoundConfig(seed=seed, ensemble=1), backbone)


def prep(work: Path, limit: int | None = None) -> dict:
    """Cache ``train_<set>.pt`` (keys ``[C, h, w]`` fp16 and uint8 crops of the training sets)
    and ``score_<set>.pt`` (keys fp16, original and resized sizes of the scored sets); with
    ``limit``, of the first ``limit`` images of each set only (a smoke run: its own ``--work``)."""
    backbone, sets, out = _backbone(), _sets(limit), {"limit": limit}
    batch = _config(backbone, 0).batch_size
    for name in ("voc", "ecssd422", "ecssd"):
        path = work / f"train_{name}.pt"
        if not path.exists():
            feats = extract_features(sets[name], backbone, size=SIZE, kind="keys",
                                     batch_size=batch, crop=True, report=BatchReport(),
                                     extras=("image",))
            torch.save({"features": [feats[p].to(torch.float16) for p in feats.paths],
                        "images": [feats.extra(p, "image") for p in feats.paths]}, path)
        out[f"train {name}"] = str(path)
    for name in ("ecssd", "voc"):
        path = work / f"score_{name}.pt"
        if not path.exists():
            keys, sizes = [], []
            with torch.inference_mode():
                for p in sets[name]:
                    image = load_image(p)
                    x, k = _keys(backbone, image, SIZE)
                    keys.append(k[0].to(torch.float16))
                    sizes.append([list(image.shape[:2]), list(x.shape[-2:])])
            torch.save({"paths": [str(p) for p in sets[name]], "keys": keys, "sizes": sizes},
                       path)
        out[f"score {name}"] = str(path)
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _head_path(work: Path, task: str, seed: int) -> Path:
    return work / "heads" / f"{task}_seed{seed}.pt"


def _prob(data: dict, i: int, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Foreground probability ``[H, W]`` of scored image ``i`` as ``unseg predict`` maps it."""
    (orig, resized), keys = data["sizes"][i], data["keys"][i]
    logit = F.conv2d(keys.float()[None], w, b)
    prob = torch.sigmoid(F.interpolate(logit, size=resized, mode="bilinear", align_corners=False))
    return F.interpolate(prob, size=orig, mode="bilinear", align_corners=False)[0, 0]


def _score_one(scored: str, path: Path, mask8: np.ndarray) -> float:
    """IoU (ECSSD, :func:`~unseg.metrics.saliency.binary_scores`) or 1/0 for a correct box
    (VOC2007) of one 8-bit map ``[H, W]`` (the mask is ``>= 128``)."""
    if scored == "ecssd":
        return binary_scores(mask8, load_label(ECSSD / "ground_truth_mask" / f"{path.stem}.png"))[1]
    _, boxes, _ = parse_voc_xml(VOC / "Annotations" / f"{path.stem}.xml")
    return float(is_correct(largest_component_box(mask8 >= 128), boxes))


def score(scored: str, data: dict, w: torch.Tensor, b: torch.Tensor) -> float:
    """ECSSD IoU or VOC07 CorLoc (percent) of the conv ``w [1, C, 1, 1]``, ``b [1]``, unrefined."""
    values = [_score_one(scored, Path(p), eight_bit(_prob(data, i, w, b)).numpy())
              for i, p in enumerate(data["paths"])]
    return 100 * float(np.mean(values))


def score_crf(scored: str, data: dict, w: torch.Tensor, b: torch.Tensor) -> float:
    """The same through the pipeline's dense-CRF refinement (``saliency_maps``)."""
    current: list[torch.Tensor] = []

    class Paths(list):  # the scored paths; each one's map is made as the pipeline reaches it
        def __iter__(self):
            for i, p in enumerate(list.__iter__(self)):
                current[:] = [_prob(data, i, w, b)]
                yield p

    paths = Paths(Path(p) for p in data["paths"])
    values = [
        _score_one(scored, path, m8)
        for path, m8, _ in saliency_maps(paths, lambda image: current[0], None, SIZE, 16,
                                         BatchReport(), crf=SaliencyCRFConfig())
    ]
    return 100 * float(np.mean(values))


def train(work: Path, task: str, seeds: list[int]) -> list[dict]:
    """One head per seed (cached), with its unrefined score."""
    trained, scored = TASKS[task]
    data = _load(work / f"train_{trained}.pt")
    target = _load(work / f"score_{scored}.pt")
    backbone, rows = _backbone(), []
    inputs = FitInputs([f.float() for f in data["features"]], data["images"])
    for seed in seeds:
        path = _head_path(work, task, seed)
        if not path.exists():
            t0 = time.perf_counter()
            head = FoundHead(_config(backbone, seed)).fit(inputs)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"w": head.net.weight.detach(), "b": head.net.bias.detach(),
                        "seconds": torch.tensor(time.perf_counter() - t0)}, path)
        h = _load(path)
        rows.append({"task": task, "seed": seed, "score": round(score(scored, target, h["w"],
                     h["b"]), 2), "train_s": round(float(h["seconds"]), 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _mean(heads: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean conv of ``heads`` (their weights ``[1, C, 1, 1]`` and biases ``[1]``)."""
    return (torch.stack([h["w"] for h in heads]).mean(0),
            torch.stack([h["b"] for h in heads]).mean(0))


def rules(work: Path, task: str, pool: int, r: int, subsets: int) -> dict:
    """The four ways of combining ``r`` heads over ``subsets`` random subsets of the pool."""
    trained, scored = TASKS[task]
    data = _load(work / f"train_{trained}.pt")
    target = _load(work / f"score_{scored}.pt")
    heads = [_load(_head_path(work, task, s)) for s in range(pool)]
    feats = torch.stack([f.float() for f in data["features"]])
    masks = torch.stack([F.conv2d(feats, h["w"], h["b"])[:, 0] > 0 for h in heads])
    singles = [score(scored, target, h["w"], h["b"]) for h in heads]
    cache: dict[tuple[int, ...], float] = {}

    def value(members: list[int]) -> float:
        key = tuple(sorted(members))
        if key not in cache:
            cache[key] = score(scored, target, *_mean([heads[i] for i in key]))
        return cache[key]

    rng, rows = random.Random(0), {"single": [], "mean": [], "top": [], "pick": []}
    for _ in range(subsets):
        sub = rng.sample(range(pool), r)
        agree = mask_agreement(masks[sub].float())
        ranked = [sub[i] for i in agree.argsort(descending=True, stable=True).tolist()]
        rows["single"].append(float(np.mean([singles[i] for i in sub])))
        rows["mean"].append(value(sub))
        rows["top"].append(value(ranked[: r - r // 2]))
        rows["pick"].append(value(ranked[:1]))
    s = np.array(singles)
    out = {"task": task, "pool": pool, "R": r, "subsets": subsets,
           "single heads": {"values": [round(v, 2) for v in singles], "mean": round(s.mean(), 2),
                            "std": round(s.std(ddof=1), 2), "min": round(s.min(), 2)}}
    for key, v in rows.items():
        a = np.array(v)
        out[key] = {"mean": round(float(a.mean()), 2), "std": round(float(a.std(ddof=1)), 2),
                    "min": round(float(a.min()), 2)}
    return out


def ensemble(work: Path, task: str, r: int, seeds: list[int], crf: bool) -> dict:
    """The mean of heads ``r·s … r·s + r − 1`` per seed ``s``: unrefined and with the CRF."""
    _, scored = TASKS[task]
    target = _load(work / f"score_{scored}.pt")
    out: dict = {"task": task, "R": r, "seeds": seeds, "unrefined": [], "crf": []}
    for s in seeds:
        w, b = _mean([_load(_head_path(work, task, r * s + k)) for k in range(r)])
        out["unrefined"].append(round(score(scored, target, w, b), 2))
        if crf:
            out["crf"].append(round(score_crf(scored, target, w, b), 2))
        print(json.dumps({"seed": s, "unrefined": out["unrefined"][-1],
                          "crf": out["crf"][-1] if crf else None}), file=sys.stderr, flush=True)
    for key in ("unrefined", "crf"):
        if out[key]:
            a = np.array(out[key])
            out[f"{key} mean"] = round(float(a.mean()), 2)
            out[f"{key} std"] = round(float(a.std(ddof=1)), 2) if a.size > 1 else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder of the cached inputs and heads")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    sub = ap.add_subparsers(dest="step", required=True)
    sub.add_parser("prep").add_argument(
        "--limit", type=int, default=None, help="smoke test: first N images of each set only")
    for name in ("train", "rules", "ensemble"):
        p = sub.add_parser(name)
        p.add_argument("--task", required=True, choices=list(TASKS))
        if name != "rules":
            p.add_argument("--seeds", type=int, nargs="+", default=[0])
        if name != "train":
            p.add_argument("--R", type=int, default=5)
        if name == "rules":
            p.add_argument("--pool", type=int, default=15)
            p.add_argument("--subsets", type=int, default=20)
        if name == "ensemble":
            p.add_argument("--crf", action="store_true", help="also the dense-CRF row")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: no shared data beside the repository; nothing to run")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "prep":
        res = prep(work, args.limit)
    elif args.step == "train":
        res = {"heads": train(work, args.task, args.seeds)}
    elif args.step == "rules":
        res = rules(work, args.task, args.pool, args.R, args.subsets)
    else:
        res = ensemble(work, args.task, args.R, args.seeds, args.crf)
    json.dump({"machine": machine(), "step": args.step, **res}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
