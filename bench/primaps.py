"""PriMaPs speed: proposals (no CRF) and dense CRF per image, against the reference loop.

At 320x320 with dino_vits8-sized features (40x40x384), on two feature sources:

- ``synthetic``: piecewise-constant Voronoi layouts (8-14 regions per image) whose class vectors
  share a common mean direction (as ViT tokens do), plus smooth and per-pixel noise;
- ``real``: EfficientNet-Lite0 stride-16 features of the bundled photos at 640x640 (a 40x40
  grid), projected to 384 channels by a fixed random orthonormal matrix.

The reference loop is re-implemented here from its description (``torch.pca_lowrank(q=3,
niter=100)`` on the available raw features at every proposal, cosine similarity, re-anchoring,
threshold, median filter, gain, background, log-softmax) with the same sign rule as unseg (see
``unseg.proposals.primaps``); the share of identical pre-CRF labels compares the two at 320x320.
CRF throughput is measured with 1 and 2 worker processes on the same inputs, after warm-up.

PriMaPs-EM (``em``): milliseconds per EM step (E-step + M-step + EMA) for the ``reference`` and
``cosine`` classifiers, batch 32 of VOC-sized feature maps (an image of 500x375 at short side
320 → 320x416 pixels; default tap: stride 32, 320 channels), K = 21, at label factor 2 (the
pipeline's default) and at the full label resolution (factor = stride, the paper's). A step's
time is the difference of two fits (1 and 1 + N steps; best of two each, after a warm-up fit)
divided by N, so the initialisation is not counted (N = ``--em-steps`` at full resolution, ten
times that at factor 2).

Semantic refinement (``refine``): ms/image at VOC size (500x375), K = 21 soft maps, for the dense
CRF (``unseg.refine.crf``) and for the guided filter (``unseg.refine.guided_filter``, radius 9,
ε 1e-3, luminance guide, including the softmax and upsampling of the logits), both single-threaded
in this process on the bundled photos, and their ratio.

Prints one JSON object. ``python bench/primaps.py [--images N] [--repeat R] [--only em,refine]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from _machine import machine

from unseg.methods.base import FitInputs
from unseg.methods.primaps_em import PriMaPsEM, PriMaPsEMConfig
from unseg.proposals.primaps import (
    PriMaPsConfig,
    ids_from_argmax,
    labels_from_log_probs,
    principal_masks,
    proposal_log_probs,
)
from unseg.refine.crf import CRFPool
from unseg.refine.semantic import RefineConfig, refine_logits

SIZE = 320
GRID = 40
DIM = 384
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def synthetic_features(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` structured feature maps ``[384, 40, 40]`` (Voronoi regions of shared classes)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(DIM, generator=g) * 1.5
    classes = torch.randn(20, DIM, generator=g) * 2.0 + common
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 15, (1,), generator=g))
        seeds = torch.rand(k, 2, generator=g) * GRID
        d = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
        region = d.argmin(0)
        cls = torch.randint(0, 20, (k,), generator=g)[region]
        smooth = F.interpolate(torch.randn(1, DIM, 5, 5, generator=g), size=(GRID, GRID),
                               mode="bilinear", align_corners=False)[0]
        f = classes[cls].permute(2, 0, 1) + 0.6 * smooth + 0.8 * torch.randn(DIM, GRID, GRID,
                                                                             generator=g)
        out.append(f.contiguous())
    return out


def real_features() -> list[torch.Tensor]:
    """EfficientNet-Lite0 features of the sample photos on a 40x40 grid, projected to 384-d."""
    from unseg.backbones import create_backbone
    from unseg.data.image import load_image
    from unseg.features import prepare_image

    model = create_backbone("efficientnet_lite0", device="cpu")
    g = torch.Generator().manual_seed(0)
    proj, _ = torch.linalg.qr(torch.randn(model.dim, DIM, generator=g))
    feats = []
    with torch.inference_mode():
        for p in sorted(EXAMPLES.glob("*.jpg")):
            x = prepare_image(load_image(p), GRID * model.stride, model.stride, crop=True)
            f = model.forward_features(x[None])[0]
            feats.append(torch.einsum("chw,cd->dhw", f, proj).contiguous())
    return feats


def reference_labels(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Pre-CRF labels ``[320, 320]`` from a straightforward re-implementation of the reference."""
    torch.manual_seed(seed)
    c, h, w = features.shape
    unit = F.normalize(features, dim=0)
    avail = torch.ones(h, w, dtype=torch.bool)
    memory: list[torch.Tensor] = []
    masks = []
    while (~avail).sum() / avail.numel() < 0.95:
        _, _, v = torch.pca_lowrank(features[:, avail].T, q=3, niter=100)
        v = v[:, 0]
        sim = torch.einsum("c,cij->ij", v, unit)
        sim[~avail] = 0
        if sim[avail].max() < -sim[avail].min():  # unseg's sign rule (see module docstring)
            sim = -sim
        masked = torch.where(avail, sim, torch.full_like(sim, -2.0))
        anchor = unit.reshape(c, -1)[:, int(masked.argmax())]
        sim = torch.einsum("c,cij->ij", anchor, unit)
        sim[~avail] = 0
        peak = sim.max()
        if peak > 0:
            sim[sim < 0.4 * peak] = 0
            sim = sim / peak
            masks.append(sim.clone())
            avail[sim > 0] = False
        memory.insert(0, avail.clone())
        if len(memory) > 3:
            memory.pop()
            if all(torch.equal(memory[0], m) for m in memory):
                break
    stack = torch.stack(masks)[None]
    padded = F.pad(stack, (1, 1, 1, 1), mode="reflect")
    med = padded.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*stack.shape, 9).median(-1).values[0]
    med = (med * 10).clamp(0, 1)
    bg = (med[med != 0].mean() - med.sum(0)).clamp(0, 1)[None]
    lp = torch.log_softmax(torch.cat([bg, med]), dim=0)
    up = F.interpolate(lp[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    return ids_from_argmax(up.argmax(0))


def fast_log_probs(features: torch.Tensor) -> torch.Tensor:
    return proposal_log_probs(principal_masks(features, PriMaPsConfig()).masks)


def crf_images(n: int) -> list[np.ndarray]:
    """``n`` real 320x320 RGB images (the sample photos, repeated and flipped)."""
    from unseg.data.image import load_image
    from unseg.features import prepare_image

    base = [
        (prepare_image(load_image(p), SIZE, 8, crop=True) * 255).round().byte().permute(1, 2, 0)
        for p in sorted(EXAMPLES.glob("*.jpg"))
    ]
    out = []
    for i in range(n):
        img = base[i % len(base)].numpy()
        out.append(np.ascontiguousarray(img[:, ::-1] if (i // len(base)) % 2 else img))
    return out


def bench_source(name: str, feats: list[torch.Tensor], repeat: int) -> dict:
    """Timings and label agreement of the fast loop vs the reference on one feature source."""
    fast_s, ref_s, same, total, counts = 0.0, 0.0, 0, 0, []
    for f in feats:
        for _ in range(repeat):
            t = time.perf_counter()
            lp = fast_log_probs(f)
            fast_s += time.perf_counter() - t
        fast = labels_from_log_probs(lp, (SIZE, SIZE))
        t = time.perf_counter()
        ref = reference_labels(f)
        ref_s += time.perf_counter() - t
        # proposal ids come in the same order from both loops: compare them directly
        same += int((fast == ref).sum())
        total += fast.numel()
        counts.append(lp.shape[0] - 1)
    n = len(feats)
    fast_ms = 1000 * fast_s / (n * repeat)
    ref_ms = 1000 * ref_s / n
    return {
        "source": name,
        "images": n,
        "proposals_per_image": float(np.mean(counts)),
        "proposals_ms_per_image": round(fast_ms, 2),
        "reference_ms_per_image": round(ref_ms, 2),
        "speedup": round(ref_ms / fast_ms, 2),
        "identical_pre_crf_labels": round(same / total, 5),
    }


def bench_crf(feats: list[torch.Tensor], n_images: int) -> dict:
    images = crf_images(n_images)
    logits = [fast_log_probs(feats[i % len(feats)]) for i in range(n_images)]
    labels = float(np.mean([len(x) for x in logits]))
    result: dict = {"images": n_images, "labels_per_image": labels}
    # one process means one core: the pool's workers run single-threaded, so the in-process
    # baseline must too (else torch's intra-op threads give it the second core as well)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for workers in (1, 2):
        with CRFPool(workers) as pool:
            # warm-up: enough tasks that every worker has started and run one
            pool.map(images[: 4 * workers], logits[: 4 * workers])
            t = time.perf_counter()
            pool.map(images, logits)
            elapsed = time.perf_counter() - t
        result[f"ms_per_image_{workers}_process"] = round(1000 * elapsed / n_images, 2)
    torch.set_num_threads(threads)
    result["throughput_2_vs_1"] = round(
        result["ms_per_image_1_process"] / result["ms_per_image_2_process"], 2
    )
    return result


VOC_SIZE = (375, 500)  # H, W of a typical PASCAL VOC image
EM_CLASSES = 21


def em_inputs(
    batch: int, dim: int, grid: tuple[int, int], factor: int, seed: int = 0
) -> FitInputs:
    """``batch`` feature maps ``[dim, *grid]`` of 21 planted classes (non-negative, as after a
    ReLU6) and block proposals at ``factor`` times the grid (the top rows ignored)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(EM_CLASSES, dim, generator=g) * 3.0
    h, w = grid
    feats, props = [], []
    for _ in range(batch):
        cells = torch.randint(0, EM_CLASSES, (3, 4), generator=g)
        cls = F.interpolate(cells[None, None].float(), size=grid, mode="nearest")[0, 0].long()
        noise = torch.randn(dim, h, w, generator=g)
        feats.append((centers[cls].permute(2, 0, 1) + 0.5 * noise).clamp(0, 6).contiguous())
        ids = torch.arange(12).view(1, 1, 3, 4).float()
        p = F.interpolate(ids, size=(h * factor, w * factor), mode="nearest")[0, 0].long()
        p[: factor] = 255
        props.append(p)
    return FitInputs(feats, proposals=props, student_features=[f * 0.9 + 0.05 for f in feats])


def bench_em(batch: int, dim: int, stride: int, steps: int) -> dict:
    """ms per EM step, both classifiers, at label factor 2 and at the stride."""
    grid = (320 // stride, 416 // stride)
    rows = []
    for factor in sorted({2, stride}):
        inputs = em_inputs(batch, dim, grid, factor)
        timed = steps if factor == stride else 10 * steps  # small steps: more of them
        for classifier in ("reference", "cosine"):
            fit_s: dict[int, list[float]] = {1: [], 1 + timed: []}
            for n in (1, 1, 1 + timed, 1, 1 + timed):
                cfg = PriMaPsEMConfig(
                    num_classes=EM_CLASSES, steps=n, batch_size=batch, label_factor=factor,
                    classifier=classifier,  # type: ignore[arg-type]
                )
                t = time.perf_counter()
                PriMaPsEM(cfg, "cpu").fit(inputs)
                fit_s[n].append(time.perf_counter() - t)
            one = min(fit_s[1][1:])  # the first fit is a warm-up
            many = min(fit_s[1 + timed])
            rows.append({
                "classifier": classifier,
                "label_factor": factor,
                "label_size": [grid[0] * factor, grid[1] * factor],
                "timed_steps": timed,
                "ms_per_step": round(1000 * (many - one) / timed, 1),
            })
    return {
        "batch": batch,
        "num_classes": EM_CLASSES,
        "feature_shape": [dim, *grid],
        "torch_threads_in_steps": 1,
        "steps": rows,
    }


def voc_images() -> list[np.ndarray]:
    """The bundled photos resized to VOC size, uint8 RGB ``[375, 500, 3]``."""
    from unseg.data.image import load_image

    out = []
    for p in sorted(EXAMPLES.glob("*.jpg")):
        x = torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=VOC_SIZE, mode="bilinear", antialias=True, align_corners=False)
        out.append(np.ascontiguousarray(x[0].round().clamp(0, 255).byte().permute(1, 2, 0)))
    return out


def bench_refine(repeat: int) -> dict:
    """Semantic refinement ms/image at VOC size, as the pipeline runs it
    (:func:`unseg.refine.semantic.refine_logits` on logits upsampled to the image): none, dense
    CRF, guided filter (exact and fast), guided+CRF; one torch and one OpenCV thread each."""
    images = voc_images()
    g = torch.Generator().manual_seed(0)
    grid = (VOC_SIZE[0] // 16, VOC_SIZE[1] // 16)
    logits = [4 * torch.randn(EM_CLASSES, *grid, generator=g) for _ in images]
    modes = {
        "none": RefineConfig(mode="none"),
        "crf": RefineConfig(mode="crf"),
        "guided": RefineConfig(mode="guided", subsample=1),
        "guided_fast2": RefineConfig(mode="guided", subsample=2),
        "guided_fast4": RefineConfig(mode="guided", subsample=4),
        "guided+crf": RefineConfig(mode="guided+crf", subsample=1),
    }
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    def run(img: np.ndarray, lg: torch.Tensor, cfg: RefineConfig) -> torch.Tensor:
        up = F.interpolate(lg[None], size=VOC_SIZE, mode="bilinear", align_corners=False)[0]
        return refine_logits(up, img, cfg)

    timings = {name: 0.0 for name in modes}
    for cfg in modes.values():
        run(images[0], logits[0], cfg)  # warm-up
    for _ in range(repeat):  # interleaved, so a change of load hits every mode alike
        for name, cfg in modes.items():
            t = time.perf_counter()
            for img, lg in zip(images, logits, strict=True):
                run(img, lg, cfg)
            timings[name] += time.perf_counter() - t
    torch.set_num_threads(threads)
    cv2.setNumThreads(cv_threads)
    ms = {k: 1000 * v / (repeat * len(images)) for k, v in timings.items()}
    refine_ms = {k: ms[k] - ms["none"] for k in ms if k != "none"}  # beyond upsample + softmax
    return {
        "image_size": list(VOC_SIZE),
        "num_classes": EM_CLASSES,
        "logit_grid": list(grid),
        "images": len(images) * repeat,
        "threads": {"torch": 1, "opencv": 1},
        "guided_filter": {"radius": modes["guided"].radius, "eps": modes["guided"].eps,
                          "guide": "luma"},
        "ms_per_image": {k: round(v, 2) for k, v in ms.items()},
        "refinement_ms_per_image": {k: round(v, 2) for k, v in refine_ms.items()},
        "guided_vs_crf": round(refine_ms["guided"] / refine_ms["crf"], 4),
        "guided_fast2_vs_crf": round(refine_ms["guided_fast2"] / refine_ms["crf"], 4),
        "guided_fast4_vs_crf": round(refine_ms["guided_fast4"] / refine_ms["crf"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="synthetic images (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the fast loop")
    parser.add_argument("--crf-images", type=int, default=16, help="images for the CRF timing")
    parser.add_argument("--em-batch", type=int, default=32, help="EM batch (default 32)")
    parser.add_argument("--em-dim", type=int, default=320, help="feature channels (default 320)")
    parser.add_argument("--em-stride", type=int, default=32, help="feature stride (default 32)")
    parser.add_argument("--em-steps", type=int, default=3,
                        help="timed full-resolution EM steps (default 3)")
    parser.add_argument("--only", default="proposals,crf,em,refine",
                        help="comma-separated sections (default: all)")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    out: dict = {
        "benchmark": "primaps",
        "machine": machine(),
        "image_size": [SIZE, SIZE],
        "feature_shape": [DIM, GRID, GRID],
    }
    if sections & {"proposals", "crf"}:
        synthetic = synthetic_features(args.images)
        real = real_features()
        if "proposals" in sections:
            out["proposals"] = [
                bench_source("synthetic", synthetic, args.repeat),
                bench_source("real", real, args.repeat),
            ]
        if "crf" in sections:
            out["crf"] = bench_crf(synthetic + real, args.crf_images)
    if "em" in sections:
        out["em"] = bench_em(args.em_batch, args.em_dim, args.em_stride, args.em_steps)
    if "refine" in sections:
        out["refine"] = bench_refine(args.repeat)
    out["machine"]["load_average_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
