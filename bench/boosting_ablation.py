"""The Boosting ablation on real data: spectral / heads, with and without the two tricks.

Saliency (Acc, IoU, maxFβ with β² = 0.3, curve mode) on ECSSD with heads trained on the VOC2007
images; CorLoc on VOC2007 with heads trained on ECSSD images (the first ``--train-n`` sorted).
No labels are used for training. Heads (``--heads``): ``sempart`` (the SEMPART-style saliency
head: rows "head ...", ``--epochs``/``--lr``) and ``found`` (the FOUND-style head: rows
"found ...", ``--found-steps``/``--found-lr``). Each head is trained once per setting (base,
multi-scale, and for the heads named by ``--fixed-crop`` multi-scale with the reference's
near-fixed crop) and
predicted once; the guided-filter variants filter the same probabilities. Multi-scale crops come
from the crop cache (``--crop-pool`` crops per image). Each row also gets the collapse verdict
(:mod:`unseg.methods.collapse`) of its predicted maps. Prints one JSON document and writes it
(after every finished row, so partial results survive) to ``--out/seed<N>/results.json``, and
the rows over all ``--seeds`` to ``--out/summary.json``.

    .venv/bin/python bench/boosting_ablation.py --out /tmp/boosting --epochs 4 --lr 1e-3 \
        --seeds 0 1 2 3 4
    .venv/bin/python bench/boosting_ablation.py --out /tmp/b --heads found sempart --no-spectral
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine

from unseg.backbones import create_backbone
from unseg.data.image import list_images
from unseg.methods.collapse import CollapseCheck
from unseg.methods.found import FoundConfig
from unseg.methods.saliency import SaliencyHeadConfig
from unseg.pipelines import folder
from unseg.pipelines.evaluate import evaluate_corloc, evaluate_saliency
from unseg.pipelines.folder import MaskWriter
from unseg.pipelines.kind import Prediction, Settings
from unseg.pipelines.saliency import head_prob_fn, load_head, saliency_maps, spectral_prob_fn
from unseg.proposals.spectral import SpectralConfig
from unseg.refine.guided_filter import GuidedFilterConfig
from unseg.utils.batch import BatchReport
from unseg.utils.io import write_json_atomic

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class Memo:
    """Wrap a probability function so a second pass (guided filter on) reuses its outputs."""

    def __init__(self, fn) -> None:
        self.fn, self.store = fn, {}

    @staticmethod
    def _key(image: np.ndarray) -> str:
        return hashlib.sha1(image.tobytes()).hexdigest()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        key = self._key(image)
        if key not in self.store:
            self.store[key] = self.fn(image).to(torch.float16)
        return self.store[key].float()


class CachedKeys:
    """The backbone, with its ``forward_features`` memoised (float16, CPU) by input content:
    the spectral and head rows of one dataset share one backbone pass per image."""

    def __init__(self, backbone) -> None:
        self.backbone, self.stride, self.store = backbone, backbone.stride, {}

    def parameters(self):
        return self.backbone.parameters()

    def forward_features(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        key = (hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest(), kind)
        if key not in self.store:
            self.store[key] = self.backbone.forward_features(x, kind).to("cpu", torch.float16)
        return self.store[key].to(x.device, torch.float32)


def _evaluate(task: str, out_dir: Path, partial: bool) -> dict:
    if task == "saliency":
        r = evaluate_saliency(out_dir / "masks", DATA / "ECSSD", allow_missing=partial)
        return {
            "acc": r.acc,
            "iou": r.iou,
            "max_fbeta": r.max_fbeta,
            "mae": r.mae,
            "n_images": r.n_images,
            "fbeta_mode": r.fbeta_mode,
            "beta2": r.beta2,
        }
    r = evaluate_corloc(out_dir, DATA / "VOC2007" / "VOCdevkit" / "VOC2007", partial)
    n = r.n_images - (r.n_missing if partial else 0)
    return {"corloc": r.n_correct / max(n, 1), "n_images": n, "n_correct": r.n_correct}


def _predict_masks(paths, out: Path, prob_fn, guided, size: int, stride: int) -> None:
    """``out/masks/<stem>.png`` and ``out/boxes.json`` of ``paths`` with the map ``prob_fn``, as
    the folder pipeline writes them (names under the paths' common folder)."""
    report = BatchReport()
    writer = MaskWriter(out, Path(os.path.commonpath(paths)), False, False, report)
    for path, mask, box in saliency_maps(paths, prob_fn, guided, size, stride, report):
        writer.write(Prediction(path, mask, None, box))
    writer.close()


def _both(name: str, fn, paths, out: Path, task: str, size: int, stride: int, res: dict) -> None:
    """Predict once, score without and with the guided filter (rows ``name`` / ``name + gf``),
    and record the collapse verdict of the unfiltered maps."""
    memo = Memo(fn)
    for gf, row in ((None, name), (GuidedFilterConfig(), f"{name} + guided filter")):
        t0 = time.perf_counter()
        d = out / task / row.replace(" ", "_").replace("+", "plus")
        _predict_masks(paths, d, memo, gf, size, stride)
        res["rows"].setdefault(row, {})[task] = {
            **_evaluate(task, d, res["settings"]["limit"] is not None),
            "predict_s": round(time.perf_counter() - t0, 1),
        }
        _save(res, out)
        if gf is None:
            check = CollapseCheck()
            for prob in memo.store.values():
                check.update(prob.float()[None])
            res.setdefault("collapse", {}).setdefault(name, {})[task] = check.report().as_dict()


def _save(res: dict, out: Path) -> None:
    write_json_atomic(out / "results.json", res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-n", type=int, default=422)
    ap.add_argument("--tasks", nargs="+", default=["saliency", "corloc"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="training seeds, one after another in this process (the backbone runs "
                    "once per image for all of them); OUT/seed<N>/results.json each, and "
                    "OUT/summary.json with every row's per-seed values, mean and std")
    ap.add_argument("--restarts", type=int, default=1,
                    help="SEMPART-style head: short restarts of its cut, one kept by "
                    "--restart-rule (unseg.methods.restarts)")
    ap.add_argument("--restart-steps", type=int, default=SaliencyHeadConfig().restart_steps)
    ap.add_argument("--restart-rule", default="agreement", choices=["agreement", "cut"])
    ap.add_argument("--no-spectral", action="store_true", help="only the head rows")
    ap.add_argument("--limit", type=int, default=None, help="smoke test: first N images only")
    ap.add_argument("--heads", nargs="+", default=["sempart"], choices=["sempart", "found"])
    ap.add_argument("--found-steps", type=int, default=FoundConfig().steps)
    ap.add_argument("--found-lr", type=float, default=FoundConfig().lr)
    ap.add_argument("--found-ensemble", type=int, default=FoundConfig().ensemble,
                    help="FOUND-style heads averaged per seed (1: the earlier rows)")
    ap.add_argument("--fixed-crop", nargs="*", default=[], choices=["sempart", "found"],
                    help="heads that also get the multi-scale rows with the near-fixed crop")
    ap.add_argument("--found-input", choices=["auto", "standardized", "raw"], default="auto",
                    help="the FOUND-style head's input: standardised per channel or raw (auto: "
                    "the pipeline's choice for the backbone)")
    ap.add_argument("--found-threshold", type=float, default=None,
                    help="the FOUND-style head's background threshold (default: the "
                    "pipeline's choice for the backbone)")
    rows = ap.add_mutually_exclusive_group()
    rows.add_argument("--base-only", action="store_true", help="no multi-scale rows")
    rows.add_argument("--multiscale-only", action="store_true",
                      help="only the multi-scale rows (the base rows of an earlier run, same "
                      "seeds, are their pairs: training is deterministic given the seed)")
    ap.add_argument("--tap", default=None, help="backbone tap (default: the backbone's)")
    ap.add_argument("--crop-pool", type=int, default=4, help="cached crops per image")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone = CachedKeys(create_backbone(args.backbone, tap=args.tap))
    backbones = {None: backbone, backbone.backbone.tap: backbone}
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(args, seed, Path(args.out) / f"seed{seed}", backbones)
        write_json_atomic(Path(args.out) / "summary.json", summarise(per_seed))
    json.dump({"machine": machine(), **summarise(per_seed)}, sys.stdout, indent=2)
    print()
    return 0


def summarise(per_seed: dict[int, dict]) -> dict:
    """Every row's metrics over the seeds: per-seed values, mean and sample std (percent)."""
    rows: dict[str, dict] = {}
    for seed, res in per_seed.items():
        for row, tasks in res["rows"].items():
            for task, metrics in tasks.items():
                for key in ("iou", "acc", "max_fbeta", "mae", "corloc"):
                    if key in metrics:
                        rows.setdefault(row, {}).setdefault(f"{task} {key}", {})[seed] = (
                            metrics[key] if key == "mae" else 100 * metrics[key]
                        )
    out = {}
    for row, metrics in rows.items():
        out[row] = {}
        for name, values in metrics.items():
            v = np.array(list(values.values()))
            out[row][name] = {
                "seeds": {str(k): round(x, 3) for k, x in values.items()},
                "mean": round(float(v.mean()), 3),
                "std": round(float(v.std(ddof=1)), 3) if v.size > 1 else None,
            }
    return {"seeds": list(per_seed), "rows": out}


def run_seed(
    args: argparse.Namespace, seed: int, out: Path, backbones: dict[str | None, CachedKeys]
) -> dict:
    """The whole table for one training ``seed`` into ``out`` (``out/results.json``);
    ``backbones``: the memoised backbone by tap, ``--tap``'s (the spectral rows') under ``None``
    and under its name, the heads' runs' taps added as they come."""
    backbone = backbones[None]
    res = {
        "machine": machine(),
        "settings": {**vars(args), "seed": seed},
        "rows": {},
        "training": {},
    }
    size = SaliencyHeadConfig().image_size
    ecssd = list_images(DATA / "ECSSD" / "images")
    voc = list_images(DATA / "VOC2007" / "VOCdevkit" / "VOC2007" / "JPEGImages")
    for task in args.tasks:
        evaluated, train = (ecssd, voc) if task == "saliency" else (voc, ecssd[: args.train_n])
        evaluated, train = evaluated[: args.limit], train[: args.limit]
        train_dir = out / f"train_{task}"
        train_dir.mkdir(parents=True, exist_ok=True)
        for p in train:  # a folder of links: folder.fit takes a folder
            link = train_dir / p.name
            if not link.exists():
                link.symlink_to(p)
        if not args.no_spectral:
            fn = spectral_prob_fn(backbone, size, SpectralConfig())
            _both("spectral", fn, evaluated, out, task, size, backbone.stride, res)
        base = [] if args.multiscale_only else [("", {})]
        variants = base + ([] if args.base_only else [(" + multi-scale", {"multiscale": True})])
        fixed = (" + multi-scale (fixed crop)", {"multiscale": True, "fixed_crop": True})
        for head_kind, (suffix, kw) in (
            (h, v) for h in args.heads
            for v in variants + ([fixed] if h in args.fixed_crop and not args.base_only else [])
        ):
            if head_kind == "sempart":
                method, name, budget = "saliency-head", "head" + suffix, {"epochs": args.epochs}
                options = {"epochs": args.epochs, "lr": args.lr, "seed": seed,
                           "crop_pool": args.crop_pool, "restarts": args.restarts,
                           "restart_steps": args.restart_steps,
                           "restart_rule": args.restart_rule, **kw}
                budget["lr"] = args.lr
            else:
                method, name = "found", "found" + suffix
                budget = {"steps": args.found_steps, "lr": args.found_lr,
                          "bkg_threshold": args.found_threshold, "ensemble": args.found_ensemble}
                std = {"auto": None, "standardized": True, "raw": False}[args.found_input]
                options = {"steps": args.found_steps, "lr": args.found_lr, "seed": seed,
                           "crop_pool": args.crop_pool, "standardize": std,
                           "bkg_threshold": args.found_threshold,
                           "ensemble": args.found_ensemble, **kw}
            t0 = time.perf_counter()
            tag = (suffix.strip(" +") or "base").replace(" ", "_").replace("(", "").replace(")", "")
            run = out / "runs" / f"{task}_{head_kind}_{tag}"
            torch.manual_seed(seed)
            fit = folder.fit(train_dir, run, method, options=options, settings=Settings(
                backbone=args.backbone, tap=args.tap, seed=seed,
                cache_dir=str(out.parent / "cache")))
            res["training"][f"{task}: {name}"] = {
                "images": fit.n_images,
                **budget,
                "seconds": round(time.perf_counter() - t0, 1),
                "loss_history": fit.facts["loss_history"],
            }
            _save(res, out)
            head, model, meta = load_head(run, torch.device("cpu"))
            # the head is scored on its run's tap: the FOUND-style head's default is s16+s32
            # where the backbone has it (unseg.pipelines.saliency.METHOD_TAPS), not --tap's
            keys = backbones.setdefault(meta["tap"], CachedKeys(model))
            _both(
                name,
                head_prob_fn(keys, head, size),
                evaluated,
                out,
                task,
                size,
                keys.stride,
                res,
            )
    return res


if __name__ == "__main__":
    sys.exit(main())
