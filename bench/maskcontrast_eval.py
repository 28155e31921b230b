"""MaskContrast's evaluation protocol on PASCAL VOC: per-image k-means over seeds, the plain
backbone baseline, and the linear probe (an upper bound: it uses the labels).

Rows (all on the VOC root ``--voc``'s images, 21 classes, Hungarian matching on IoU over the
whole set, ``unseg evaluate semantic --match iou``'s scoring; mean ± std over ``--seeds``):

- ``backbone``: the same per-image protocol on the plain backbone's features (the row the
  reference never scripted): one vector per image = the mean feature over the salient pixels of
  ``--masks`` (a folder of saliency PNGs named by the images' stems, e.g. ``unseg discover``'s
  output on these images), PCA-whitened to 32, k-means into 20 clusters; salient pixels take
  the cluster + 1, the rest 0. Images without a usable mask are all background.
- one row per ``--run NAME=RUN`` (MaskContrast runs): the paper's protocol, as ``unseg predict
  RUN -k 21 --seed S`` computes it (the model's own saliency, clusters fitted on the evaluated
  images).
- with ``--masks``, one more row per run, ``NAME, --masks saliency``: the backbone row's protocol
  on the run's embeddings (mean over the salient pixels of ``--masks``). Against the backbone
  row it compares the features alone (same pixels, same clusters count); against the run's own
  row it shows what the run's learned saliency costs or gains.
- ``--probe``: a 1x1 conv trained on the labels of the same images (train = test: linear
  separability, an upper bound, not a method), on each run's 256-d decoder features (the
  paper's probe) and on the backbone's features; scored without matching.

Prints one JSON object (with the machine and the load). Example::

    python bench/maskcontrast_eval.py --voc ../shared/data/VOC2012 --masks out/voc12/masks \\
        --run unsup=runs/mc --run oracle=runs/mc-oracle --probe
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from _machine import machine
from _scratch import scratch_folder
from _voc import add_voc_argument, voc_pairs

from unseg.backbones import create_backbone
from unseg.data.image import load_label
from unseg.errors import UnsegError
from unseg.features import extract_features
from unseg.methods.linear_probe import LinearProbe, LinearProbeConfig
from unseg.methods.maskcontrast import MaskContrast, backbone_prototypes, cluster_prototypes
from unseg.metrics.semantic import ConfusionMatrix, scores_from_assignment, semantic_scores
from unseg.pipelines.backbone import open_fitted_backbone
from unseg.pipelines.maskcontrast import image_prototype, salient_pixels
from unseg.proposals.saliency_masks import load_mask_proposals
from unseg.runs import load_fitted
from unseg.utils.device import cpu_threads


def score_seeds(
    prototypes: torch.Tensor,
    salient: Sequence[torch.Tensor],
    labels: Sequence[np.ndarray],
    num_classes: int,
    ignore_index: int,
    seeds: Sequence[int],
) -> dict:
    """Hungarian-on-IoU mIoU and accuracy (%) of the per-image protocol for each seed, and their
    mean ± std. ``salient[i] [H, W]`` bool at the label's size; a row of zeros in
    ``prototypes`` (no salient pixel) still gets a cluster but labels nothing."""
    runs = []
    for seed in seeds:
        ids = cluster_prototypes(prototypes, num_classes - 1, seed=seed)
        conf = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        for mask, cid, gt in zip(salient, ids, labels, strict=True):
            conf.update((mask.long() * (int(cid) + 1)).numpy(), gt)
        s = semantic_scores(conf, "iou")
        runs.append({"seed": seed, "miou": 100 * s.miou, "acc": 100 * s.acc})
    mious = [r["miou"] for r in runs]
    accs = [r["acc"] for r in runs]
    return {
        "miou_mean": statistics.mean(mious),
        "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
        "acc_mean": statistics.mean(accs),
        "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seeds": runs,
    }


def probe_scores(
    features: Sequence[torch.Tensor], labels: Sequence[np.ndarray], num_classes: int,
    ignore_index: int, epochs: int,
) -> dict:
    """Linear probe trained and scored on the same images (uses the labels)."""
    targets = [torch.from_numpy(lab.astype(np.int64)) for lab in labels]
    cfg = LinearProbeConfig(num_classes=num_classes, epochs=epochs)
    probe = LinearProbe(cfg).fit(list(features), targets)
    conf = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for f, lab in zip(features, labels, strict=True):
        conf.update(probe.predict(f, lab.shape).numpy(), lab)
    s = scores_from_assignment(conf.matrix, np.arange(num_classes), conf.class_totals)
    return {"miou": 100 * s.miou, "acc": 100 * s.acc, "epochs": epochs}


@torch.no_grad()
def decoder_features(estimator: MaskContrast, features: torch.Tensor) -> torch.Tensor:
    """The head's 256-d decoder output ``[W, h, w]`` (before the embedding and saliency convs)
    for ``features [C, h, w]``, captured with a forward hook."""
    model = estimator.model_
    assert model is not None
    captured: list[torch.Tensor] = []
    handle = model.decode.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        estimator.forward(features)
    finally:
        handle.remove()
    return captured[0][0].cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_voc_argument(parser)
    parser.add_argument("--masks", default=None,
                        help="saliency PNGs of these images for the backbone row (none: no row)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--tap", default=None)
    parser.add_argument("--size", type=int, default=320, help="feature short side (320)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN",
                        help="a MaskContrast run to evaluate (repeatable)")
    parser.add_argument("--seeds", type=int, default=5, help="k-means seeds 0..N-1 (5)")
    parser.add_argument("--probe", action="store_true", help="add the linear-probe rows")
    parser.add_argument("--probe-epochs", type=int, default=LinearProbeConfig.epochs)
    parser.add_argument("--cache", default=None, help="feature cache folder (default: temporary)")
    args = parser.parse_args()
    layout, pairs = voc_pairs(args.voc)
    paths = [p[1] for p in pairs]
    labels = [load_label(p[2]) for p in pairs]
    ignore = 255 if layout.ignore_index is None else layout.ignore_index
    k = layout.num_classes
    seeds = list(range(args.seeds))
    with scratch_folder(args.cache, "unseg-mc-eval-") as cache:
        rows: dict[str, dict] = {}
        t0 = time.perf_counter()

        tap = {} if args.tap is None else {"tap": args.tap}
        model = create_backbone(args.backbone, device="cpu", **tap)
        feats = extract_features(paths, model, size=args.size, cache_dir=cache)
        masks: list[torch.Tensor] = []
        if args.masks:
            proposals, report = load_mask_proposals(paths, args.masks)
            by_path = dict(zip(proposals.paths, proposals.masks, strict=True))
            masks = [by_path.get(p, torch.zeros(lab.shape, dtype=torch.bool))
                     for p, lab in zip(paths, labels, strict=True)]
            protos = backbone_prototypes([feats[p] for p in paths], masks)
            rows["backbone"] = {"masks": str(Path(args.masks).resolve()),
                                "masks_report": report.summary(),
                                **score_seeds(protos, masks, labels, k, ignore, seeds)}
        if args.probe:
            rows["probe backbone (uses labels)"] = probe_scores(
                [feats[p] for p in paths], labels, k, ignore, args.probe_epochs)

        for item in args.run:
            name, _, run = item.partition("=")
            if not run:
                raise UnsegError(f"--run {item!r}: expected NAME=RUN")
            _, est, meta = load_fitted(run, "embedding", "cpu")
            bb = open_fitted_backbone(meta, None, torch.device("cpu"), run)
            # at the run's working resolution, as `unseg predict RUN` extracts them (its recorded
            # max_side; 0 or absent, from before it was recorded: no limit)
            run_feats = extract_features(paths, bb, size=int(meta["feature_size"]), cache_dir=cache,
                                         max_side=int(meta.get("max_side") or 0) or None)
            protos_l, salient = [], []
            for p, lab in zip(paths, labels, strict=True):
                with cpu_threads(torch.device("cpu"), 1):
                    proto, logit = image_prototype(est, run_feats[p], run_feats.image_size(p))
                protos_l.append(proto)
                salient.append(salient_pixels(logit, lab.shape))
            rows[name] = {"run": str(Path(run).resolve()), "fit": meta.get("fit"),
                          "config": meta.get("config"),
                          **score_seeds(torch.stack(protos_l), salient, labels, k, ignore, seeds)}
            if masks:
                with torch.no_grad(), cpu_threads(torch.device("cpu"), 1):
                    emb = [est.forward(run_feats[p])[0].cpu() for p in paths]
                rows[f"{name}, --masks saliency"] = score_seeds(
                    backbone_prototypes(emb, masks), masks, labels, k, ignore, seeds)
            if args.probe:
                rows[f"probe {name} (uses labels)"] = probe_scores(
                    [decoder_features(est, run_feats[p]) for p in paths], labels, k, ignore,
                    args.probe_epochs)

    print(json.dumps({
        "benchmark": "maskcontrast per-image k-means protocol (Hungarian on IoU)",
        "dataset": str(layout.root),
        "n_images": len(pairs),
        "num_classes": k,
        "backbone": args.backbone,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
