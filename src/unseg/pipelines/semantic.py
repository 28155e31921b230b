"""Semantic pipelines: fit PriMaPs-EM or k-means on a folder, predict label PNGs, segment = both.

Run folder (``unseg.runs``): ``config.json`` (method config + backbone, weights sha256, feature
size, K, prediction settings) and ``weights.safetensors`` (the prototypes), plus ``cache/``:
the feature cache (``unseg.features``) and the PriMaPs pseudo-labels (one safetensors file per
image, named by the image's sha256, under a folder named by the settings they depend on).

Prediction per image: the image resized as for the features, features of it and of its
horizontal flip (flipped back) averaged, cosine logits of the prototypes at ``label_factor``
times the feature resolution, upsampled bilinearly to the original image size, optional dense
CRF on the original image, argmax → palette PNG (pixel value = class id).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import (
    backbone_weights_sha256,
    create_backbone,
    create_fitted_backbone,
)
from unseg.backbones.base import Backbone
from unseg.data.color import luma
from unseg.data.datasets import dataset_images
from unseg.data.image import load_image
from unseg.data.layouts import resolve_image_dir
from unseg.data.resize import prepare_image
from unseg.data.transforms import color_jitter
from unseg.errors import InputFileError, UnsegError
from unseg.features import FeatureSet, extract_features
from unseg.methods.kmeans import CosineKMeans, KMeansConfig
from unseg.methods.primaps_em import PriMaPsEM, PriMaPsEMConfig, cosine_logits
from unseg.pipelines.backbone import resolve_backbone_name
from unseg.pipelines.pseudo_labels import compute_pseudo_labels, pseudo_label_dir
from unseg.proposals.primaps import PriMaPsConfig
from unseg.refine.crf import CRFConfig, CRFPool
from unseg.report.overlays import overlay
from unseg.report.palette import png_palette
from unseg.runs import load_run, save_run
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, cpu_threads, resolve_device, seed_everything
from unseg.utils.io import save_jpeg_atomic, save_png_atomic
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)

Method = Literal["primaps-em", "kmeans"]
METHODS: tuple[str, ...] = ("primaps-em", "kmeans")
CHUNK = 16  # images per CRF round
MAX_CLASSES = 256  # label PNGs are 8-bit palette images
# `unseg segment` on a handful of photos: a few coarse classes shared by them (person, animal,
# sky, ground, object) rather than a dataset's 21 or 27.
DEFAULT_SEGMENT_CLASSES = 5


@dataclass(frozen=True)
class PredictSettings:
    """How a run predicts: flip averaging, CRF, feature upsampling before the cosine logits."""

    flip: bool = True
    crf: bool = True
    label_factor: int = 2


@dataclass
class FitResult:
    """What a fit did: the run folder, the images used, failures, and training facts."""

    run_dir: Path
    report: BatchReport
    n_images: int
    facts: dict[str, Any] = field(default_factory=dict)


def default_workers() -> int:
    """CRF processes of this rank: its share of the CPU cores among the torchrun ranks, at most
    8."""
    return max(1, min(8, cpu_count() // dist.world_size()))


def _too_small(feats: FeatureSet, stride: int, report: BatchReport) -> list[Path]:
    keep = []
    for p in feats.paths:
        h, w = feats.original_size(p)
        if min(h, w) < stride:
            report.fail(p, f"image {w}x{h} is smaller than one {stride}-pixel patch")
        else:
            keep.append(p)
    return keep


@torch.no_grad()
def student_features(
    paths: list[Path], model: Backbone, size: int, seed: int, device: torch.device
) -> list[torch.Tensor]:
    """Features ``[C, h, w]`` of one photometrically augmented view of each image (colour
    jitter 0.4/0.4/0.4/0.1 and, with probability 0.2, greyscale), seeded per image order.

    The reference draws a fresh augmentation every step; one fixed view per image keeps the
    backbone out of the training loop (documented deviation).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in progress(paths, total=len(paths), desc="student views"):
        x = prepare_image(load_image(p), size, model.stride)
        x, _ = color_jitter(x, None, gen)
        if torch.rand((), generator=gen) < 0.2:
            x = luma(x).expand(3, -1, -1)
        out.append(model.forward_features(x[None].to(device), "tokens")[0].float().cpu())
    return out


def fit_semantic(
    data: str | Path,
    run_dir: str | Path,
    method: Method,
    num_classes: int,
    backbone: str,
    *,
    weights: str | Path | None = None,
    size: int = 320,
    epochs: int | None = None,
    steps: int | None = None,
    crf: bool = True,
    flip: bool = True,
    label_factor: int = 2,
    student_augs: bool = False,
    logit_scale: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    num_workers: int | None = None,
) -> FitResult:
    """Fit ``method`` with ``num_classes`` classes on the images of ``data``; save to ``run_dir``.

    ``crf`` and ``flip`` are stored as the run's prediction defaults (PriMaPs pseudo-labels always
    use the CRF, as the paper). ``label_factor``: feature upsampling for training and prediction.
    ``student_augs``: PriMaPs-EM's θ trains on a photometrically augmented view;
    ``logit_scale``: its M-step logits are ``logit_scale`` x cosine (spec: 1).
    ``weights``: an explicit backbone weights file (recorded in the run for prediction).
    """
    if method not in METHODS:
        raise UnsegError(f"unknown semantic method {method!r}; use one of {', '.join(METHODS)}")
    if num_classes < 2:
        raise UnsegError(f"--num-classes must be at least 2, got {num_classes}")
    if num_classes > MAX_CLASSES:
        raise UnsegError(
            f"--num-classes {num_classes}: masks are 8-bit palette PNGs, at most {MAX_CLASSES} "
            "classes"
        )
    if label_factor < 1:
        raise UnsegError(f"label factor must be >= 1, got {label_factor}")
    with dist.joined(resolve_device(device)) as dev:
        return _fit(
            data, Path(run_dir), method, num_classes, backbone, weights, size, epochs, steps,
            PredictSettings(flip=flip, crf=crf, label_factor=label_factor), student_augs,
            logit_scale, seed, dev, num_workers,
        )


def _fit(
    data: str | Path,
    run_dir: Path,
    method: Method,
    num_classes: int,
    backbone: str,
    weights: str | Path | None,
    size: int,
    epochs: int | None,
    steps: int | None,
    settings: PredictSettings,
    student_augs: bool,
    logit_scale: float,
    seed: int,
    dev: torch.device,
    num_workers: int | None,
) -> FitResult:
    seed_everything(seed)
    workers = num_workers or default_workers()
    paths = dataset_images(data)
    model = create_backbone(backbone, weights=weights, device=dev)
    report = BatchReport()
    feats = extract_features(paths, model, size=size, cache_dir=run_dir / "cache" / "features",
                             report=report)
    good = _too_small(feats, model.stride, report)
    if not good:
        raise UnsegError(f"{data}: none of the {len(paths)} image(s) could be used")
    feature_list = [feats[p] for p in good]
    facts: dict[str, Any] = {}
    if method == "kmeans":
        cfg_km = KMeansConfig(num_classes=num_classes, seed=seed)
        rows = torch.cat([f.reshape(f.shape[0], -1).T for f in feature_list])
        km = CosineKMeans(cfg_km).fit(rows.to(dev))
        config: Any = cfg_km
        tensors = {"prototypes": km.centers_.cpu()}
        facts["inertia"] = km.inertia_
    else:
        cfg_em = PriMaPsEMConfig(
            num_classes=num_classes,
            epochs=PriMaPsEMConfig.epochs if epochs is None else epochs,
            steps=steps,
            label_factor=settings.label_factor,
            flip=settings.flip,
            crf=settings.crf,
            student_augs=student_augs,
            logit_scale=logit_scale,
            seed=seed,
        )
        pcfg = PriMaPsConfig()
        crf_cfg = CRFConfig()
        pseudo = compute_pseudo_labels(
            good, feats, pseudo_label_dir(run_dir, feats, pcfg, crf_cfg), size, model.stride, pcfg,
            crf_cfg, workers,
        )
        student = student_features(good, model, size, seed, dev) if student_augs else None
        em = PriMaPsEM(cfg_em).fit(feature_list, pseudo, student, device=dev)
        config = cfg_em
        tensors = em.tensors()
        facts.update(steps=len(em.history_), final_loss=em.history_[-1] if em.history_ else None)
        facts["primaps"] = asdict(pcfg)
    if dist.is_main():
        save_run(
            run_dir,
            method,
            config,
            tensors,
            extra={
                "backbone": model.spec.name,
                "weights_sha256": backbone_weights_sha256(model),
                "weights_path": str(Path(weights).resolve()) if weights else None,
                "feature_size": size,
                "feature_dim": int(feature_list[0].shape[0]),
                "stride": model.stride,
                "num_classes": num_classes,
                "predict": asdict(settings),
                "n_images": len(good),
                "fit": facts,
            },
        )
    dist.barrier()
    return FitResult(run_dir=run_dir, report=report, n_images=len(good), facts=facts)


# ------------------------------------------------------------------------------ prediction


@dataclass
class _LoadedRun:
    method: str
    prototypes: torch.Tensor
    backbone: Backbone
    size: int
    settings: PredictSettings
    num_classes: int


def _load_for_prediction(
    run_dir: Path, overrides: dict[str, Any], device: torch.device
) -> _LoadedRun:
    meta, tensors = load_run(run_dir, METHODS)
    needed = ("backbone", "weights_sha256", "feature_size", "num_classes", "predict")
    missing = [k for k in needed if k not in meta]
    if missing or "prototypes" not in tensors:
        what = ", ".join(missing) if missing else "tensor 'prototypes'"
        raise UnsegError(f"{run_dir}: incomplete {meta['method']} run (missing {what}); refit it")
    if int(meta["num_classes"]) > MAX_CLASSES:
        raise UnsegError(
            f"{run_dir}: {meta['num_classes']} classes do not fit the 8-bit label PNGs "
            f"(at most {MAX_CLASSES})"
        )
    model = create_fitted_backbone(
        meta["backbone"],
        meta["weights_sha256"],
        weights=overrides.get("weights") or meta.get("weights_path"),
        device=device,
        source=str(run_dir),
    )
    settings = PredictSettings(**meta["predict"])
    if "crf" in overrides:
        settings = PredictSettings(settings.flip, bool(overrides["crf"]), settings.label_factor)
    prototypes = tensors["prototypes"].float()
    if prototypes.shape != (meta["num_classes"], model.dim):
        raise UnsegError(
            f"{run_dir}: prototypes {tuple(prototypes.shape)} do not fit K={meta['num_classes']} "
            f"and {meta['backbone']} ({model.dim} channels)"
        )
    return _LoadedRun(meta["method"], prototypes, model, int(meta["feature_size"]), settings,
                      int(meta["num_classes"]))


@torch.inference_mode()
def predict_logits(run: _LoadedRun, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """Cosine logits ``[K, H, W]`` of uint8 RGB ``image [H, W, 3]`` at its own resolution."""
    stride = run.backbone.stride
    x = prepare_image(image, run.size, stride).to(device)[None]
    batch = torch.cat([x, x.flip(-1)]) if run.settings.flip else x
    f = run.backbone.forward_features(batch, "tokens").float()
    feats = (f[0] + f[1].flip(-1)) / 2 if run.settings.flip else f[0]
    lg = cosine_logits(feats, run.prototypes.to(device), run.settings.label_factor)
    size = image.shape[:2]
    return F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0].cpu()


def _output_name(path: Path, root: Path) -> Path:
    rel = path.name if root.is_file() else path.relative_to(root)
    return Path(rel).with_suffix(".png")


def predict_images(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    overlay_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> BatchReport:
    """Label PNGs (palette embedded, value = class id) for every image under ``images``.

    Optional JPEG overlays in ``overlay_dir``. Broken images are reported and skipped. Under
    torchrun each rank predicts its share.
    """
    with dist.joined(resolve_device(device)) as dev:
        return _predict(
            Path(run_dir), Path(images), Path(out_dir), overrides or {}, dev,
            None if overlay_dir is None else Path(overlay_dir), num_workers,
        )


def _predict(
    run_dir: Path,
    root: Path,
    out_dir: Path,
    overrides: dict[str, Any],
    dev: torch.device,
    overlay_dir: Path | None,
    num_workers: int | None,
) -> BatchReport:
    run = _load_for_prediction(run_dir, overrides, dev)
    paths = dist.shard(dataset_images(root), dist.rank(), dist.world_size())
    names_root = resolve_image_dir(root)
    report = BatchReport()
    palette = png_palette()
    workers = (num_workers or default_workers()) if run.settings.crf else 1
    with CRFPool(workers) as pool:
        for start in progress(range(0, len(paths), CHUNK), desc="predict"):
            loaded: list[tuple[Path, np.ndarray, torch.Tensor]] = []
            for p in paths[start : start + CHUNK]:
                try:
                    img = load_image(p)
                    if min(img.shape[:2]) < run.backbone.stride:
                        raise InputFileError(
                            p, f"image {img.shape[1]}x{img.shape[0]} is smaller than one "
                            f"{run.backbone.stride}-pixel patch"
                        )
                    # one intra-op thread: many mid-sized ops, and the CRF processes need the
                    # cores; on a shared machine this is several times faster than two
                    with cpu_threads(dev, 1):
                        loaded.append((p, img, predict_logits(run, img, dev)))
                except InputFileError as exc:
                    report.fail(p, exc.problem)
            if run.settings.crf:
                probs = pool.map([img for _, img, _ in loaded], [lg for _, _, lg in loaded])
                labels = [np.asarray(q).argmax(0) for q in probs]
            else:
                labels = [lg.argmax(0).numpy() for _, _, lg in loaded]
            for (p, img, _), lab in zip(loaded, labels, strict=True):
                lab8 = lab.astype(np.uint8)
                target = out_dir / _output_name(p, names_root)
                save_png_atomic(target, lab8, palette=palette)
                report.written.append(target)
                if overlay_dir is not None:
                    jpg = (overlay_dir / _output_name(p, names_root)).with_suffix(".jpg")
                    save_jpeg_atomic(jpg, overlay(img, lab8))
    if dist.is_distributed():
        parts = dist.all_gather_objects((report.written, report.failed))
        report = BatchReport(
            written=[w for part in parts for w in part[0]],
            failed=[f for part in parts for f in part[1]],
        )
    return report


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: dict[str, Any],
    device: str | None,
) -> BatchReport:
    """``unseg predict`` for PriMaPs-EM and k-means runs (see :func:`predict_images`)."""
    return predict_images(run_dir, images, out_dir, overrides, device)


def segment(
    images: str | Path,
    out_dir: str | Path,
    method: Method = "primaps-em",
    num_classes: int = DEFAULT_SEGMENT_CLASSES,
    backbone: str | None = None,
    *,
    weights: str | Path | None = None,
    size: int = 320,
    epochs: int | None = None,
    steps: int | None = None,
    crf: bool = True,
    label_factor: int = 2,
    seed: int = 0,
    device: str | None = None,
    num_workers: int | None = None,
) -> BatchReport:
    """Fit on ``images`` and predict them: ``out_dir/run``, ``out_dir/masks``, ``out_dir/overlays``.

    Returns the prediction's report, with the images the fit could not use among the failures.
    """
    out_dir = Path(out_dir)
    with dist.joined(resolve_device(device)) as dev:
        fit = fit_semantic(
            images, out_dir / "run", method, num_classes, resolve_backbone_name(backbone),
            weights=weights, size=size, epochs=epochs, steps=steps, crf=crf,
            label_factor=label_factor, seed=seed, device=str(dev), num_workers=num_workers,
        )
        report = predict_images(
            out_dir / "run", images, out_dir / "masks", {}, str(dev),
            overlay_dir=out_dir / "overlays", num_workers=num_workers,
        )
    seen = {p for p, _ in report.failed}
    report.failed = [f for f in fit.report.failed if f[0] not in seen] + report.failed
    return report
