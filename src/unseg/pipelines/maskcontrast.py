"""MaskContrast pipelines: fit on a folder with its saliency masks, predict label PNGs by
clustering the predicted images' prototypes, ``segment`` = discover → fit → predict, and the
embeddings other methods can be fitted on (chaining: ``unseg fit primaps-em --embeddings RUN``).

Fit: the images are paired with the masks of the saliency folder by stem
(:func:`unseg.proposals.saliency_masks.load_mask_proposals`: bad or missing masks are skipped and
reported, near-empty ones dropped and counted), their features extracted once (cached in
``RUN/cache`` or ``--cache-dir``), and the query views cut from the features of a photometric
copy of each image (:func:`~unseg.methods.maskcontrast.photometric_view`, seeded by the run's
seed and the image's hash, computed once per image and cached beside the features). The head
is trained with a checkpoint in the run folder after every epoch; the same command after a
kill resumes from it. With ``train_last_stage`` the features are the backbone's maps before its
last stage, and the run's ``tap`` is that earlier tap (``trained_tap`` the one asked for), so
prediction and chaining extract the same maps and the saved stage turns them into the tap's.
The run also keeps the training images' prototypes
(``train_prototypes.safetensors``) for clusters fitted on the training set.

Predict: one prototype per image (the paper's protocol: raw embeddings weighted by the saliency
logit where it exceeds 0.5), clustered into ``K − 1`` clusters on the predicted set (as the
paper) or on the training set (``clusters="training"``); an image's salient pixels take its
cluster + 1, the rest 0 (background); palette label PNGs as the other semantic methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from unseg.backbones import backbone_weights_sha256
from unseg.backbones.base import Backbone
from unseg.data.datasets import no_usable_images, resolve_inputs
from unseg.data.inputs import output_name
from unseg.data.layouts import resolve_image_dir
from unseg.data.memory import ImageInputs
from unseg.errors import UnsegError
from unseg.feature_store import FeatureSet
from unseg.features import extract_features
from unseg.layout import (
    CACHE_DIR,
    DISCOVER_DIR,
    MASKS_DIR,
    OVERLAYS_DIR,
    RUN_DIR,
    TRAIN_PROTOTYPES,
)
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import (
    MaskContrast,
    MaskContrastConfig,
    PrototypeClusters,
    cluster_prototypes,
    photometric_view,
    weighted_prototype,
)
from unseg.pipelines.backbone import open_backbone, open_fitted_backbone, resolve_backbone_name
from unseg.pipelines.fitting import FitResult, build_config, check_fit_inputs
from unseg.pipelines.pseudo_labels import hwc
from unseg.proposals.saliency_masks import MaskProposals, ProposalReport, load_mask_proposals
from unseg.registry import get_method
from unseg.runs import load_fitted, save_fitted
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_threads, resolve_device, seed_everything
from unseg.utils.hashing import settings_key
from unseg.utils.io import atomic_write, save_jpeg_atomic, save_png_atomic
from unseg.utils.overlays import overlay
from unseg.utils.palette import png_palette
from unseg.utils.progress import progress
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

METHOD = "maskcontrast"
Clusters = Literal["predicted", "training"]
CHUNK = 32  # images per feature extraction round at prediction


@dataclass(frozen=True)
class MaskContrastSettings:
    """How a MaskContrast command runs, besides the method's config: backbone, feature short
    side ``size``, seed, device, feature cache folder (None: the run's ``cache/``)."""

    backbone: str | None = None
    weights: str | None = None
    tap: str | None = None
    size: int = 320
    seed: int = 0
    device: str | None = None
    cache_dir: str | None = None


@dataclass
class MaskContrastFit(FitResult):
    """:class:`FitResult` plus the mask proposals' report (kept, dropped, bad masks)."""

    masks: ProposalReport = field(default_factory=ProposalReport)


def _photometric_features(
    paths: Sequence[Path],
    feats: FeatureSet,
    model: Backbone,
    config: MaskContrastConfig,
    cache: Path | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """Features ``[C, h, w]`` of a photometric copy of each image (its ``"image"`` extra),
    seeded by the config's seed and the image's hash, cached in ``cache`` (one file per image;
    None: not cached)."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    out: list[torch.Tensor] = []
    for p in progress(paths, total=len(paths), desc="photometric views", unit="img"):
        sha = feats.record(p).sha256
        file = None if cache is None else cache / f"{sha}.safetensors"
        if file is not None and file.is_file():
            out.append(load_file(str(file))["features"])
            continue
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + int(sha[:12], 16))
        image = photometric_view(feats.extra(p, "image").float() / 255.0, gen, config)
        with torch.inference_mode():
            f = model.forward_features(image[None].to(device), "tokens")[0]
        f = f.to("cpu", feats[p].dtype).contiguous()
        if file is not None:
            atomic_write(file, lambda t, f=f: save_file({"features": f}, str(t)))
        out.append(f)
    return out


def _at_size(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``mask [H, W]`` (bool) resampled (nearest) to the resized image's ``size``: every image
    then has the backbone's stride in mask pixels, so views of the same ``view_size`` have the
    same feature grid across images of different sizes."""
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def _view_cache(cache: Path, feats: FeatureSet, config: MaskContrastConfig) -> Path:
    key = settings_key(
        {"features": feats.cache_dir.name if feats.cache_dir else None, "seed": config.seed,
         "jitter": list(config.jitter), "jitter_p": config.jitter_p, "grey_p": config.grey_p}
    )
    return cache / "maskcontrast-views" / key


def maskcontrast_config(options: Mapping[str, Any] | None, seed: int) -> MaskContrastConfig:
    """The MaskContrast config of ``options`` (config fields by name) and the run's ``seed``."""
    return build_config(get_method(METHOD), options, {"seed": seed})


@dataclass
class TrainedMaskContrast:
    """A MaskContrast fit in memory: the estimator, its backbone (at the tap it was trained
    on), the tap asked for, the images used, their features and training facts, and the
    training images' prototypes ``[N, D]``."""

    estimator: MaskContrast
    backbone: Backbone
    trained_tap: str | None
    paths: list[Path]
    feature_dim: int
    facts: dict[str, Any]
    prototypes: torch.Tensor
    masks: ProposalReport


def train_maskcontrast(
    root: str | Path,
    inputs: ImageInputs,
    masks: Callable[[list[Path]], tuple[MaskProposals, ProposalReport]],
    config: MaskContrastConfig,
    model: Backbone,
    size: int,
    cache: Path | None,
    device: torch.device,
    report: BatchReport,
    timings: Timings,
    checkpoint_dir: Path | None = None,
) -> TrainedMaskContrast:
    """Train MaskContrast on ``inputs`` with the saliency proposals ``masks(paths)`` gives
    (see the module docstring); ``cache`` None: nothing cached on disk; ``checkpoint_dir``: a
    checkpoint after every epoch, resumed by the same call after a kill."""
    trained_tap, stage = model.tap, None
    if config.train_last_stage:
        stage = model.last_stage()
        config = replace(config, stage_of=f"{model.spec.name}:{model.tap}")
        model.tap = stage.input_tap
    proposals, mask_report = masks(inputs.paths)
    report.merge(mask_report)
    mask_of = dict(zip(proposals.paths, proposals.masks, strict=True))
    feats = extract_features(
        proposals.paths, model, size=size,
        cache_dir=None if cache is None else cache / "features",
        report=report, extras=("image",), timings=timings, arrays=inputs.arrays,
    )
    good = feats.paths
    if not good:
        raise no_usable_images(root, report)
    with timings.stage("photometric views"):
        views = _photometric_features(
            good, feats, model, config,
            None if cache is None else _view_cache(cache, feats, config), device,
        )
    fit_inputs = FitInputs(
        features=[feats[p] for p in good],
        masks=[_at_size(mask_of[p], feats.image_size(p)) for p in good],
        student_features=views,
    )
    check_fit_inputs(fit_inputs)
    estimator = MaskContrast(config, device, stage=stage)
    with timings.stage("fitting"):
        estimator.fit(fit_inputs, checkpoint_dir=checkpoint_dir)
    facts = {
        "epochs": config.epochs,
        "steps": len(estimator.history_),
        "final_loss": estimator.history_[-1] if estimator.history_ else None,
        "view_fallbacks": estimator.fallbacks_,
        "masks": {"kept": mask_report.kept, "dropped": len(mask_report.dropped),
                  "bad": len(mask_report.failed)},
    }
    # many mid-sized ops: one intra-op thread (two only spin-wait on a loaded machine)
    with timings.stage("prototypes"), cpu_threads(device, 1):
        protos = torch.stack([
            image_prototype(estimator, feats[p], feats.image_size(p))[0] for p in good
        ])
    logger.info("%s", mask_report.summary())
    return TrainedMaskContrast(estimator, model, trained_tap, good,
                               int(feats[good[0]].shape[0]), facts, protos, mask_report)


def save_maskcontrast_run(
    run_dir: Path, trained: TrainedMaskContrast, size: int, weights: str | Path | None,
    timings: Timings,
) -> None:
    """The run folder of a MaskContrast fit (``unseg predict`` and ``--embeddings`` read it)."""
    protos = trained.prototypes
    atomic_write(run_dir / TRAIN_PROTOTYPES,
                 lambda t: save_file({"prototypes": protos.contiguous()}, str(t)))
    model = trained.backbone
    save_fitted(run_dir, get_method(METHOD), trained.estimator, extra={
        "backbone": model.spec.name,
        "tap": getattr(model, "tap", None),
        "trained_tap": trained.trained_tap,
        "weights_sha256": backbone_weights_sha256(model),
        "weights_path": str(Path(weights).resolve()) if weights else None,
        "feature_size": size,
        "feature_dim": trained.feature_dim,
        "stride": model.stride,
        "n_images": len(trained.paths),
        "fit": trained.facts,
        "timings": timings.as_dict(),
    })


def fit_maskcontrast(
    data: str | Path,
    saliency: str | Path,
    run_dir: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    settings: MaskContrastSettings | None = None,
    timings: Timings | None = None,
) -> MaskContrastFit:
    """Train MaskContrast on the images of ``data`` with the masks of the folder ``saliency``
    (8-bit PNGs named by the images' stems) and save it to ``run_dir``; a checkpoint in
    ``run_dir`` after every epoch, resumed by the same call after a kill.

    ``options``: config fields by name (e.g. ``{"epochs": 5}``); ``settings``: backbone,
    feature size, seed, device, cache.
    """
    settings = settings or MaskContrastSettings()
    config = maskcontrast_config(options, settings.seed)
    backbone_name = resolve_backbone_name(settings.backbone)
    run_dir = Path(run_dir)
    timings = timings if timings is not None else Timings()
    report = BatchReport()
    seed_everything(settings.seed)
    names_root = resolve_image_dir(data)
    with dist.joined(resolve_device(settings.device)) as dev:
        model = open_backbone(backbone_name, settings.weights, settings.tap, dev)
        inputs = ImageInputs(resolve_inputs(data, report, model.stride))
        cache = Path(settings.cache_dir) if settings.cache_dir else run_dir / CACHE_DIR
        trained = train_maskcontrast(
            data, inputs,
            lambda paths: load_mask_proposals(paths, saliency, names_root=names_root),
            config, model, settings.size, cache, dev, report, timings, checkpoint_dir=run_dir,
        )
        trained.facts["saliency"] = str(Path(saliency).resolve())
        if dist.is_main():
            save_maskcontrast_run(run_dir, trained, settings.size, settings.weights, timings)
        dist.barrier()
    return MaskContrastFit(run_dir, report, len(trained.paths), trained.facts, trained.masks)


@torch.no_grad()
def image_prototype(
    estimator: MaskContrast, features: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image's prototype ``[D]`` at ``size`` as the paper's protocol, its saliency logit
    ``[h, w]`` at the feature grid: bilinearly upsampled, it is the logit at any size)."""
    emb, sal = estimator.forward(features)
    up_emb = F.interpolate(emb[None], size=size, mode="bilinear", align_corners=False)[0]
    up_sal = F.interpolate(sal[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return weighted_prototype(up_emb, up_sal * (up_sal > 0.5)).cpu(), sal.cpu()


def salient_pixels(logit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Salient pixels ``[H, W]`` (bool) at ``size`` of a saliency ``logit [h, w]`` (logit above
    0.5 after bilinear upsampling, the paper's rule)."""
    up = F.interpolate(logit[None, None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0, 0] > 0.5


def _assign(
    where: str | Path, protos: torch.Tensor, num_clusters: int, clusters: Clusters, seed: int,
    train: torch.Tensor | None,
) -> torch.Tensor:
    """Cluster ids ``[N]`` of ``protos [N, D]``, fitted on them or on the training set's
    prototypes ``train`` (None: the run ``where`` has none)."""
    if clusters == "predicted":
        if protos.shape[0] < max(num_clusters, 2):
            raise UnsegError(
                f"{num_clusters} clusters fitted on the predicted images need at least "
                f"{max(num_clusters, 2)} of them, got {protos.shape[0]} (use fewer classes, more "
                "images, or --clusters training)"
            )
        return cluster_prototypes(protos, num_clusters, seed=seed)
    if clusters != "training":
        raise UnsegError(f"clusters must be 'predicted' or 'training', got {clusters!r}")
    if train is None:
        raise UnsegError(f"{where}: no {TRAIN_PROTOTYPES}; refit the run or use --clusters "
                         "predicted")
    if train.shape[0] < num_clusters:
        raise UnsegError(f"{where}: {train.shape[0]} training images cannot make "
                         f"{num_clusters} clusters")
    return PrototypeClusters.fit(train, num_clusters, seed=seed).assign(protos)


def train_prototypes(run_dir: Path) -> torch.Tensor | None:
    """The training images' prototypes ``[N, D]`` a run keeps (None: it has none)."""
    file = run_dir / TRAIN_PROTOTYPES
    return load_file(str(file))["prototypes"] if file.is_file() else None


def _write(
    path: Path,
    labels: np.ndarray,
    names_root: Path,
    out_dir: Path,
    overlay_dir: Path | None,
    image: torch.Tensor | None,
    report: BatchReport,
) -> None:
    """Palette PNG of ``labels [H, W]`` (and the overlay on ``image [3, H', W']`` when asked)."""
    lab8 = labels.astype(np.uint8)
    target = out_dir / output_name(path, names_root)
    save_png_atomic(target, lab8, palette=png_palette())
    report.written.append(target)
    if overlay_dir is not None and image is not None:
        big = F.interpolate(image[None].float(), size=lab8.shape, mode="bilinear",
                            align_corners=False)[0].round().clamp(0, 255).byte()
        jpg = (overlay_dir / output_name(path, names_root)).with_suffix(".jpg")
        save_jpeg_atomic(jpg, overlay(hwc(big), lab8))


def maskcontrast_labels(
    estimator: MaskContrast,
    model: Backbone,
    size: int,
    inputs: ImageInputs,
    num_classes: int,
    *,
    clusters: Clusters = "predicted",
    seed: int = 0,
    train: torch.Tensor | None = None,
    where: str | Path = "run",
    report: BatchReport,
    device: torch.device,
    with_images: bool = False,
) -> list[tuple[Path, np.ndarray, torch.Tensor | None]]:
    """``(path, class ids [H, W] int64, resized image or None)`` of each image of ``inputs``
    (module docstring: 0 = background, clusters ``1..num_classes − 1``); ``seed``: k-means;
    ``train``: the training prototypes (``clusters="training"``). Under torchrun each rank
    passes its share: it computes those prototypes, every rank clusters all of them (same
    seed, same ids) and labels its share."""
    if not 2 <= num_classes <= 256:
        raise UnsegError(f"--num-classes must be between 2 and 256, got {num_classes}")
    paths = inputs.paths
    kept: list[tuple[Path, torch.Tensor, tuple[int, int], torch.Tensor | None]] = []
    protos: list[torch.Tensor] = []
    for start in range(0, len(paths), CHUNK):
        feats = extract_features(
            paths[start : start + CHUNK], model, size=size, report=report,
            extras=("image",) if with_images else (), shard=False, arrays=inputs.arrays,
        )
        for p in feats.paths:
            with cpu_threads(device, 1):
                proto, logit = image_prototype(estimator, feats[p], feats.image_size(p))
            protos.append(proto)
            image = feats.extra(p, "image") if with_images else None
            kept.append((p, logit, feats.original_size(p), image))
    parts = dist.all_gather_objects(torch.stack(protos) if protos else None)
    everyone = [x for x in parts if x is not None]
    if not everyone:
        raise UnsegError(f"{where}: no image could be predicted")
    ids = _assign(where, torch.cat(everyone), num_clusters=num_classes - 1, clusters=clusters,
                  seed=seed, train=train)
    offset = sum(x.shape[0] for x in parts[: dist.rank()] if x is not None)
    return [
        (p, (salient_pixels(logit, size).long() * (int(c) + 1)).numpy(), image)
        for (p, logit, size, image), c in zip(kept, ids[offset : offset + len(kept)],
                                              strict=True)
    ]


def predict_maskcontrast(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    num_classes: int,
    *,
    clusters: Clusters = "predicted",
    seed: int = 0,
    device: str | None = None,
    weights: str | Path | None = None,
    overlay_dir: str | Path | None = None,
) -> BatchReport:
    """Label PNGs (0 = background, clusters ``1..num_classes − 1``) for the images of
    ``images`` with the MaskContrast run ``run_dir`` (:func:`maskcontrast_labels`)."""
    if not 2 <= num_classes <= 256:
        raise UnsegError(f"--num-classes must be between 2 and 256, got {num_classes}")
    run_dir, root = Path(run_dir), Path(images)
    out = Path(out_dir)
    overlays = None if overlay_dir is None else Path(overlay_dir)
    report = BatchReport()
    with dist.joined(resolve_device(device)) as dev:
        _, estimator, meta = load_fitted(run_dir, "embedding", dev)
        model = open_fitted_backbone(meta, weights, dev, str(run_dir))
        paths = dist.shard(resolve_inputs(root, report, model.stride), dist.rank(),
                           dist.world_size())
        labelled = maskcontrast_labels(
            estimator, model, int(meta["feature_size"]), ImageInputs(paths), num_classes,
            clusters=clusters, seed=seed,
            train=train_prototypes(run_dir) if clusters == "training" else None,
            where=run_dir if clusters == "training" else images, report=report, device=dev,
            with_images=overlays is not None,
        )
        names_root = resolve_image_dir(root)
        for p, labels, image in labelled:
            _write(p, labels, names_root, out, overlays, image, report)
    if dist.is_distributed():
        gathered = dist.all_gather_objects((report.written, report.failed))
        report = BatchReport().merge(*(BatchReport(w, f) for w, f in gathered))
    return report


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
    device: str | None,
) -> BatchReport:
    """``unseg predict`` for MaskContrast runs (``out_dir/masks`` and ``out_dir/overlays``, as
    ``segment``): ``overrides`` must hold ``num_classes``; may hold ``clusters``
    (``predicted``/``training``), ``seed`` and ``weights``."""
    if overrides.get("num_classes") is None:
        raise UnsegError(f"{run_dir}: a maskcontrast run clusters the images it predicts; "
                         "give --num-classes K (background + K − 1 clusters)")
    out = Path(out_dir)
    return predict_maskcontrast(
        run_dir, images, out / MASKS_DIR, int(overrides["num_classes"]),
        clusters=overrides.get("clusters") or "predicted",
        seed=int(overrides.get("seed") or 0), device=device, weights=overrides.get("weights"),
        overlay_dir=out / OVERLAYS_DIR,
    )


def segment_maskcontrast(
    images: str | Path,
    out_dir: str | Path,
    num_classes: int,
    *,
    saliency: str | Path | None = None,
    discover_method: str = "auto",
    options: Mapping[str, Any] | None = None,
    settings: MaskContrastSettings | None = None,
) -> BatchReport:
    """discover → fit → predict on one folder: ``out_dir/discover`` (the masks, unless
    ``saliency`` names a folder of them), ``out_dir/run``, ``out_dir/masks``,
    ``out_dir/overlays``. Returns the prediction's report with the fit's failures added."""
    from unseg.pipelines.saliency import discover, resolve_discover_method

    settings = settings or MaskContrastSettings()
    settings = replace(settings, backbone=resolve_backbone_name(settings.backbone))
    out = Path(out_dir)
    timings = Timings()
    found = BatchReport()
    if saliency is None:
        discover_method, why = resolve_discover_method(discover_method, images)
        logger.info("discover: %s", why)
        head = get_method("saliency-head" if discover_method == "spectral" else discover_method)
        with timings.stage("discover"):
            found = discover(images, out / DISCOVER_DIR, discover_method, settings.backbone,
                             config=build_config(head, {}, {}), device=settings.device,
                             cache_dir=settings.cache_dir, weights=settings.weights,
                             tap=settings.tap)
        saliency = out / DISCOVER_DIR / MASKS_DIR
        if not found.written:
            raise UnsegError(f"{images}: discover wrote no mask")
    fit = fit_maskcontrast(images, saliency, out / RUN_DIR, options=options, settings=settings,
                           timings=timings)
    report = predict_maskcontrast(out / RUN_DIR, images, out / MASKS_DIR, num_classes,
                                  seed=settings.seed, device=settings.device,
                                  weights=settings.weights, overlay_dir=out / OVERLAYS_DIR)
    # an image discover could not use is reported once, with discover's reason
    failed = BatchReport(failed=found.failed).merge(fit.report, BatchReport(failed=report.failed))
    return BatchReport(written=report.written, failed=failed.failed)
