"""MaskContrast training speed: images/s and peak memory, 1 vs 2 processes, and a step's split.

Inputs: ``--images`` ECSSD photos from ``../shared/data`` resized to ``--size`` squared, their
ground-truth masks as the saliency proposals, and the frozen EfficientNet-Lite0 features (the
backbone's default tap; ``feature_shape`` reports it) computed once (their cost per image is
reported as ``backbone_once_ms_per_image``: it is paid once per run, not per step, in unseg's
design). Without the shared data, random images and blob masks stand in (``source`` says which).
The losses are taken at ``--loss-size`` pixels per side (default: the view size, the paper's).

- ``fit``: :meth:`MaskContrast.fit` for ``--epochs`` at batch ``--batch`` in a fresh process:
  one process with 2 torch threads, then ``torchrun`` with 2 gloo processes of 1 thread each
  (each takes half of every batch; gradients averaged, the queue all-gathered); images/s (views
  pairs trained per second), the peak RSS of each process, and the scaling ratio 2-proc / 1-proc.
- ``step``: where one step's time goes, in this process (median of ``--steps`` after a warm-up):
  ``crops`` (drawing both views: RoI-align of the cached features and the mask crops), ``head``
  (query forward, momentum update, key forward, upsampling, prototypes), ``loss`` (contrastive +
  balanced BCE), ``backward_sgd`` (backward and the SGD step).

``--train-last-stage``: the same with the backbone's last stage trained (the features are then
the maps before it, ``b14`` for Lite0's ``s32``, and the stage runs on every view).

Prints one JSON object.
``python bench/maskcontrast.py [--images 64] [--size 224] [--batch 16] [--loss-size 56]
[--train-last-stage]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine
from PIL import Image
from safetensors.torch import load_file, save_file

from unseg.backbones import Backbone, LastStage, create_backbone
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import (
    MaskContrast,
    MaskContrastConfig,
    PrototypeQueue,
    balanced_bce,
    contrastive_loss,
    draw_views,
    momentum_update,
)
from unseg.utils.device import cpu_threads

ECSSD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ECSSD"


def _rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): ``VmHWM``, which, unlike
    ``ru_maxrss``, does not inherit the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lite0(stage: bool) -> tuple[Backbone, LastStage | None]:
    """The Lite0 backbone at the features the fit sees, and its last stage when trained."""
    backbone = create_backbone("efficientnet_lite0", device="cpu")
    if not stage:
        return backbone, None
    last = backbone.last_stage()
    backbone.tap = last.input_tap
    return backbone, last


def build_inputs(
    n: int, size: int, backbone: Backbone
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """``n`` images at ``size``², their masks ``[size, size]`` and ``backbone``'s features
    ``[C, h, w]``."""

    if (ECSSD / "images").is_dir():
        paths = sorted((ECSSD / "images").glob("*.jpg"))[:n]
        images = [
            np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR))
            for p in paths
        ]
        masks = [
            np.asarray(
                Image.open(ECSSD / "ground_truth_mask" / f"{p.stem}.png")
                .convert("L")
                .resize((size, size), Image.NEAREST)
            )
            > 127
            for p in paths
        ]
        source = f"ECSSD ({ECSSD})"
    else:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
        yy, xx = np.mgrid[:size, :size]
        masks = [
            (yy - rng.uniform(0.3, 0.7) * size) ** 2 + (xx - rng.uniform(0.3, 0.7) * size) ** 2
            < (rng.uniform(0.15, 0.3) * size) ** 2
            for _ in range(n)
        ]
        source = "synthetic (random images, disc masks): ../shared/data is absent"
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    start = time.perf_counter()
    with torch.no_grad():
        feats = torch.cat([backbone(batch[i : i + 16]) for i in range(0, n, 16)])
    ms = 1000 * (time.perf_counter() - start) / n
    meta = {"source": source, "feature_tap": backbone.tap, "feature_shape": list(feats.shape[1:]),
            "backbone_once_ms_per_image": round(ms, 1)}  # fmt: skip
    return list(feats), [torch.from_numpy(m) for m in masks], meta


def config(args: argparse.Namespace) -> MaskContrastConfig:
    """The paper's settings at the benchmark's batch, view size and epochs."""
    return MaskContrastConfig(
        batch_size=args.batch, view_size=args.size, epochs=args.epochs, loss_size=args.loss_size,
        train_last_stage=args.train_last_stage,
        stage_of="efficientnet_lite0:s32" if args.train_last_stage else "",
    )


def bench_step(
    feats: list[torch.Tensor], masks: list[torch.Tensor], args, stage: LastStage | None
) -> dict:
    """Median seconds of each part of a training step on one process (see the docstring)."""
    cfg = config(args)
    model = MaskContrast(cfg, stage=stage)._build(feats[0].shape[0])
    key = copy.deepcopy(model)
    model.train()  # as in MaskContrast.fit: the stage's BatchNorm keeps its statistics
    key.train()
    queue = PrototypeQueue(cfg.queue_size, cfg.embed_dim, torch.Generator().manual_seed(0))
    optim = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, list[float]] = {"crops": [], "head": [], "loss": [], "backward_sgd": []}
    for step in range(args.steps + 1):
        idx = torch.randperm(len(feats), generator=gen)[: args.batch].tolist()
        t0 = time.perf_counter()
        with cpu_threads("cpu", 1):  # as in MaskContrast.fit
            views = [draw_views(feats[i], masks[i], cfg, gen) for i in idx]
        t1 = time.perf_counter()
        side = views[0].query_mask.shape[-1]
        up = {"size": (side, side), "mode": "bilinear", "align_corners": False}
        q_emb, q_sal = model(torch.stack([v.query for v in views]))
        q_emb, q_sal = F.interpolate(q_emb, **up), F.interpolate(q_sal, **up)
        with torch.no_grad():
            momentum_update(key, model, cfg.momentum)
            k_emb = F.interpolate(key(torch.stack([v.key for v in views]))[0], **up)
            k_mask = torch.stack([v.key_mask for v in views]).float()
            protos = F.normalize(
                torch.einsum("bdhw,bhw->bd", F.normalize(k_emb, dim=1), k_mask), dim=1
            )
        t2 = time.perf_counter()
        q_mask = torch.stack([v.query_mask for v in views])
        loss = contrastive_loss(q_emb, q_mask, protos, queue.items, cfg.temperature)
        loss = loss + balanced_bce(q_sal[:, 0], q_mask)
        t3 = time.perf_counter()
        optim.zero_grad()
        loss.backward()
        optim.step()
        queue.enqueue(protos)
        t4 = time.perf_counter()
        if step:  # the first step is a warm-up
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name].append(dt)
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    return {
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "share": {k: round(v / total, 3) for k, v in med.items()},
        "images_per_s": round(args.batch / total, 2),
    }


def worker(args: argparse.Namespace) -> None:
    """One fit (a rank under torchrun); writes ``result-<rank>.json`` beside the inputs."""
    from unseg.utils import dist

    rank, world = dist.init_distributed()
    data = load_file(args.worker)
    n = int(data["n"])
    feats = [data[f"f{i}"] for i in range(n)]
    masks = [data[f"m{i}"] for i in range(n)]
    before = _rss_mb()
    dist.barrier()
    start = time.perf_counter()
    _, stage = _lite0(args.train_last_stage)
    est = MaskContrast(config(args), stage=stage).fit(FitInputs(features=feats, masks=masks))
    dist.barrier()
    seconds = time.perf_counter() - start
    result = {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "steps": len(est.history_),
        "rss_before_fit_mb": round(before, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
    }
    Path(args.worker).with_name(f"result-{rank}.json").write_text(json.dumps(result))
    dist.cleanup()


def bench_fit(feats: list[torch.Tensor], masks: list[torch.Tensor], args) -> dict:
    """1 process (2 threads) vs torchrun 2 processes (1 thread each) on the same fit."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.safetensors"
        tensors = {f"f{i}": f.contiguous() for i, f in enumerate(feats)}
        tensors |= {f"m{i}": m.contiguous() for i, m in enumerate(masks)}
        save_file({**tensors, "n": torch.tensor(len(feats))}, str(path))
        common = [__file__, "--worker", str(path), "--size", str(args.size),
                  "--batch", str(args.batch), "--epochs", str(args.epochs)]  # fmt: skip
        if args.loss_size:
            common += ["--loss-size", str(args.loss_size)]
        if args.train_last_stage:
            common.append("--train-last-stage")
        runs = {
            "one_process": ([sys.executable, *common], "2"),
            "two_processes": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", *common],
                "1",
            ),
        }  # fmt: skip
        for name, (cmd, threads) in runs.items():
            for old in Path(tmp).glob("result-*.json"):
                old.unlink()
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
            ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("result-*.json"))]
            seconds = max(r["seconds"] for r in ranks)
            out[name] = {
                "processes": len(ranks),
                "threads_per_process": ranks[0]["threads"],
                "steps": ranks[0]["steps"],
                "seconds": round(seconds, 2),
                "images_per_s": round(len(feats) * args.epochs / seconds, 2),
                "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
                "rss_before_fit_mb": [r["rss_before_fit_mb"] for r in ranks],
            }
    out["scaling_ratio"] = round(
        out["two_processes"]["images_per_s"] / out["one_process"]["images_per_s"], 3
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="training images (default 64)")
    parser.add_argument("--size", type=int, default=224, help="image and view size (224)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the timed fit (1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the split (3)")
    parser.add_argument(
        "--loss-size",
        type=int,
        default=None,
        help="side where the losses are taken (default: --size, the paper's)",
    )
    parser.add_argument("--train-last-stage", action="store_true",
                        help="train the backbone's last stage with the head")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out: dict = {
        "benchmark": "maskcontrast",
        "machine": machine(),
        "settings": {"images": args.images, "size": args.size, "batch": args.batch,
                     "epochs": args.epochs, "loss_size": args.loss_size or args.size,
                     "train_last_stage": args.train_last_stage,
                     "config": "paper defaults (queue 256, width 256, 32-d, T 0.5)"},
    }  # fmt: skip
    backbone, stage = _lite0(args.train_last_stage)
    feats, masks, meta = build_inputs(args.images, args.size, backbone)
    out["inputs"] = meta
    out["step"] = bench_step(feats, masks, args, stage)
    out["fit"] = bench_fit(feats, masks, args)
    out["machine"]["load_average_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
