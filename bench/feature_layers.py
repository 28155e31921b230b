"""Which backbone tap clusters best: cosine k-means mIoU/Acc per backbone, tap and centring.

For each offline backbone and each candidate tap (``spec.taps``), with and without subtracting the
set's mean feature: cosine k-means (K = the set's classes) over every feature vector of the set
(subsampled to ``--budget`` rows with the seed), then per image the cosine logits (centres vs
L2-normalised features) upsampled bilinearly to the label size, argmax, one confusion matrix over
the set, Hungarian matching on pixel counts, the set's ignore label skipped. Mean and std over the
seeds, on the VOC2012 (217, K = 21, 255 ignored), VOC2007 (422 segmentation images, K = 21) and
CamVid val (101 street scenes, K = 11, 11 ignored) sets of ``../shared/data`` (``--sets``). Images:
short side 320 (``unseg.features.prepare_image``) rounded to the coarsest tap stride (32), so every
tap sees the same input. Extraction speed: images/s of one full forward pass (every tap, up to the
head) of each backbone on the same images, backbones interleaved round-robin so load changes hit
all.

Usage: nice -n 5 python bench/feature_layers.py [--backbones efficientnet_lite0,...]
       [--taps s16,s32,...] [--seeds 0,1,2] [--sets VOC2012,VOC2007,CamVid] [--max-images N]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine
from _voc import voc_pairs

from unseg.backbones import Backbone, BackboneSpec, create_backbone, get_spec
from unseg.backbones.base import concat_maps, tap_parts
from unseg.data.image import load_image, load_label
from unseg.errors import UnsegError
from unseg.features import prepare_image
from unseg.methods.kmeans import CosineKMeans, KMeansConfig
from unseg.metrics.semantic import ConfusionMatrix, semantic_scores

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# per set: classes K and the ignored label
SETS = {"VOC2012": (21, 255), "VOC2007": (21, 255), "CamVid": (11, 11)}
SIZE = 320


def _load_set(root: Path, max_images: int | None) -> tuple[list[Path], list[np.ndarray]]:
    """Image paths and uint8 label maps ``[H, W]`` of a VOC segmentation set, or of CamVid
    (``val/*.png`` with ``valannot/*.png`` of the same name)."""
    if (root / "valannot").is_dir():
        paths = sorted((root / "val").glob("*.png"))[:max_images]
        return paths, [load_label(root / "valannot" / p.name) for p in paths]
    pairs = voc_pairs(root)[1][:max_images]
    return [p[1] for p in pairs], [load_label(p[2]) for p in pairs]


def _extract(
    model: Backbone, images: list[torch.Tensor], singles: list[str]
) -> dict[str, list[torch.Tensor]]:
    """Every single tap of every image ``[3, H, W]``: ``{tap: [C, h, w] float16 per image}``."""
    out: dict[str, list[torch.Tensor]] = {t: [] for t in singles}
    with torch.inference_mode():
        for x in images:
            maps = model.forward_taps(x[None], singles)
            for t in singles:
                out[t].append(maps[t][0].half())
    return out


def _tap_maps(store: dict[str, list[torch.Tensor]], tap: str) -> list[torch.Tensor]:
    """The maps ``[C, h, w]`` (float32) of ``tap``, concatenated as the backbone does."""
    parts = tap_parts(tap)
    n = len(store[parts[0]])
    return [concat_maps([store[p][i].float()[None] for p in parts])[0] for i in range(n)]


def _unit_rows(maps: list[torch.Tensor], mean: torch.Tensor | None) -> list[torch.Tensor]:
    """Per image, the (centred) feature vectors L2-normalised: ``[h * w, C]`` row-major."""
    out = []
    for m in maps:
        rows = m.reshape(m.shape[0], -1).T
        out.append(F.normalize(rows - mean if mean is not None else rows, dim=1))
    return out


def _score(
    units: list[torch.Tensor],
    grids: list[tuple[int, int]],
    labels: list[np.ndarray],
    k: int,
    ignore: int,
    seed: int,
    budget: int,
    n_init: int,
) -> tuple[float, float]:
    """Cosine k-means on (subsampled) unit rows; Hungarian (mIoU, Acc) over the set.

    Per image: cosine logits ``[h, w, K]`` upsampled bilinearly to the label size, argmax.
    """
    rows = torch.cat(units)
    gen = torch.Generator().manual_seed(seed)
    if rows.shape[0] > budget:
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:budget]]
    cfg = KMeansConfig(num_classes=k, n_init=n_init, seed=seed)
    centers = CosineKMeans(cfg).fit(rows).centers_
    assert centers is not None
    confusion = ConfusionMatrix(k, ignore_index=ignore)
    for u, (h, w), lab in zip(units, grids, labels, strict=True):
        logits = (u @ centers.T).view(1, h, w, k).permute(0, 3, 1, 2)  # channels-last: faster
        up = F.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)
        confusion.update(up[0].argmax(0).numpy(), lab)
    s = semantic_scores(confusion, "pixels")
    return 100 * s.miou, 100 * s.acc


def _speed(
    models: dict[str, Backbone], images: list[torch.Tensor], rounds: int
) -> dict[str, float]:
    """Images/s of a full forward pass (all taps), backbones interleaved image by image."""
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for x in images:
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model.forward_taps(x[None], list(model.spec.tap_table))
                    times[name].append(time.perf_counter() - t0)
    return {n: 1.0 / statistics.median(t) for n, t in times.items()}


def _stats(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 2), "std": round(sd, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="default ../shared/data")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--taps", default="", help="comma list (default: every listed tap)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sets", default="VOC2012,VOC2007",
                        help="comma list of " + ", ".join(SETS))
    parser.add_argument("--max-images", type=int, default=None, help="per set")
    parser.add_argument("--budget", type=int, default=40000, help="k-means rows per fit")
    parser.add_argument("--n-init", type=int, default=1, help="k-means++ restarts per fit")
    parser.add_argument("--speed-images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"skipped: {data} is absent (the real data lives beside the repo)")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.backbones.split(",")
    set_names = args.sets.split(",")
    unknown = [s for s in set_names if s not in SETS]
    if unknown:
        sys.exit(f"unknown set(s) {unknown}; choose from {list(SETS)}")
    sets = {s: _load_set(data / s, args.max_images) for s in set_names}
    stride = 32
    images = {
        s: [prepare_image(load_image(p), SIZE, stride) for p in paths]
        for s, (paths, _) in sets.items()
    }
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    models = {}
    for name in names:
        model = create_backbone(name, device="cpu")
        models[name] = model
        spec = get_spec(name)
        taps = args.taps.split(",") if args.taps else list(spec.tap_table)
        taps = [t for t in taps if _valid(spec, t)]
        singles = list(dict.fromkeys(p for t in taps for p in tap_parts(t)))
        rows: dict[str, dict] = {}
        for set_name, (_, labels) in sets.items():
            store = _extract(model, images[set_name], singles)
            for tap in taps:
                maps = _tap_maps(store, tap)
                grids = [(m.shape[1], m.shape[2]) for m in maps]
                mean = torch.cat([m.reshape(m.shape[0], -1) for m in maps], 1).double().mean(1)
                for centred in (False, True):
                    units = _unit_rows(maps, mean.float() if centred else None)
                    runs = [
                        _score(units, grids, labels, *SETS[set_name], s, args.budget,
                               args.n_init)
                        for s in seeds
                    ]
                    key = f"{tap}{' centred' if centred else ''}"
                    rows.setdefault(key, {"tap": tap, "centred": centred, **_tap_dims(spec, tap)})
                    rows[key][set_name] = {
                        "miou": _stats([r[0] for r in runs]),
                        "acc": _stats([r[1] for r in runs]),
                    }
                    print(name, set_name, key, rows[key][set_name], file=sys.stderr, flush=True)
            del store
        for row in rows.values():
            row["miou_mean_sets"] = round(
                statistics.mean(row[s]["miou"]["mean"] for s in set_names), 2)
        best = max(rows.values(), key=lambda r: r["miou_mean_sets"])
        results[name] = {"rows": list(rows.values()), "best": best}
    speed_imgs = [x for s in set_names for x in images[s]][: args.speed_images]
    speed = _speed(models, speed_imgs, rounds=2)
    for name in names:
        results[name]["images_per_s"] = round(speed[name], 2)
        results[name]["slowdown_vs_lite0"] = round(
            speed.get("efficientnet_lite0", float("nan")) / speed[name], 2
        )
    report = {
        "benchmark": ("feature taps: cosine k-means (K = the set's classes) per backbone / tap / "
                      "centring"),
        "protocol": {
            "size": f"short side {SIZE}, rounded to a multiple of {stride}",
            "k_ignore": {s: SETS[s] for s in set_names},
            "seeds": seeds,
            "budget_rows": args.budget,
            "n_init": args.n_init,
            "match": ("Hungarian on pixel counts, the ignore label skipped, one confusion matrix "
                      "per set"),
            "speed": f"median over {len(speed_imgs)} images x 2 rounds, batch 1, full pass",
        },
        "sets": {s: len(sets[s][1]) for s in set_names},
        "results": results,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": {**machine(), "load_average_before": load_start},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


def _valid(spec: BackboneSpec, tap: str) -> bool:
    """Whether ``spec`` has ``tap`` (says so on stderr when not)."""
    try:
        spec.tap_info(tap)
    except UnsegError:
        print(f"{spec.name}: no tap {tap!r}, skipped", file=sys.stderr)
        return False
    return True


def _tap_dims(spec: BackboneSpec, tap: str) -> dict[str, int]:
    info = spec.tap_info(tap)
    return {"dim": info.dim, "stride": info.stride}


if __name__ == "__main__":
    main()
