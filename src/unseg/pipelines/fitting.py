"""Fitting any registered method: its config from options, its inputs from one extraction.

The pipelines call :func:`build_config` with the options a user gave (by config field name) and
the values the pipeline itself owns (``num_classes``, ``seed``, ...: set on every config that
has such a field), then :func:`fit_estimator` with the :class:`~unseg.methods.base.FitInputs`
that :func:`training_inputs` assembles from the extraction, as the method's spec asks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from unseg.backbones.base import Backbone
from unseg.errors import UnsegError
from unseg.features import FeatureSet
from unseg.methods.base import Estimator, FitInputs
from unseg.registry import MethodSpec, check_value, config_with, field_type
from unseg.utils.allocator import release_freed_memory
from unseg.utils.timing import Timings


def build_config(
    spec: MethodSpec, options: Mapping[str, Any] | None, pipeline: Mapping[str, Any]
) -> Any:
    """``spec.config`` with ``pipeline`` values on the fields it has, then ``options`` (field
    name, or ``outer.inner`` for nested fields → value). An option the config lacks, or a
    value not of its field's type (:func:`~unseg.registry.check_value`), is an error."""
    names = {f.name for f in dataclasses.fields(spec.config)}
    config = spec.config(**{k: v for k, v in pipeline.items() if k in names})
    values: dict[tuple[str, ...], Any] = {}
    for key, value in (options or {}).items():
        path = tuple(key.split("."))
        tp = field_type(spec.config, path) if path[0] in names else None
        if tp is None:
            raise UnsegError(f"{spec.name} has no option {key!r}")
        values[path] = check_value(key, tp, value)
    return config_with(config, values) if values else config


def extras_for(spec: MethodSpec, config: Any) -> tuple[str, ...]:
    """The feature extras (``unseg.features``) a fit of ``spec`` with ``config`` needs."""
    needs = spec.needs_for(config)
    extras = []
    if "images" in needs or "proposals" in needs:
        extras.append("image")
    if "student_features" in needs:
        extras.append("student")
    return tuple(extras)


def training_inputs(
    spec: MethodSpec,
    config: Any,
    feats: FeatureSet,
    paths: Sequence[Path],
    proposals: Sequence[torch.Tensor] | None = None,
) -> FitInputs:
    """The :class:`FitInputs` of ``paths`` that ``spec`` needs with ``config``."""
    needs = spec.needs_for(config)
    if "proposals" in needs and proposals is None:
        raise UnsegError(f"{spec.name} needs proposals; none were computed")
    return FitInputs(
        features=[feats[p] for p in paths],
        images=[feats.extra(p, "image") for p in paths] if "images" in needs else None,
        proposals=list(proposals) if "proposals" in needs and proposals is not None else None,
        student_features=(
            [feats.extra(p, "student") for p in paths] if "student_features" in needs else None
        ),
    )


def check_fit_inputs(inputs: FitInputs) -> None:
    """Refuse inputs no method can use: no images, per-image lists of another length, feature
    maps that are not ``[C, h, w]`` with one ``C``, images that are not ``[3, H, W]``."""
    n = len(inputs)
    if n == 0:
        raise UnsegError("no training images (FitInputs.features is empty)")
    for name in ("images", "proposals", "student_features", "masks"):
        values = getattr(inputs, name, None)
        if values is not None and len(values) != n:
            raise UnsegError(f"{n} feature maps but {len(values)} {name} (one per image)")
    for name in ("features", "student_features"):
        maps = getattr(inputs, name)
        if maps is None:
            continue
        if any(f.ndim != 3 for f in maps):
            raise UnsegError(f"{name} must be [C, h, w] per image")
        channels = sorted({int(f.shape[0]) for f in maps})
        if len(channels) > 1 or channels[0] != inputs.features[0].shape[0]:
            raise UnsegError(f"{name} have different channel counts: {channels}")
    if inputs.images is not None and any(x.ndim != 3 or x.shape[0] != 3 for x in inputs.images):
        raise UnsegError("images must be [3, H, W] per image")


def fit_estimator(
    spec: MethodSpec,
    config: Any,
    inputs: FitInputs,
    backbone: Backbone,
    device: torch.device,
    timings: Timings,
) -> Estimator:
    """A new ``spec.estimator(config, device)`` fitted on ``inputs`` (timed as ``fitting``),
    after :func:`check_fit_inputs`.

    Methods that need the backbone get it as ``feature_fn`` (images ``[B, 3, H, W]`` in
    ``[0, 1]`` → features of ``spec.feature_kind``).
    """
    check_fit_inputs(inputs)
    estimator = spec.estimator(config, device)
    if "backbone" in spec.needs_for(config):

        def feature_fn(images: torch.Tensor) -> torch.Tensor:
            return backbone.forward_features(images, spec.feature_kind)

        estimator.feature_fn = feature_fn
    with timings.stage("fitting"):
        fitted = estimator.fit(inputs)
    release_freed_memory()  # the fit's per-image working set (see unseg.utils.allocator)
    return fitted
