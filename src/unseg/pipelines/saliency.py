"""The saliency kind (object discovery): spectral (training-free) or a trained saliency method.

Every prediction: the 8-bit foreground probability at the input image's own size, and the box
``[x0, y0, x1, y1]`` of the largest 4-connected component of the mask (8-bit value >= 128,
i.e. ``p > 0.5``), or None when the mask is empty (the folder pipeline writes them as
``OUT/masks/<name>.png`` and ``OUT/boxes.json``).

Per image: resized so the short side is 320 (sides multiples of the stride, as for the
features), attention keys from the frozen backbone, then

- ``spectral``: TokenCut bipartition on the patch grid, expanded to the image (nearest);
- a registered saliency method (``head``): its ``predict_proba`` at the resized size,
  upsampled bilinearly;

and, if enabled, the guided filter at the image's full resolution guided by the image itself,
or instead (``dense_crf``) a 2-label dense CRF on the image (:mod:`unseg.refine.saliency_crf`;
above :data:`CRF_MAX_PIXELS` it runs on a shrunk copy and its map is upsampled).

Training (``unseg.registry`` says what the method needs): keys and uint8 centre crops from one
extraction pass; run folder (``unseg.runs``): the method's config and state, the backbone name,
tap and weights sha256, the stride, and seconds per stage (``timings``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from unseg.backbones import backbone_weights_sha256, get_spec
from unseg.backbones.base import Backbone
from unseg.data.datasets import ImageListing, no_usable_images
from unseg.data.image import load_image
from unseg.data.memory import ImageInputs
from unseg.data.resize import prepare_image, resolve_max_side, target_size
from unseg.errors import InputFileError, UnsegError, a_or_an
from unseg.features import extract_features
from unseg.layout import CONFIG_FILE, FEATURES_DIR
from unseg.methods.base import FitInputs
from unseg.methods.collapse import MIN_PREDICTED, CollapseCheck, oversized_expected
from unseg.methods.found import CNN_THRESHOLD, VIT_THRESHOLD
from unseg.methods.saliency import SaliencyHead
from unseg.metrics.corloc import largest_component_box
from unseg.pipelines.backbone import (
    check_resolution,
    choose_backbone,
    open_backbone,
    open_fitted_backbone,
)
from unseg.pipelines.fitting import build_config, fit_estimator
from unseg.pipelines.kind import FitResult, Kind, Prediction, Session, Settings
from unseg.pipelines.saved_head import INPUTS_KEY, inputs_key, saved_head
from unseg.proposals.spectral import SpectralConfig, ncut_bipartition
from unseg.refine.guided_filter import GuidedFilterConfig, refine_masks
from unseg.refine.saliency_crf import SaliencyCRFConfig, crf_foreground
from unseg.registry import MethodSpec, get_method
from unseg.runs import load_fitted, require_meta, save_fitted
from unseg.utils.batch import BatchReport
from unseg.utils.device import resolve_device, seed_everything
from unseg.utils.progress import progress
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

METHOD = "saliency-head"  # the registered method whose config the spectral cut takes
SPECTRAL = "spectral"  # training-free discovery
AUTO = "auto"  # discover's default: the best measured method the folder allows
AUTO_TRAINED = "found"  # measured best on ECSSD and stable over seeds (docs/results-boosting.md)
MIN_TRAIN_IMAGES = 150  # the FOUND-style head's in-domain check trained on 150 images
MAX_PATCHES = 4096  # longest feature grid one image may need (aspect ratio ~ 10:1 at 320/16)
# METHOD's fields spectral uses
SPECTRAL_FIELDS = ("image_size", "guided_filter", "guided", "dense_crf", "crf")
# the tap a discovery method runs on when none is asked and the backbone has it: the finer
# stride-16 graph beat the default stride-32 `head` tap on ECSSD and VOC2007 for these methods
# (efficientnet_lite2; docs/results-boosting.md, "The defaults measured")
METHOD_TAPS = {SPECTRAL: "s16+s32", AUTO_TRAINED: "s16+s32"}

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


# the dense CRF refines every source of maps by default (docs/results-boosting.md, "Dense-CRF
# refinement" and "Five seeds on all of ECSSD"): against the guided filter, the spectral cut
# +7.2 ECSSD IoU (all 1000) and +1.9 VOC07 CorLoc; the trained FOUND-style head, paired over
# 5 seeds, +1.16 ± 1.43 IoU and +3.08 ± 1.47 CorLoc (the mean of the two up on every seed)
DENSE_CRF = True
CRF_MAX_PIXELS = 1_000_000  # above this, the dense CRF runs on a shrunk copy (bounded memory)


@torch.inference_mode()
def _crf_refine(prob: torch.Tensor, image: np.ndarray, config: SaliencyCRFConfig) -> torch.Tensor:
    """The 2-label CRF's foreground map ``[H, W]`` of ``prob [H, W]`` on ``image [H, W, 3]``.
    An image above :data:`CRF_MAX_PIXELS` is shrunk (area) to that many pixels, its kernels'
    spatial widths with it, and the CRF's map is upsampled bilinearly: the lattice's memory
    grows with the pixels (every image of ECSSD and VOC runs at its own size)."""
    height, width = image.shape[:2]
    if height * width <= CRF_MAX_PIXELS:
        return crf_foreground(prob, image, config)
    scale = (CRF_MAX_PIXELS / (height * width)) ** 0.5
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    small = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
    p = F.interpolate(prob[None, None].float(), size=(size[1], size[0]), mode="area")[0, 0]
    shrunk = replace(config, gaussian_sxy=config.gaussian_sxy * scale,
                     bilateral_sxy=config.bilateral_sxy * scale)
    q = crf_foreground(p, small, shrunk)
    return F.interpolate(q[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]


def eight_bit(prob: torch.Tensor) -> torch.Tensor:
    """The foreground probability ``[H, W]`` as the 8-bit map the masks are written as (uint8;
    the mask is ``>= 128``)."""
    return (prob.clamp(0, 1) * 255.0).round().to(torch.uint8)


def unless_erased(refined: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """``refined`` ``[H, W]``, unless the refinement erased the object: no pixel of ``refined``
    at 0.5 or above (the 8-bit mask's 128) where ``prob`` ``[H, W]`` has some; then ``prob``.
    The dense CRF erases small confident objects this way (`discover`'s head, ECSSD seed 0:
    33 of 1000 masks; falling back gained +0.58 IoU on seeds 0 and 1 and never lost CorLoc;
    docs/results-boosting.md)."""
    if bool(eight_bit(refined).ge(128).any()):
        return refined
    return prob if bool(eight_bit(prob).ge(128).any()) else refined


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
    crf: SaliencyCRFConfig | None = None,
) -> Iterator[tuple[Path, np.ndarray, list[float] | None]]:
    """``(path, 8-bit foreground probability [H, W], box)`` of each of ``paths`` (see the
    module docstring); an image that cannot be read or predicted goes to ``report``.
    ``crf``: the 2-label dense CRF on the unfiltered map instead of ``guided``.
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
        if crf is not None:
            with timings.stage("refinement"):
                prob = unless_erased(_crf_refine(prob, image, crf), prob)
        elif guided is not None:
            with timings.stage("refinement"):
                prob = _refine(prob, image, guided)
        check.update(prob[None])
        mask8 = eight_bit(prob).cpu().numpy()
        box = largest_component_box(mask8 >= 128)
        done += 1
        yield path, mask8, None if box is None else [float(v) for v in box]
    if done >= MIN_PREDICTED:
        check.report().log(logger, "prediction")


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
    max_pixels: int | None = None,
) -> tuple[FitInputs, list[Path]]:
    """Keys ``[C, h, w]`` (float16) and uint8 centre crops ``[3, S, S]`` of ``inputs``, computed
    in one pass (each image decoded once); ``max_pixels``: the per-file pixel limit (None:
    Pillow's)."""
    feats = extract_features(
        inputs.paths, backbone, size=size, kind=spec.feature_kind, batch_size=batch_size,
        crop=True, cache_dir=cache_dir, report=report, extras=("image",), timings=timings,
        arrays=inputs.arrays, max_pixels=max_pixels,
    )
    used = feats.paths
    if not used:
        raise no_usable_images(root, report)
    keys = [feats[p].to(torch.float16) for p in used]
    return FitInputs(keys, images=[feats.extra(p, "image") for p in used]), used


def saliency_config(spec: MethodSpec, config: Any, backbone: Backbone) -> Any:
    """``config`` with what the backbone decides (measured on a CNN's features,
    methods/found.py): ``standardize=None`` → on for a CNN, off for a ViT (the reference's raw
    input); ``bkg_threshold=None`` → 0.2 for a CNN, 0.3 (the reference's) for a ViT."""
    vit = backbone.spec.layer_normed
    if getattr(config, "standardize", False) is None:
        config = replace(config, standardize=not vit)
    if hasattr(config, "bkg_threshold") and config.bkg_threshold is None:
        config = replace(config, bkg_threshold=VIT_THRESHOLD if vit else CNN_THRESHOLD)
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
    max_pixels: int | None = None,
) -> tuple[Any, list[Path], dict[str, Any]]:
    """The saliency method ``spec`` trained on ``inputs``: the estimator, the images used, and
    the training facts (with the collapse verdict). The caller seeds (``config.seed``) before
    it opens the backbone, as the run was always seeded. ``max_pixels``: the per-file pixel
    limit, as the prediction's."""
    fit_inputs, used = _training_inputs(
        root, inputs, model, spec, config.image_size, config.batch_size, cache_dir, report,
        timings, max_pixels,
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


def load_head(
    run_dir: Path, device: torch.device, weights: str | Path | None = None
) -> tuple[SaliencyHead, Backbone, dict]:
    """The estimator of a saliency run, its backbone (hash-checked) and the run's meta."""
    _, head, meta = load_fitted(run_dir, "saliency", device)
    require_meta(meta, run_dir, {"backbone": str, "weights_sha256": (str, type(None)),
                                 "stride": int})
    model = open_fitted_backbone(meta, weights, device, str(run_dir))
    if model.stride != meta["stride"]:
        raise UnsegError(f"{run_dir}: stride {meta['stride']} differs from the backbone's")
    if head.in_dim != model.dim:  # the features' width is not recorded: the head's
        raise UnsegError(
            f"{run_dir}: its head takes {head.in_dim}-channel features, but {model.spec.name} "
            f"at tap {getattr(model, 'tap', None)!r} gives {model.dim}; its {CONFIG_FILE} was "
            "edited ('tap'?): restore it or refit"
        )
    return head, model, meta


def _guided_settings(cfg: Any, overrides: Mapping[str, Any]) -> GuidedFilterConfig | None:
    use = overrides.get("guided_filter")
    if not (getattr(cfg, "guided_filter", False) if use is None else use):
        return None
    gf = replace(getattr(cfg, "guided", GuidedFilterConfig()))
    if overrides.get("guide"):
        gf.guide = overrides["guide"]
    return gf


FILTER_UNUSED = ("the dense CRF refines these maps (the default) in place of the guided filter, "
                 "so the guided-filter options given do nothing; --no-dense-crf for the filter")


def filter_asked(guided_filter: bool | None, options_given: bool) -> bool:
    """Whether the user asked for the guided filter: ``guided_filter`` when given, else whether
    any of its options was given (:data:`FILTER_UNUSED` is said when the CRF is on anyway)."""
    return options_given if guided_filter is None else guided_filter


def dense_crf_on(choice: bool | None) -> bool:
    """Whether the maps go through the dense CRF: ``choice`` when given, else the measured
    default (:data:`DENSE_CRF`)."""
    return DENSE_CRF if choice is None else choice


def _crf_settings(cfg: Any, overrides: Mapping[str, Any]) -> SaliencyCRFConfig | None:
    """The dense CRF's settings when ``unseg predict``'s ``dense_crf``, else the run's, else
    the default (:func:`dense_crf_on`) turns it on; else None."""
    use = overrides.get("dense_crf")
    if use is None:
        use = getattr(cfg, "dense_crf", None)
    if not dense_crf_on(use):
        return None
    return replace(getattr(cfg, "crf", SaliencyCRFConfig()))


def resolve_discover_method(
    method: str,
    images: str | Path | ImageListing | None,
    train_images: str | Path | None = None,
    n_images: int | None = None,
) -> tuple[str, str]:
    """The method ``discover`` runs for ``method`` and one line saying why.

    ``"auto"`` (the default): the FOUND-style head (:data:`AUTO_TRAINED`), trained without labels
    on ``train_images`` when given, else on ``images`` themselves when they hold at least
    :data:`MIN_TRAIN_IMAGES` images (``n_images`` when given, e.g. in-memory images, else
    counted in ``images``, which may be a listing the command reuses); below that, the
    training-free spectral cut (a head trained on a handful of images has not been measured).
    Any other name is returned as it is.
    """
    if method != AUTO:
        return method, f"method {method} (as asked)"
    if train_images is not None:
        return AUTO_TRAINED, (
            f"method {AUTO_TRAINED}: the FOUND-style head, trained on {train_images} (the best "
            "measured method; --method spectral for the training-free cut)"
        )
    n = n_images
    if n is None:  # images: given when n_images is not
        n = len(ImageListing.of(images).usable(BatchReport()))  # type: ignore[arg-type]
    if n >= MIN_TRAIN_IMAGES:
        return AUTO_TRAINED, (
            f"method {AUTO_TRAINED}: the FOUND-style head, trained on these {n} images without "
            "labels (the best measured method; --method spectral for the training-free cut)"
        )
    return "spectral", (
        f"method spectral: only {n} images, too few to train a head on (at least "
        f"{MIN_TRAIN_IMAGES}, or --train-images / `unseg predict` with a trained run)"
    )


# the masks MaskContrast trains on: discover's method, with these options where they differ from
# discover's defaults (docs/results-maskcontrast.md). The FOUND-style head keeps the reference's
# threshold 0.3 here (discover uses 0.2 on CNN features): the default chain scored 14.93 ± 2.12
# mIoU at 0.3 against 10.98 ± 1.12 at 0.2 on VOC2012's 217 images (3 seeds), 18.79 against
# 14.80 on VOC2007's 422 (seed 0); Acc moves the other way. And its guided filter, not the dense
# CRF: 13.40 ± 0.58 with the CRF's masks (paired −3.10, +1.56, −3.06). And one head, not
# discover's mean of five: with the run's seed drawing the discovery, five heads gave +1.30 ±
# 0.83 on VOC2012 (17.36 against 16.06) and −2.52 ± 2.90 on VOC2007 (17.56 against 20.08),
# −0.61 over the six pairs, for five times the training.
MASK_SOURCE_OPTIONS: dict[str, dict[str, Any]] = {
    AUTO_TRAINED: {"bkg_threshold": VIT_THRESHOLD, "dense_crf": False, "ensemble": 1},
}

# why the chain's masks may be flagged "oversized" (61-62 % foreground in the measured VOC
# discoveries at 0.3), given in place of the flag's advice to change seed or method
MASK_SOURCE_LARGE = (
    f"MaskContrast's mask source keeps the background threshold {VIT_THRESHOLD} (discover's "
    f"default on CNN features is {CNN_THRESHOLD}), which calls more of each image foreground; "
    "MaskContrast scored about 4 mIoU points better on these masks than on the smaller ones "
    "(docs/results-maskcontrast.md)"
)


def mask_source_context(options: Mapping[str, Any] | None) -> AbstractContextManager[None]:
    """Where the chain's mask-source ``options`` raise the threshold, the context in which its
    discovery runs: an "oversized" flag is expected there (:data:`MASK_SOURCE_LARGE`, logged at
    INFO); otherwise nothing."""
    if options and options.get("bkg_threshold") is not None:
        return oversized_expected(MASK_SOURCE_LARGE)
    return nullcontext()


class MaskSource(NamedTuple):
    """The discovery chained before a method that trains on its masks: the discover
    ``method``, its ``options`` (None: discover's defaults) and ``why`` it was chosen."""

    method: str
    options: dict[str, Any] | None
    why: str


def mask_source(
    discover: str, images: str | Path | ImageListing | None = None, n_images: int | None = None
) -> MaskSource:
    """The discover method, its options (:data:`MASK_SOURCE_OPTIONS`; None: discover's
    defaults) and why, for the masks a method trains on (MaskContrast), from the ``discover``
    setting (``auto``: as :func:`resolve_discover_method` decides for ``images`` or
    ``n_images``, which lists ``images``). The commands and the :class:`~unseg.Segmenter` both
    take it from here."""
    method, why = resolve_discover_method(discover, images, n_images=n_images)
    options = MASK_SOURCE_OPTIONS.get(method)
    return MaskSource(method, None if options is None else dict(options), why)


def method_tap(method: str, settings: Settings) -> Settings:
    """``settings`` with ``method``'s measured tap (:data:`METHOD_TAPS`) when no tap is asked
    and the backbone has that tap; otherwise unchanged (the backbone's default tap).
    ``method``: ``spectral`` or a registered saliency method's name or alias."""
    tap = METHOD_TAPS.get(method if method == SPECTRAL else get_method(method).name)
    if settings.tap is not None or tap is None:
        return settings
    if tap not in get_spec(choose_backbone(settings.backbone)[0]).tap_table:  # opening logs why
        return settings
    return replace(settings, tap=tap)


class FittedSaliency:
    """A saliency head (None: spectral, training-free), its backbone, the training facts, the
    images it was trained on and the run folder it was reused from (:mod:`.saved_head`)."""

    def __init__(self, head: Any, backbone: Backbone, facts: dict[str, Any] | None = None,
                 paths: list[Path] | None = None, saved_in: Path | None = None) -> None:
        self.head, self.backbone = head, backbone
        self.facts, self.paths = dict(facts or {}), list(paths or [])
        self.saved_in = saved_in


def spectral_unused(options: Mapping[str, Any] | None) -> list[str]:
    """The ``options`` (``field`` or ``outer.inner``) that spectral discovery has no use for:
    a head's training options (it uses only the image size, the guided filter and the dense
    CRF)."""
    return [k for k in options or {} if k.split(".")[0] not in SPECTRAL_FIELDS]


class SaliencyKind(Kind):
    """Saliency methods and ``spectral``: the foreground probability and its box per image."""

    output = "saliency"
    labels = False
    run_options = ("guided_filter", "guide", "dense_crf", "weights", "max_pixels", "max_side")
    shards = False  # each process discovers all its images (boxes.json is one file)

    def __init__(self, spec: MethodSpec | None, config: Any, settings: Settings,
                 run: Mapping[str, Any] | None = None) -> None:
        self.spec, self._config, self.settings = spec, config, settings
        self.method = SPECTRAL if spec is None else spec.name
        self._run = dict(run or {})

    @classmethod
    def create(cls, method: str, num_classes: int | None, options: Mapping[str, Any] | None,
               settings: Settings) -> SaliencyKind:
        """``method``: a registered saliency method or ``spectral`` (whose options are the
        head's: its size, guided filter and dense CRF)."""
        if num_classes is not None:
            raise UnsegError(f"{method} is a saliency method: it has no num_classes")
        spec = None if method == SPECTRAL else get_method(method)
        unused = spectral_unused(options) if spec is None else []
        if unused:
            raise UnsegError(f"{', '.join(unused)}: a head's training option, and spectral "
                             "discovery trains nothing (it uses only the image size, the "
                             "guided filter and the dense CRF)")
        if spec is not None and spec.output != "saliency":
            raise UnsegError(f"{spec.name} is {a_or_an(spec.output)} method, not a saliency one")
        resolve_max_side(320, settings.max_side)  # its check
        config = build_config(spec or get_method(METHOD), options, {"seed": settings.seed})
        settings = method_tap(method, settings)
        check_resolution(config.image_size, settings.max_side,
                         choose_backbone(settings.backbone)[0], settings.tap)
        return cls(spec, config, settings)

    @classmethod
    def from_run(cls, run_dir: Path, meta: dict[str, Any],
                 overrides: Mapping[str, Any], device: str | None) -> SaliencyKind:
        """``overrides``: ``guided_filter``, ``guide``, ``dense_crf``, ``weights``, ``max_pixels``,
        ``max_side`` (the working resolution's long side: None → 4 x the run's size, 0 → no
        limit; see :func:`unseg.data.resize.resolve_max_side`)."""
        settings = Settings(backbone=meta.get("backbone"), device=device,
                            weights=overrides.get("weights"),
                            max_pixels=overrides.get("max_pixels"),
                            max_side=overrides.get("max_side"))
        return cls(get_method(meta["method"]), None, settings,
                   {**meta, "overrides": dict(overrides)})

    @property
    def trains(self) -> bool:
        return self.spec is not None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The device; each process discovers all its images (no torchrun group)."""
        yield Session(resolve_device(self.settings.device))

    def fit(self, inputs: ImageInputs, root: str | Path, where: Path | None,
            session: Session) -> FittedSaliency:
        """The head trained on ``inputs`` (seeded by ``config.seed`` before the backbone
        opens, as the run was always seeded); ``spectral`` only opens its backbone."""
        s = self.settings
        seed_everything(self._config.seed)
        model = open_backbone(s.backbone, s.weights, s.tap, session.device)
        if self.spec is None:
            return FittedSaliency(None, model)
        self._config = saliency_config(self.spec, self._config, model)
        key = None if where is None or inputs.arrays else inputs_key(inputs.paths)
        if key is not None and (saved := saved_head(where, self.spec, self._config, model, key,
                                                    session.device)):
            return FittedSaliency(saved[0], model, saved[1], inputs.paths, saved_in=where)
        head, used, facts = train_saliency(
            root, inputs, self.spec, self._config, model, session.device,
            Path(s.cache_dir) / FEATURES_DIR if s.cache_dir else None, session.report,
            session.timings, s.max_pixels,
        )
        if key is not None:
            facts[INPUTS_KEY] = key
        return FittedSaliency(head, model, facts, used)

    def result(self, fitted: FittedSaliency, run_dir: Path, report: BatchReport) -> FitResult:
        return FitResult(run_dir, report, len(fitted.paths), fitted.facts)

    def save(self, fitted: FittedSaliency, run_dir: Path, session: Session) -> None:
        if self.spec is None or fitted.head is None:
            raise UnsegError("spectral is training-free: there is no run to save")
        if fitted.saved_in == run_dir:  # reused from there: written by the run that trained it
            return
        save_saliency_run(run_dir, self.spec, fitted.head, fitted.backbone,
                          self.settings.weights, fitted.facts, session.timings)

    def load(self, run_dir: Path, session: Session) -> FittedSaliency:
        head, model, _ = load_head(run_dir, session.device, self.settings.weights)
        self._config = head.config
        return FittedSaliency(head, model)

    def predict(self, fitted: FittedSaliency, inputs: ImageInputs, session: Session,
                root: str | Path, overlays: bool = False,
                reuse: bool = False) -> Iterator[Prediction]:
        """:func:`saliency_maps` of ``inputs`` with the head (its refinement, the dense CRF or
        the guided filter, as fitted or as ``unseg predict`` overrides it) or the spectral cut."""
        model = fitted.backbone
        cfg = self._config if fitted.head is None else fitted.head.config
        max_side = resolve_max_side(cfg.image_size, self.settings.max_side)
        if fitted.head is None:
            prob_fn = spectral_prob_fn(model, cfg.image_size, SpectralConfig(), max_side)
            overrides: Mapping[str, Any] = {}
        else:
            prob_fn = head_prob_fn(model, fitted.head, cfg.image_size, max_side)
            overrides = self._run.get("overrides", {})
        guided = _guided_settings(cfg, overrides)
        crf = _crf_settings(cfg, overrides)
        if crf is not None and filter_asked(overrides.get("guided_filter"),
                                            bool(overrides.get("guide"))):
            logger.warning("%s", FILTER_UNUSED)
        for path, mask8, box in saliency_maps(
            inputs.paths, prob_fn, guided, cfg.image_size, model.stride, session.report,
            session.timings, self.settings.max_pixels, max_side, inputs.arrays, crf,
        ):
            yield Prediction(path, mask8, None, box)

    def predict_proba(self, fitted: FittedSaliency, inputs: ImageInputs,
                      session: Session) -> Iterator[tuple[Path, np.ndarray]]:
        """The foreground probability ``[H, W]`` in ``[0, 1]`` of the 8-bit masks."""
        for pred in self.predict(fitted, inputs, session, "images"):
            yield pred.path, pred.mask.astype(np.float32) / 255.0
