"""Supervised linear probe on PASCAL VOC 2012 (THIS USES THE LABELS: an upper bound, not a method).

Features of the dataset's images (short side 320, no flip), a 1x1 conv trained with the labels
of the same images and scored on them (train = test: linear separability of these features, not
generalisation), without Hungarian matching (the probe predicts class ids) and without CRF.
Prints JSON with the machine it ran on.

Usage: python bench/linear_probe_voc.py [--voc ../shared/data/VOC2012] [--backbone NAME]
       [--epochs 50] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _machine import machine
from _scratch import scratch_folder
from _voc import add_voc_argument, voc_pairs

from unseg.backbones import create_backbone
from unseg.data.image import load_label
from unseg.features import extract_features
from unseg.methods.linear_probe import LinearProbe, LinearProbeConfig
from unseg.metrics.semantic import ConfusionMatrix, scores_from_assignment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_voc_argument(parser)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=LinearProbeConfig.epochs)
    parser.add_argument("--cache", default=None, help="feature cache folder (default: temporary)")
    args = parser.parse_args()
    layout, pairs = voc_pairs(args.voc)
    model = create_backbone(args.backbone, device="cpu")
    with scratch_folder(args.cache, "unseg-probe-") as cache:
        t0 = time.perf_counter()
        feats = extract_features([p[1] for p in pairs], model, size=320, cache_dir=cache)
        labels = [torch.from_numpy(load_label(p[2]).astype(np.int64)) for p in pairs]
        features = [feats[p[1]] for p in pairs]
        cfg = LinearProbeConfig(num_classes=layout.num_classes, epochs=args.epochs)
        probe = LinearProbe(cfg).fit(features, labels)
    confusion = ConfusionMatrix(layout.num_classes, ignore_index=layout.ignore_index)
    for f, lab in zip(features, labels, strict=True):
        pred = probe.predict(f, tuple(lab.shape)).numpy()
        confusion.update(pred, lab.numpy())
    identity = np.arange(layout.num_classes)
    scores = scores_from_assignment(confusion.matrix, identity, confusion.class_totals)
    print(json.dumps({
        "benchmark": "linear probe (uses ground-truth labels; train = test)",
        "dataset": str(layout.root),
        "n_images": len(pairs),
        "backbone": args.backbone,
        "config": cfg.__dict__,
        "acc": scores.acc,
        "miou": scores.miou,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
