"""The :class:`~unseg.Segmenter`'s arguments: which pipeline settings each kind of method takes,
their type checks, and the arguments a saved run was fitted with (what ``get_params`` of a
loaded segmenter gives, so that ``sklearn.base.clone`` of it is configured like the run)."""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from typing import Any

import torch

from unseg.errors import UnsegError
from unseg.pipelines.kind import Settings
from unseg.pipelines.maskcontrast import DEFAULT_CLASSES
from unseg.refine.guided_filter import GuideMode
from unseg.registry import check_value, config_from_dict, config_options, get_method
from unseg.utils.device import resolve_device

# the pipeline's own settings (every other option is a config field of the method), by the
# Segmenter's name → the Settings field
SEMANTIC_SETTINGS = ("size", "max_side", "max_pixels", "label_factor", "refine",
                     "pseudo_refine", "weights", "tap", "cache_dir", "workers", "embeddings")
SALIENCY_SETTINGS = ("max_side", "max_pixels", "weights", "tap", "cache_dir")
MASKCONTRAST_SETTINGS = ("size", "max_side", "max_pixels", "weights", "tap", "cache_dir",
                         "saliency", "discover", "clusters")
SETTINGS_OF = {"semantic": SEMANTIC_SETTINGS, "saliency": SALIENCY_SETTINGS,
               "embedding": MASKCONTRAST_SETTINGS}
FIELD = {"workers": "num_workers"}  # a Segmenter option named otherwise in Settings
PATH_SETTINGS = ("weights", "cache_dir", "embeddings", "saliency")  # a str or an os.PathLike
# the types of Segmenter.load's options that are no Settings field (None: the run's own)
RUN_OPTION_TYPES: dict[str, Any] = {"num_classes": int | None, "guided_filter": bool | None,
                                    "dense_crf": bool | None, "guide": GuideMode | None}


def run_params(meta: Mapping[str, Any], overrides: Mapping[str, Any],
               device: str | None = None) -> dict[str, Any]:
    """The :class:`Segmenter` arguments that fit as the run whose ``config.json`` is ``meta``
    was fitted: its method, classes, backbone, seed, the pipeline settings it records (size,
    max_side, refine, tap, weights, ...) and every option of its method's config, with
    ``overrides`` (:meth:`Segmenter.load`'s options) where they change one of these. What a
    run does not record stays at its default (``cache_dir``; MaskContrast's ``discover``)."""
    spec = get_method(meta["method"])
    config = config_from_dict(spec.config, meta.get("config", {}), "config.json")
    seed = overrides.get("seed")
    params: dict[str, Any] = {
        "method": spec.name, "num_classes": None, "backbone": meta["backbone"],
        "seed": int(getattr(config, "seed", 0) if seed is None else seed), "device": device}
    for option in config_options(spec):
        value: Any = config
        for name in option.path:
            value = getattr(value, name)
        params[".".join(option.path)] = value
    settings: dict[str, Any] = {
        "tap": meta.get("trained_tap", meta.get("tap")),
        "weights": overrides.get("weights") or meta.get("weights_path"),
        "max_pixels": (meta.get("max_pixels") if overrides.get("max_pixels") is None
                       else overrides["max_pixels"]),
        "size": meta.get("feature_size"),
    }
    if spec.output == "semantic":
        predict = meta.get("predict", {})
        embeddings = meta.get("embeddings") or {}
        settings.update(
            num_classes=int(meta["num_classes"]), max_side=meta.get("max_side"),
            label_factor=predict.get("label_factor"),
            refine=overrides.get("refine") or predict.get("refine"),
            pseudo_refine=meta.get("fit", {}).get("primaps", {}).get("refine"),
            workers=overrides.get("workers"), embeddings=embeddings.get("run"))
    elif spec.output == "saliency":
        settings.update(max_side=overrides.get("max_side"), size=None)
        for name, field in (("guided_filter", "guided_filter"), ("dense_crf", "dense_crf"),
                            ("guide", "guided.guide")):
            if overrides.get(name) is not None:
                params[field] = overrides[name]
    else:
        settings.update(num_classes=overrides.get("num_classes", DEFAULT_CLASSES),
                        clusters=overrides.get("clusters"))
    params.update({k: v for k, v in settings.items() if v is not None})
    return params


def check_device(device: Any) -> None:
    """Refuse a device that is neither None, a string nor a ``torch.device``, naming it (an
    int was taken by torch as a CUDA index), or one this machine cannot use (``"gpu"``, CUDA
    without a GPU: refused at the first fit before)."""
    if device is not None and not isinstance(device, (str, torch.device)):
        raise UnsegError(f"device: expected a string (\"cpu\", \"cuda\", \"cuda:1\") or a "
                         f"torch.device, got {device!r}")
    if device is not None:
        resolve_device(device)


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a pipeline setting of another type than its :class:`Settings` field's, naming it
    as the method options are (``size="320"`` failed later on a comparison, ``size=320.5`` was
    taken); a path setting may also be an ``os.PathLike``."""
    types = typing.get_type_hints(Settings)
    for name, value in settings.items():
        if name in PATH_SETTINGS and not isinstance(value, (str, os.PathLike, type(None))):
            raise UnsegError(f"{name}: expected a path (a string or os.PathLike) or None, "
                             f"got {value!r}")
        if name not in PATH_SETTINGS:
            check_value(name, types[FIELD.get(name, name)], value)


def check_run_options(options: Mapping[str, Any]) -> None:
    """Refuse an option of :meth:`Segmenter.load` of another type than it takes, naming it
    (``refine=3`` was "unknown refinement", ``num_classes=2.5`` taken as 2); None is the
    run's own value."""
    types = typing.get_type_hints(Settings)
    for name, value in options.items():
        if name in PATH_SETTINGS:
            check_settings({name: value})
        else:
            check_value(name, RUN_OPTION_TYPES.get(name) or types[FIELD.get(name, name)] | None,
                        value)
