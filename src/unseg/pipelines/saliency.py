"""Object discovery pipelines: spectral (training-free) or a trained saliency method (the head).

Outputs of every prediction: ``OUT/masks/<name>.png``, the 8-bit foreground probability at the
input image's own size, and ``OUT/boxes.json`` mapping each name to ``[x0, y0, x1, y1]``, the
box of the largest 4-connected component of the mask (8-bit value >= 128, i.e. ``p > 0.5``),
or ``null`` when the mask is empty. ``<name>`` is the image's path under the images folder
without its extension (its stem in a flat folder), as the masks of ``unseg segment``; inputs
are listed and refused by the rules of :mod:`unseg.data.inputs`.

Per image: resized so the short side is 320 (sides multiples of the stride, as for the
features), attention keys from the frozen backbone, then

- ``spectral``: TokenCut bipartition on the patch grid, expanded to the image (nearest);
- a registered saliency method (``head``): its ``predict_proba`` at the resized size,
  upsampled bilinearly;

and, if enabled, the guided filter at the image's full resolution guided by the image itself.

Training (``unseg.registry`` says what the method needs): keys and uint8 centre crops from one
extraction pass; run folder (``unseg.runs``): the method's config and state, the backbone name,
tap and weights sha256, the stride, and seconds per stage (``timings``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import backbone_weights_sha256
from unseg.backbones.base import Backbone
from unseg.data.datasets import no_usable_images, resolve_inputs
from unseg.data.image import load_image
from unseg.data.inputs import output_name
from unseg.data.layouts import resolve_image_dir
from unseg.data.memory import ImageInputs
from unseg.data.resize import prepare_image, resolve_max_side, target_size
from unseg.errors import InputFileError, UnsegError
from unseg.features import extract_features
from unseg.layout import BOXES_FILE, MASKS_DIR, RUN_DIR
from unseg.methods.base import FitInputs
from unseg.methods.collapse import MIN_PREDICTED, CollapseCheck
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig
from unseg.metrics.corloc import largest_component_box
from unseg.pipelines.backbone import open_backbone, open_fitted_backbone
from unseg.pipelines.fitting import FitResult, fit_estimator
from unseg.proposals.spectral import SpectralConfig, ncut_bipartition
from unseg.refine.guided_filter import GuidedFilterConfig, refine_masks
from unseg.registry import MethodSpec, get_method
from unseg.runs import load_fitted, save_fitted
from unseg.utils.batch import BatchReport
from unseg.utils.device import resolve_device, seed_everything
from unseg.utils.io import save_png_atomic, write_json_atomic
from unseg.utils.progress import progress
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

METHOD = "saliency-head"
AUTO = "auto"  # discover's default: the best measured method the folder allows
AUTO_TRAINED = "found"  # measured best on ECSSD and stable over seeds (docs/results-boosting.md)
MIN_TRAIN_IMAGES = 150  # the FOUND-style head's in-domain check trained on 150 images
MAX_PATCHES = 4096  # longest feature grid one image may need (aspect ratio ~ 10:1 at 320/16)

ProbFn = Callable[[np.ndarray], torch.Tensor]


def _check_grid(
    path: Path, image: np.ndarray, size: int, stride: int, max_side: int | None = None
) -> None:
    h, w = target_size(image.shape[0], image.shape[1], size, stride, max_side=max_side)
    if (h // stride) * (w // stride) > MAX_PATCHES:
        raise InputFileError(
            path,
            f"aspect ratio {image.shape[1]}x{image.shape[0]} too extreme: its short side at "
            f"{size} px needs {(h // stride) * (w // stride)} patches (at most {MAX_PATCHES}; "
            "a --max-side limit shrinks it)",
        )


@torch.inference_mode()
def _keys(
    backbone: Backbone, image: np.ndarray, size: int, max_side: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized image ``[1, 3, H', W']`` (short side ``size``, long side at most ``max_side``) and
    its keys ``[1, C, H'/s, W'/s]`` on the model device."""
    dev = next(backbone.parameters()).device
    x = prepare_image(image, size, backbone.stride, max_side=max_side).to(dev)[None]
    return x, backbone.forward_features(x, "keys").float()


def spectral_prob_fn(
    backbone: Backbone, size: int, config: SpectralConfig, max_side: int | None = None
) -> ProbFn:
    """uint8 image ``[H, W, 3]`` → TokenCut mask ``[H, W]`` in {0, 1} (float, nearest)."""

    def prob(image: np.ndarray) -> torch.Tensor:
        _, keys = _keys(backbone, image, size, max_side)
        mask = ncut_bipartition(keys[0].cpu(), config).mask
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        return F.interpolate(m, size=image.shape[:2], mode="nearest")[0, 0]

    return prob


def head_prob_fn(
    backbone: Backbone, head: SaliencyHead, size: int, max_side: int | None = None
) -> ProbFn:
    """uint8 image ``[H, W, 3]`` → head probability ``[H, W]`` (bilinear from the resized size)."""

    def prob(image: np.ndarray) -> torch.Tensor:
        x, keys = _keys(backbone, image, size, max_side)
        p = head.predict_proba(keys, x).float().cpu()
        return F.interpolate(p, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]

    return prob


BAND_PIXELS = 4_000_000  # above this, the guided filter runs in row bands (bounded memory)


@torch.inference_mode()
def _refine_whole(prob: torch.Tensor, image: np.ndarray, gf: GuidedFilterConfig) -> torch.Tensor:
    img = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255.0)
    return refine_masks(prob[None, None], img[None], gf)[0, 0]


def _refine(prob: torch.Tensor, image: np.ndarray, gf: GuidedFilterConfig) -> torch.Tensor:
    """The guided filter of ``prob [H, W]`` on ``image [H, W, 3]`` at the input's size, in row
    bands of about :data:`BAND_PIXELS` each with a ``2r + 1`` halo: a pixel's result depends on
    the rows within ``2r`` of it (a box of box means), so the bands give the whole image's result
    (up to float rounding; the standardisation and the guide's centring are per band, which the
    filter is invariant to), while the filter's dozen float maps never exceed one band."""
    height, width = image.shape[:2]
    rows = max(1, BAND_PIXELS // width)
    if height <= rows:
        return _refine_whole(prob, image, gf)
    halo = 2 * gf.radius + 1
    out = torch.empty_like(prob)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        out[top:bottom] = _refine_whole(prob[lo:hi], image[lo:hi], gf)[top - lo : bottom - lo]
    return out


def saliency_maps(
    paths: Sequence[Path],
    prob_fn: ProbFn,
    guided: GuidedFilterConfig | None,
    size: int,
    stride: int,
    report: BatchReport,
    timings: Timings | None = None,
    max_pixels: int | None = None,
    max_side: int | None = None,
    arrays: Mapping[Path, np.ndarray] | None = None,
) -> Iterator[tuple[Path, np.ndarray, list[float] | None]]:
    """``(path, 8-bit foreground probability [H, W], box)`` of each of ``paths`` (see the
    module docstring); an image that cannot be read or predicted goes to ``report``.
    ``arrays``: in-memory images (uint8 ``[H, W, 3]``) standing for their keys in ``paths``.
    Maps that look degenerate over the whole set (:mod:`unseg.methods.collapse`) are reported
    with a warning at the end."""
    timings = timings if timings is not None else Timings()
    arrays = arrays or {}
    check = CollapseCheck()
    done = 0
    for path in progress(paths, total=len(paths), desc="discover", unit="img"):
        try:
            with timings.stage("decode"):
                image = arrays[path] if path in arrays else load_image(path, max_pixels)
            _check_grid(path, image, size, stride, max_side)
            with timings.stage("predicting"):
                prob = prob_fn(image)
        except InputFileError as exc:
            report.fail(path, exc.problem)
            continue
        if guided is not None:
            with timings.stage("refinement"):
                prob = _refine(prob, image, guided)
        check.update(prob[None])
        mask8 = (prob.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        box = largest_component_box(mask8 >= 128)
        done += 1
        yield path, mask8, None if box is None else [float(v) for v in box]
    if done >= MIN_PREDICTED:
        verdict = check.report()
        if verdict.flagged:
            logger.warning("%s", verdict.message("prediction"))


def predict_masks(
    paths: Sequence[Path],
    out_dir: str | Path,
    prob_fn: ProbFn,
    guided: GuidedFilterConfig | None,
    size: int,
    stride: int,
    timings: Timings | None = None,
    names_root: Path | None = None,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> BatchReport:
    """Write ``masks/<name>.png`` and ``boxes.json`` for ``paths`` (:func:`saliency_maps`).

    ``guided`` None: no guided filter. Bad files (and files over ``max_pixels``, see
    :func:`unseg.data.image.pixel_limit`) are reported and skipped. ``max_side``: the long-side
    limit ``prob_fn`` works at (None: none), for the patch-count check. ``names_root``: the
    folder the mask names mirror (default: the paths' common folder). ``timings`` receives the
    seconds spent decoding, predicting, refining and writing.
    """
    timings = timings if timings is not None else Timings()
    out_dir = Path(out_dir)
    root = names_root if names_root is not None else Path(os.path.commonpath(paths or ["."]))
    report = BatchReport()
    boxes: dict[str, list[float] | None] = {}
    maps = saliency_maps(paths, prob_fn, guided, size, stride, report, timings, max_pixels,
                         max_side)
    for i, (path, mask8, box) in enumerate(maps):
        name = output_name(path, root)
        with timings.stage("writing"):
            target = out_dir / MASKS_DIR / name
            save_png_atomic(target, mask8)
            boxes[name.with_suffix("").as_posix()] = box
            report.written.append(target)
            if (i + 1) % 50 == 0:
                write_json_atomic(out_dir / BOXES_FILE, boxes)
    write_json_atomic(out_dir / BOXES_FILE, boxes)
    return report


def _training_inputs(
    root: str | Path,
    inputs: ImageInputs,
    backbone: Backbone,
    spec: MethodSpec,
    size: int,
    batch_size: int,
    cache_dir: Path | None,
    report: BatchReport,
    timings: Timings,
) -> tuple[FitInputs, list[Path]]:
    """Keys ``[C, h, w]`` (float16) and uint8 centre crops ``[3, S, S]`` of ``inputs``, computed
    in one pass (each image decoded once)."""
    feats = extract_features(
        inputs.paths, backbone, size=size, kind=spec.feature_kind, batch_size=batch_size,
        crop=True, cache_dir=cache_dir, report=report, extras=("image",), timings=timings,
        arrays=inputs.arrays,
    )
    used = feats.paths
    if not used:
        raise no_usable_images(root, report)
    keys = [feats[p].to(torch.float16) for p in used]
    return FitInputs(keys, images=[feats.extra(p, "image") for p in used]), used


def saliency_config(spec: MethodSpec, config: Any, backbone: Backbone) -> Any:
    """``config`` with what the backbone decides: ``standardize=None`` → on for a CNN (measured
    on a CNN's features, methods/found.py), off for a ViT (the reference's raw input)."""
    if getattr(config, "standardize", False) is None:
        return replace(config, standardize=not backbone.spec.layer_normed)
    return config


def train_saliency(
    root: str | Path,
    inputs: ImageInputs,
    spec: MethodSpec,
    config: Any,
    model: Backbone,
    device: torch.device,
    cache_dir: Path | None,
    report: BatchReport,
    timings: Timings,
) -> tuple[Any, list[Path], dict[str, Any]]:
    """The saliency method ``spec`` trained on ``inputs``: the estimator, the images used, and
    the training facts (with the collapse verdict). The caller seeds (``config.seed``) before
    it opens the backbone, as the run was always seeded."""
    fit_inputs, used = _training_inputs(
        root, inputs, model, spec, config.image_size, config.batch_size, cache_dir, report,
        timings,
    )
    logger.info("training %s on %d images (%s)", spec.name, len(used), model.spec.name)
    head = fit_estimator(spec, config, fit_inputs, model, device, timings)
    facts: dict[str, Any] = {"n_images": len(used), "loss_history": list(head.history_)}
    if getattr(head, "restarts_", None):  # the restarts' label-free scores, the kept one marked
        facts["restarts"] = [r.as_dict() for r in head.restarts_]
    collapse = getattr(head, "collapse_", None)
    if collapse is not None:  # the failure check of the head's training, saved with the run
        facts["collapse"] = collapse.as_dict()
    return head, used, facts


def save_saliency_run(
    run_dir: Path, spec: MethodSpec, head: Any, model: Backbone, weights: str | Path | None,
    facts: dict[str, Any], timings: Timings,
) -> None:
    """The run folder of a trained saliency method (``unseg predict`` reads it)."""
    save_fitted(
        run_dir,
        spec,
        head,
        extra={
            "backbone": model.spec.name,
            "tap": getattr(model, "tap", None),
            "weights_sha256": backbone_weights_sha256(model),
            "weights_path": str(Path(weights).resolve()) if weights else None,
            "stride": int(model.stride),
            "training": facts,
            "timings": timings.as_dict(),
        },
    )


def fit_saliency(
    images: str | Path,
    run_dir: str | Path,
    config: SaliencyHeadConfig | None = None,
    backbone: str | None = None,
    weights: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    method: str = METHOD,
    tap: str | None = None,
    timings: Timings | None = None,
) -> FitResult:
    """Train the saliency ``method`` (a registered saliency method; default the head) on the
    images of ``images`` (dataset root, folder or file) and save it in ``run_dir``."""
    spec = get_method(method)
    if spec.output != "saliency":
        raise UnsegError(f"{spec.name} is a {spec.output} method, not a saliency one")
    timings = timings if timings is not None else Timings()
    dev = resolve_device(device)
    cfg = config or spec.config()
    seed_everything(cfg.seed)
    model = open_backbone(backbone, weights, tap, dev)
    cfg = saliency_config(spec, cfg, model)
    report = BatchReport()
    inputs = ImageInputs(resolve_inputs(images, report, model.stride))
    head, used, facts = train_saliency(
        images, inputs, spec, cfg, model, dev,
        Path(cache_dir) if cache_dir is not None else None, report, timings,
    )
    save_saliency_run(Path(run_dir), spec, head, model, weights, facts, timings)
    return FitResult(Path(run_dir), report, len(used), facts)


def load_head(
    run_dir: Path, device: torch.device, weights: str | Path | None = None
) -> tuple[SaliencyHead, Backbone, dict]:
    """The estimator of a saliency run, its backbone (hash-checked) and the run's meta."""
    _, head, meta = load_fitted(run_dir, "saliency", device)
    missing = [k for k in ("backbone", "weights_sha256", "stride") if k not in meta]
    if missing:
        raise UnsegError(f"{run_dir}: incomplete saliency run (missing {', '.join(missing)})")
    model = open_fitted_backbone(meta, weights, device, str(run_dir))
    if model.stride != meta["stride"]:
        raise UnsegError(f"{run_dir}: stride {meta['stride']} differs from the backbone's")
    return head, model, meta


def _guided_settings(cfg: Any, overrides: Mapping[str, Any]) -> GuidedFilterConfig | None:
    use = overrides.get("guided_filter")
    if not (getattr(cfg, "guided_filter", False) if use is None else use):
        return None
    gf = replace(getattr(cfg, "guided", GuidedFilterConfig()))
    if overrides.get("guide"):
        gf.guide = overrides["guide"]
    return gf


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any],
    device: str | None,
    timings: Timings | None = None,
) -> BatchReport:
    """``unseg predict`` for saliency runs; ``overrides``: ``guided_filter``, ``guide``,
    ``weights``, ``max_pixels``, ``max_side`` (the working resolution's long side: None → 4 x
    the run's size, 0 → no limit; see :func:`unseg.data.resize.resolve_max_side`)."""
    dev = resolve_device(device)
    head, model, _ = load_head(Path(run_dir), dev, overrides.get("weights"))
    cfg = head.config
    report = BatchReport()
    paths = resolve_inputs(images, report, model.stride)
    max_side = resolve_max_side(cfg.image_size, overrides.get("max_side"))
    predicted = predict_masks(
        paths,
        out_dir,
        head_prob_fn(model, head, cfg.image_size, max_side),
        _guided_settings(cfg, overrides),
        cfg.image_size,
        model.stride,
        timings,
        resolve_image_dir(images),
        overrides.get("max_pixels"),
        max_side,
    )
    return report.merge(predicted)


def resolve_discover_method(
    method: str, images: str | Path, train_images: str | Path | None = None
) -> tuple[str, str]:
    """The method ``discover`` runs for ``method`` and one line saying why.

    ``"auto"`` (the default): the FOUND-style head (:data:`AUTO_TRAINED`), trained without labels
    on ``train_images`` when given, else on ``images`` themselves when they hold at least
    :data:`MIN_TRAIN_IMAGES` images; below that, the training-free spectral cut (a head trained
    on a handful of images has not been measured). Any other name is returned as it is.
    """
    if method != AUTO:
        return method, f"method {method} (as asked)"
    if train_images is not None:
        return AUTO_TRAINED, (
            f"method {AUTO_TRAINED}: the FOUND-style head, trained on {train_images} (the best "
            "measured method; --method spectral for the training-free cut)"
        )
    n = len(resolve_inputs(images, BatchReport()))
    if n >= MIN_TRAIN_IMAGES:
        return AUTO_TRAINED, (
            f"method {AUTO_TRAINED}: the FOUND-style head, trained on these {n} images without "
            "labels (the best measured method; --method spectral for the training-free cut)"
        )
    return "spectral", (
        f"method spectral: only {n} images, too few to train a head on (at least "
        f"{MIN_TRAIN_IMAGES}, or --train-images / `unseg predict` with a trained run)"
    )


def discover(
    images: str | Path,
    out_dir: str | Path,
    method: str = "spectral",
    backbone: str | None = None,
    train_images: str | Path | None = None,
    config: SaliencyHeadConfig | None = None,
    spectral: SpectralConfig | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    weights: str | Path | None = None,
    tap: str | None = None,
    timings: Timings | None = None,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> BatchReport:
    """``unseg discover``: masks and boxes for every image of ``images``.

    ``method``: ``spectral`` (training-free TokenCut) or a registered saliency method (e.g.
    ``head``), first trained on ``train_images`` (default: ``images`` themselves, no labels
    used) into ``out_dir/run``, reusable with ``unseg predict``. The guided filter and its guide
    come from ``config`` for both. ``weights``: explicit backbone weights. ``timings`` receives
    the seconds per stage. ``max_pixels``: the per-file pixel limit of the images predicted;
    ``max_side``: their working resolution's long side (None: 4 x size, 0: no limit). Training
    uses square centre crops, which no long-side limit changes.
    """
    timings = timings if timings is not None else Timings()
    cfg = config or SaliencyHeadConfig()
    out_dir = Path(out_dir)
    gf = replace(cfg.guided) if cfg.guided_filter else None
    if method == "spectral":
        dev = resolve_device(device)
        model = open_backbone(backbone, weights, tap, dev)
        report = BatchReport()
        paths = resolve_inputs(images, report, model.stride)
        limit = resolve_max_side(cfg.image_size, max_side)
        fn = spectral_prob_fn(model, cfg.image_size, spectral or SpectralConfig(), limit)
        return report.merge(predict_masks(paths, out_dir, fn, gf, cfg.image_size, model.stride,
                                          timings, resolve_image_dir(images), max_pixels, limit))
    spec = get_method(method)
    fit = fit_saliency(
        train_images if train_images is not None else images,
        out_dir / RUN_DIR,
        cfg,
        backbone,
        weights,
        device=device,
        cache_dir=cache_dir,
        method=spec.name,
        tap=tap,
        timings=timings,
    )
    predicted = predict_run(fit.run_dir, images, out_dir,
                            {"max_pixels": max_pixels, "max_side": max_side}, device, timings)
    return BatchReport(written=predicted.written).merge(
        BatchReport(failed=fit.report.failed), BatchReport(failed=predicted.failed)
    )
