"""The embedding kind (MaskContrast): fit on images with their saliency masks, predict class ids
by clustering the predicted images' prototypes (``unseg segment`` first discovers the masks).

Fit: the images are paired with the masks of the saliency folder by stem
(:func:`unseg.proposals.saliency_masks.load_mask_proposals`: bad or missing masks are skipped and
reported, near-empty ones dropped and counted), their features extracted once (cached in
``RUN/cache`` or ``--cache-dir``) at the working resolution (short side ``size``, long side at
most ``max_side``: None is 4 x ``size``, 0 no limit; files over ``max_pixels`` refused, their
masks read under the same limit), each mask resampled to its resized image, and the query
views cut from the features of a photometric copy of each resized image
(:func:`~unseg.methods.maskcontrast.photometric_view`, seeded by the run's seed and the
image's hash, computed once per image and cached beside the features). The head
is trained with a checkpoint in the run folder after every epoch; the same command after a
kill resumes from it. With ``train_last_stage`` the features are the backbone's maps before its
last stage, and the run's ``tap`` is that earlier tap (``trained_tap`` the one asked for), so
prediction and chaining extract the same maps and the saved stage turns them into the tap's.
The run also keeps the training images' prototypes
(``train_prototypes.safetensors``) for clusters fitted on the training set, and records its
``max_side``, at which prediction extracts the features (a run without it, from before it was
recorded, predicts without a limit, as it was fitted).

Predict: one prototype per image (the paper's protocol: raw embeddings weighted by the saliency
logit where it exceeds 0.5), clustered into ``K − 1`` clusters on the predicted set (as the
paper) or on the training set (``clusters="training"``); an image's salient pixels take its
cluster + 1, the rest 0 (background); written as the semantic methods' class ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from unseg.backbones import backbone_weights_sha256
from unseg.backbones.base import Backbone
from unseg.data.datasets import no_usable_images
from unseg.data.image import max_pixels_default
from unseg.data.memory import ImageInputs
from unseg.data.resize import resolve_max_side
from unseg.errors import UnsegError
from unseg.feature_store import FeatureSet, remove_stale_temps
from unseg.features import extract_features
from unseg.layout import CACHE_DIR, FEATURES_DIR, TRAIN_PROTOTYPES
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import (
    MaskContrast,
    MaskContrastConfig,
    PrototypeClusters,
    cluster_prototypes,
    photometric_view,
    weighted_prototype,
)
from unseg.pipelines.backbone import (
    check_resolution,
    open_backbone,
    open_fitted_backbone,
    resolve_backbone_name,
)
from unseg.pipelines.fitting import build_config, check_fit_inputs
from unseg.pipelines.kind import FitResult, Kind, Prediction, Session, Settings
from unseg.proposals.saliency_masks import MaskProposals, ProposalReport, load_mask_proposals
from unseg.registry import get_method
from unseg.runs import load_fitted, require_meta, save_fitted
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_threads, resolve_device, seed_everything
from unseg.utils.hashing import settings_key
from unseg.utils.io import atomic_write
from unseg.utils.progress import progress
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

METHOD = "maskcontrast"
Clusters = Literal["predicted", "training"]
CHUNK = 32  # images per feature extraction round at prediction
DEFAULT_CLASSES = 5  # background + 4 clusters, as `unseg segment`'s default


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
        if dist.rank() == 0:
            remove_stale_temps(cache)  # those of a run killed mid-write
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
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> TrainedMaskContrast:
    """Train MaskContrast on ``inputs`` with the saliency proposals ``masks(paths)`` gives
    (see the module docstring); ``cache`` None: nothing cached on disk; ``checkpoint_dir``: a
    checkpoint after every epoch, resumed by the same call after a kill. ``max_side``: the
    working resolution's long-side limit (None: none); ``max_pixels``: the per-file pixel
    limit of the images and of their masks (None: Pillow's, 0: none).

    A capped working resolution keeps the views aligned: each mask is resampled to its resized
    image (:func:`_at_size`), whose sides are multiples of the stride, the photometric copy is
    that resized image, and a view crops features and mask over the same box."""
    trained_tap, stage = model.tap, None
    if config.train_last_stage:
        stage = model.last_stage()
        config = replace(config, stage_of=f"{model.spec.name}:{model.tap}")
        model.tap = stage.input_tap
    with max_pixels_default(max_pixels):  # a mask has its image's pixels
        proposals, mask_report = masks(inputs.paths)
    report.merge(mask_report)
    mask_of = dict(zip(proposals.paths, proposals.masks, strict=True))
    feats = extract_features(
        proposals.paths, model, size=size,
        cache_dir=None if cache is None else cache / FEATURES_DIR, max_side=max_side,
        max_pixels=max_pixels, report=report, extras=("image",), timings=timings,
        arrays=inputs.arrays,
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
    timings: Timings, max_side: int | None = None, max_pixels: int | None = None,
) -> None:
    """The run folder of a MaskContrast fit (``unseg predict`` and ``--embeddings`` read it);
    ``max_side``: the working resolution's long-side limit it was fitted at (None: none,
    recorded as 0), which prediction uses."""
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
        "max_side": max_side or 0,
        "max_pixels": max_pixels,
        "feature_dim": trained.feature_dim,
        "stride": model.stride,
        "n_images": len(trained.paths),
        "fit": trained.facts,
        "timings": timings.as_dict(),
    })


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
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> list[tuple[Path, np.ndarray, torch.Tensor | None]]:
    """``(path, class ids [H, W] int64, resized image or None)`` of each image of ``inputs``
    (module docstring: 0 = background, clusters ``1..num_classes − 1``); ``seed``: k-means;
    ``train``: the training prototypes (``clusters="training"``); ``max_side``: the working
    resolution's long-side limit (None: none); ``max_pixels``: the per-file pixel limit (None:
    Pillow's, 0: none). Under torchrun each rank passes its share: it computes those
    prototypes, every rank clusters all of them (same seed, same ids) and labels its share."""
    if not 2 <= num_classes <= 256:
        raise UnsegError(f"--num-classes must be between 2 and 256, got {num_classes}")
    paths = inputs.paths
    kept: list[tuple[Path, torch.Tensor, tuple[int, int], torch.Tensor | None]] = []
    protos: list[torch.Tensor] = []
    for start in range(0, len(paths), CHUNK):
        feats = extract_features(
            paths[start : start + CHUNK], model, size=size, report=report,
            extras=("image",) if with_images else (), shard=False, arrays=inputs.arrays,
            max_side=max_side, max_pixels=max_pixels,
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


@dataclass
class FittedMaskContrast:
    """A MaskContrast head, its backbone (at the tap it was trained on), the feature short side,
    the training images' prototypes ``[N, D]`` (None: a run without them), the fit in memory
    (None: loaded from a run), and the working resolution's long-side limit (None: none)."""

    estimator: MaskContrast
    backbone: Backbone
    size: int
    train: torch.Tensor | None
    trained: TrainedMaskContrast | None = None
    max_side: int | None = None


class MaskContrastKind(Kind):
    """MaskContrast: pixel embeddings and a saliency logit, class ids by clustering."""

    output = "embedding"
    labels = True
    run_options = ("num_classes", "clusters", "seed", "weights", "max_pixels")

    def __init__(self, config: Any, settings: Settings, num_classes: int | None,
                 run: Mapping[str, Any] | None = None) -> None:
        self.method, self._config, self.settings = METHOD, config, settings
        self.num_classes = num_classes
        self._run = dict(run or {})
        self._masks: Callable[[list[Path]], tuple[MaskProposals, ProposalReport]] | None = None

    @classmethod
    def create(cls, method: str, num_classes: int | None, options: Mapping[str, Any] | None,
               settings: Settings) -> MaskContrastKind:
        """``num_classes``: background + K − 1 clusters (default 5); ``settings.saliency``:
        the masks' folder, else ``settings.discover`` finds them (with ``settings.max_side``
        and ``max_pixels`` as given: ``max_side`` None is 4 x each step's own size)."""
        k = DEFAULT_CLASSES if num_classes is None else int(num_classes)
        _check_classes(k)
        _check_clusters(settings.clusters)
        settings = replace(settings, backbone=resolve_backbone_name(settings.backbone),
                           size=settings.feature_size)
        check_resolution(settings.size, settings.max_side, settings.backbone, settings.tap)
        return cls(maskcontrast_config(options, settings.seed), settings, k)

    @classmethod
    def from_run(cls, run_dir: Path, meta: dict[str, Any],
                 overrides: Mapping[str, Any], device: str | None) -> MaskContrastKind:
        """``overrides`` must hold ``num_classes``; may hold ``clusters`` (``predicted`` /
        ``training``), ``seed`` (the k-means'; default: the run's, as its fit clustered with
        it), ``weights`` and ``max_pixels``; images are predicted at the run's working
        resolution (``max_side``; none for runs that predate it)."""
        if overrides.get("num_classes") is None:
            raise UnsegError(f"{run_dir}: a maskcontrast run clusters the images it "
                             "predicts; give --num-classes K (background + K − 1 clusters)")
        k = int(overrides["num_classes"])
        _check_classes(k)
        clusters = overrides.get("clusters") or "predicted"
        _check_clusters(clusters)
        run_seed = meta.get("config", {}).get("seed", 0)
        settings = Settings(backbone=meta.get("backbone"), device=device,
                            weights=overrides.get("weights"),
                            seed=int(run_seed if (seed := overrides.get("seed")) is None
                                     else seed), clusters=clusters,
                            max_pixels=overrides.get("max_pixels"))
        return cls(None, settings, k, {**meta, "run_dir": run_dir})

    def use_masks(
        self, masks: Callable[[list[Path]], tuple[MaskProposals, ProposalReport]] | str | Path,
        names_root: Path | None = None,
    ) -> None:
        """Train on the proposals ``masks(paths)`` gives, or on a folder of mask PNGs named as
        the images under ``names_root``."""
        if isinstance(masks, (str, Path)):
            folder = masks
            self.settings = replace(self.settings, saliency=str(folder))
            self._masks = lambda paths: load_mask_proposals(paths, folder, names_root=names_root)
        else:
            self._masks = masks

    @property
    def needs_masks(self) -> bool:
        """True until masks are given (:meth:`use_masks`) or named (``settings.saliency``)."""
        return self._masks is None and not self.settings.saliency

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The device, joining the torchrun group when launched by it."""
        with dist.joined(resolve_device(self.settings.device)) as dev:
            yield Session(dev)

    def fit(self, inputs: ImageInputs, root: str | Path, where: Path | None,
            session: Session) -> FittedMaskContrast:
        """Train on ``inputs`` and their masks; ``where``: the run folder (its ``cache/`` and
        a checkpoint after every epoch, resumed after a kill)."""
        s = self.settings
        if self._masks is None:
            if not s.saliency:
                raise UnsegError("maskcontrast needs saliency masks: a folder of them "
                                 "(saliency) or masks given to use_masks")
            self.use_masks(s.saliency, inputs.names_root)
        assert self._masks is not None
        seed_everything(s.seed)
        model = open_backbone(s.backbone, s.weights, s.tap, session.device)
        cache = (Path(s.cache_dir) if s.cache_dir
                 else None if where is None else where / CACHE_DIR)
        max_side = resolve_max_side(s.size, s.max_side)
        trained = train_maskcontrast(root, inputs, self._masks, self._config, model, s.size,
                                     cache, session.device, session.report, session.timings,
                                     checkpoint_dir=where, max_side=max_side,
                                     max_pixels=s.max_pixels)
        if s.saliency:
            trained.facts["saliency"] = str(Path(s.saliency).resolve())
        return FittedMaskContrast(trained.estimator, trained.backbone, s.size,
                                  trained.prototypes, trained, max_side)

    def result(self, fitted: FittedMaskContrast, run_dir: Path,
               report: BatchReport) -> FitResult:
        trained = fitted.trained
        assert trained is not None
        return FitResult(run_dir, report, len(trained.paths), trained.facts,
                         f"{trained.masks.summary()}; ")

    def save(self, fitted: FittedMaskContrast, run_dir: Path, session: Session) -> None:
        if fitted.trained is None:
            raise UnsegError("this MaskContrast model was loaded from a run: nothing to save")
        if dist.is_main():
            save_maskcontrast_run(run_dir, fitted.trained, fitted.size, self.settings.weights,
                                  session.timings, fitted.max_side, self.settings.max_pixels)

    def load(self, run_dir: Path, session: Session) -> FittedMaskContrast:
        _, estimator, meta = load_fitted(run_dir, "embedding", session.device)
        require_meta(meta, run_dir, {"backbone": str, "weights_sha256": (str, type(None)),
                                     "feature_size": int})
        model = open_fitted_backbone(meta, self.settings.weights, session.device, str(run_dir))
        self._config = estimator.config
        return FittedMaskContrast(estimator, model, int(meta["feature_size"]),
                                  train_prototypes(run_dir),
                                  max_side=int(meta.get("max_side") or 0) or None)

    def predict(self, fitted: FittedMaskContrast, inputs: ImageInputs, session: Session,
                root: str | Path, overlays: bool = False,
                reuse: bool = False) -> Iterator[Prediction]:
        """:func:`maskcontrast_labels` of ``inputs`` (this rank's share: every rank clusters
        all the prototypes)."""
        clusters = self.settings.clusters
        where = self._run.get("run_dir", root) if clusters == "training" else root
        assert self.num_classes is not None
        labelled = maskcontrast_labels(
            fitted.estimator, fitted.backbone, fitted.size, inputs, self.num_classes,
            clusters=clusters, seed=self.settings.seed,  # type: ignore[arg-type]
            train=fitted.train if clusters == "training" else None, where=where,
            report=session.report, device=session.device, with_images=overlays,
            max_side=fitted.max_side, max_pixels=self.settings.max_pixels,
        )
        for p, labels, image in labelled:
            yield Prediction(p, labels.astype(np.uint8), image)


    def predict_proba(self, fitted: FittedMaskContrast, inputs: ImageInputs,
                      session: Session) -> Iterator[tuple[Path, np.ndarray]]:
        raise UnsegError(f"{self.method} assigns clusters to whole images' salient regions: it "
                         "has no class probabilities (use predict)")


def _check_classes(k: int) -> None:
    if not 2 <= k <= 256:
        raise UnsegError(f"--num-classes must be between 2 and 256, got {k}")


def _check_clusters(clusters: str) -> None:
    if clusters not in ("predicted", "training"):
        raise UnsegError(f"clusters must be 'predicted' or 'training', got {clusters!r}")
