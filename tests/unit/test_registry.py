"""The method registry and the estimator contract, checked over every registered method:
fit on a tiny planted set, save, reload, predict identically, refuse bad inputs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

import numpy as np
import pytest
import torch

from unseg.backbones import Backbone
from unseg.cli.options import add_method_options, given_options
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.pipelines.fitting import build_config, check_fit_inputs, fit_estimator
from unseg.registry import (
    NEEDS,
    MethodSpec,
    config_from_dict,
    config_options,
    config_to_dict,
    field_type,
    get_method,
    list_methods,
    register_method,
)
from unseg.runs import load_fitted, save_fitted
from unseg.utils.options import bounds_text, out_of_bounds
from unseg.utils.timing import Timings

STRIDE = 4
# small budgets, applied to whichever config has the field
FAST = {"steps": 6, "epochs": 2, "batch_size": 4, "dim": 8, "layers": 1, "heads": 2,
        "n_init": 1, "kmeans_passes": 1}
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])


def _planted(
    backbone: Backbone, n: int = 6, seed: int = 0
) -> tuple[FitInputs, list[torch.Tensor]]:
    """Images of three colour regions (their layout varies), their features, the regions as
    proposals, and the region ids (the planted classes) at the image size."""
    gen = torch.Generator().manual_seed(seed)
    images, feats, props, truth = [], [], [], []
    for _ in range(n):
        cut_r, cut_c = (int(v) for v in torch.randint(2, 4, (2,), generator=gen) * STRIDE)
        region = torch.zeros(16, 20, dtype=torch.long)
        region[cut_r:, :] = 1
        region[:cut_r, cut_c:] = 2
        img = COLOURS[region].permute(2, 0, 1) + 0.03 * torch.randn(3, 16, 20, generator=gen)
        img8 = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(img8)
        feats.append(backbone.forward_features(img8[None].float() / 255, "tokens")[0])
        props.append(region.clone())
        truth.append(region)
    inputs = FitInputs(feats, images=images, proposals=props, student_features=list(feats),
                       masks=[r != 0 for r in truth])
    return inputs, truth


def _config(spec: MethodSpec):
    names = {f.name for f in dataclasses.fields(spec.config)}
    return build_config(spec, {k: v for k, v in FAST.items() if k in names},
                        {"num_classes": 3, "seed": 0})


def _outputs(spec: MethodSpec, estimator, inputs: FitInputs) -> list[torch.Tensor]:
    if spec.output == "semantic":
        return [estimator.logits(f, 2) for f in inputs.features]
    if spec.output == "embedding":
        return [t for f in inputs.features for t in estimator.forward(f, (16, 20))]
    feats = torch.stack(list(inputs.features))
    return [estimator.predict_proba(feats, torch.stack(list(inputs.images)))]


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_fit_save_reload_predicts_identically(stand_in, spec: MethodSpec, tmp_path):
    backbone = stand_in(STRIDE, std=1.0)
    inputs, _ = _planted(backbone)
    config = _config(spec)
    estimator = fit_estimator(spec, config, inputs, backbone, torch.device("cpu"), Timings())
    assert isinstance(estimator.history_, list)
    state = estimator.state_dict()
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in state.values())
    save_fitted(tmp_path / "run", spec, estimator, extra={"note": "contract"})
    again_spec, again, meta = load_fitted(tmp_path / "run")
    assert again_spec is spec and meta["note"] == "contract" and again.config == estimator.config
    for a, b in zip(_outputs(spec, estimator, inputs), _outputs(spec, again, inputs),
                    strict=True):
        torch.testing.assert_close(a, b)
    if spec.output == "semantic":
        k, h, w = _outputs(spec, estimator, inputs)[0].shape
        assert (k, h, w) == (3, 8, 10)
        ids = estimator.predict(inputs.features[0], (16, 20), 2)
        assert ids.shape == (16, 20) and ids.dtype == torch.int64


@pytest.mark.parametrize("spec", list_methods("semantic"), ids=lambda s: s.name)
def test_semantic_methods_recover_planted_classes(stand_in, spec: MethodSpec):
    """Three colours, three classes: every semantic method separates them (up to a relabeling:
    each true region maps to one predicted class, and different regions to different ones)."""
    backbone = stand_in(STRIDE, std=1.0)
    inputs, truth = _planted(backbone)
    estimator = fit_estimator(spec, _config(spec), inputs, backbone, torch.device("cpu"),
                              Timings())
    pred = torch.stack([estimator.predict(f, (16, 20), 2) for f in inputs.features])
    gt = torch.stack(truth)
    majority = [int(pred[gt == c].mode().values) for c in range(3)]
    assert len(set(majority)) == 3
    agree = sum((pred[gt == c] == majority[c]).float().mean() for c in range(3)) / 3
    assert agree > 0.9


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_bad_inputs_are_refused_with_clear_errors(stand_in, spec: MethodSpec):
    backbone = stand_in(STRIDE, std=1.0)
    inputs, _ = _planted(backbone, 2)
    est = spec.estimator(_config(spec), "cpu")
    with pytest.raises(UnsegError):
        est.fit(FitInputs([]))
    bad = [
        FitInputs([inputs.features[0], inputs.features[1][:5]], inputs.images, inputs.proposals),
        FitInputs(list(inputs.features), inputs.images[:1], inputs.proposals),
        FitInputs([f[0] for f in inputs.features], inputs.images, inputs.proposals),
    ]
    for wrong in bad:
        with pytest.raises(UnsegError):
            fit_estimator(spec, _config(spec), wrong, backbone, torch.device("cpu"), Timings())


def test_check_fit_inputs_names_the_problem():
    f = torch.zeros(4, 2, 2)
    with pytest.raises(UnsegError, match="no training images"):
        check_fit_inputs(FitInputs([]))
    with pytest.raises(UnsegError, match="2 feature maps but 1 proposals"):
        check_fit_inputs(FitInputs([f, f], proposals=[f[0]]))
    with pytest.raises(UnsegError, match="different channel counts: \\[3, 4\\]"):
        check_fit_inputs(FitInputs([f, f[:3]]))
    with pytest.raises(UnsegError, match="images must be"):
        check_fit_inputs(FitInputs([f], images=[torch.zeros(1, 8, 8)]))


def test_registry_lookup_and_registration_rules():
    assert {s.name for s in list_methods()} >= {"primaps-em", "kmeans", "saliency-head"}
    assert get_method("head") is get_method("saliency-head")
    assert all(s.output == "semantic" for s in list_methods("semantic"))
    assert all(set(s.needs) <= set(NEEDS) for s in list_methods())
    with pytest.raises(UnsegError, match="unknown method 'nope'; this unseg knows: primaps-em"):
        get_method("nope")
    spec = get_method("kmeans")
    with pytest.raises(UnsegError, match="registered twice"):
        register_method(spec)
    with pytest.raises(UnsegError, match="unknown inputs: depth"):
        register_method(dataclasses.replace(spec, name="x", needs=("depth",)))


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_every_config_field_has_an_option_or_is_the_pipelines(spec: MethodSpec):
    flat = {".".join(o.path) for o in config_options(spec)}
    top = {f.name for f in dataclasses.fields(spec.config)}
    for name in top - set(spec.pipeline_fields):
        assert name in flat or any(k.startswith(name + ".") for k in flat), name
    assert all("(default: " in o.help for o in config_options(spec))
    helps = {".".join(o.path): o.help for o in config_options(spec)}
    for name, bounds in _bounded_fields(spec.config):  # the range a value must keep, said
        if name in helps:
            assert helps[name].endswith(f"{bounds_text(bounds)})"), (name, helps[name])


def test_generated_options_parse_into_the_config():
    parser = argparse.ArgumentParser()
    add_method_options(parser, [get_method("saliency-head")])
    args = parser.parse_args(["--epochs", "3", "--guide", "luma", "--crop-scale", "0.4", "0.6",
                              "--no-guided-filter"])
    spec = get_method("saliency-head")
    given = given_options(args, spec)
    assert given == {"epochs": 3, "guided.guide": "luma", "crop_scale": (0.4, 0.6),
                     "guided_filter": False}
    cfg = build_config(spec, given, {})
    assert cfg.epochs == 3 and cfg.guided.guide == "luma" and cfg.crop_scale == (0.4, 0.6)
    assert cfg.guided.radius == 9  # untouched fields keep the method's defaults
    assert given_options(parser.parse_args([]), spec) == {}


@pytest.mark.parametrize(("method", "option", "value", "says"), [
    ("kmeans", "n_init", "x", "n_init: expected an integer, got 'x'"),
    ("kmeans", "n_init", True, "n_init: expected an integer, got True"),
    ("kmeans", "n_init", 2.0, "n_init: expected an integer, got 2.0"),
    ("kmeans", "tol", "1e-3", "tol: expected a number, got '1e-3'"),
    ("kmeans", "center", 1, "center: expected True or False, got 1"),
    ("primaps-em", "steps", "3", "steps: expected an integer or None, got '3'"),
    ("primaps-em", "init", "pca", "init: expected 'kmeans' or 'probe', got 'pca'"),
    ("found", "crop_scale", (0.3,), "crop_scale: expected a tuple of 2 numbers, got (0.3,)"),
    ("found", "guided.guide", "gray", "guided.guide: expected 'mean' or 'luma', got 'gray'"),
    ("found", "dense_crf", "yes", "dense_crf: expected True or False or None, got 'yes'"),
    ("maskcontrast", "aspp_rates", (1, 2.5), "aspp_rates: expected a tuple of integers, got"),
])
def test_an_option_of_the_wrong_type_is_refused_by_name(method, option, value, says):
    """Segmenter("kmeans", n_init="x") got as far as the fit and died in range() with
    "'str' object cannot be interpreted as an integer"."""
    with pytest.raises(UnsegError, match=re.escape(says)):
        build_config(get_method(method), {option: value}, {})


def test_values_of_their_field_s_type_are_taken():
    """What argparse gives (and an int for a float, a list for a tuple) passes unchanged."""
    cfg = build_config(get_method("found"), {"lr": 1, "steps": 3, "crop_scale": [0.3, 0.6],
                                             "dense_crf": None, "guided.guide": "luma",
                                             "bkg_threshold": None}, {})
    assert (cfg.lr, cfg.steps, cfg.crop_scale, cfg.guided.guide) == (1, 3, (0.3, 0.6), "luma")
    with pytest.raises(UnsegError, match=r"found has no option 'guided\.colour'"):
        build_config(get_method("found"), {"guided.colour": 1}, {})


def test_an_option_of_another_method_is_refused():
    parser = argparse.ArgumentParser()
    add_method_options(parser, list_methods("semantic"))
    args = parser.parse_args(["--n-init", "2"])
    assert given_options(args, get_method("kmeans")) == {"n_init": 2}
    with pytest.raises(UnsegError, match="--n-init is not an option of primaps-em"):
        given_options(args, get_method("primaps-em"))


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_config_dict_round_trip(spec: MethodSpec):
    cfg = _config(spec)
    assert config_from_dict(spec.config, config_to_dict(cfg)) == cfg
    with pytest.raises(UnsegError, match=r"run.json: unknown \w+ settings: colour"):
        config_from_dict(spec.config, {"colour": 1}, "run.json")


def _bounded_fields(cls: type, prefix: str = "") -> list[tuple[str, dict]]:
    """``(dotted name, bounds)`` of every field of ``cls`` (nested configs too) with bounds."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_bounded_fields(hints[f.name], f"{prefix}{f.name}."))
        elif "bounds" in f.metadata:
            out.append((prefix + f.name, f.metadata["bounds"]))
    return out


def _outside(bounds: dict) -> list[float]:
    """Values just outside each of ``bounds`` (and NaN, which no bound admits)."""
    values = [float("nan")]
    for name, b in bounds.items():
        values.append(b - 1 if name in ("at_least", "above") else b + 1)
        if name in ("above", "below"):
            values.append(b)
    return values


@pytest.mark.parametrize("spec", list_methods(), ids=lambda s: s.name)
def test_every_bound_refuses_the_values_outside_it_by_name(spec: MethodSpec):
    """`--steps 0` trained an empty head and exit 0, `--lr -1` ended in torch's ValueError
    traceback, `--batch-size 0` in range()'s: values a field cannot take are refused when the
    config is built, on every path (options, a saved run's config.json, the constructor)."""
    fields = _bounded_fields(spec.config)
    assert len(fields) >= 4
    for name, bounds in fields:
        tp = field_type(spec.config, tuple(name.split(".")))
        ints = tp is int or int in typing.get_args(tp)
        for value in _outside(bounds):
            if ints and value != value:  # NaN is no integer: the type check's
                continue
            value = int(value) if ints else value
            with pytest.raises(UnsegError, match=rf"^{re.escape(name)} must be .*, got "):
                build_config(spec, {name: value}, {})
            outer, _, inner = name.partition(".")
            saved = {outer: {inner: value}} if inner else {name: value}
            with pytest.raises(UnsegError, match=rf"^run/config.json: {re.escape(name)} must"):
                config_from_dict(spec.config, saved, "run/config.json")
        inside = {"at_least": 0, "above": 1e-3, "at_most": 0, "below": -1e-3}
        edge = max((bounds[k] + inside[k] for k in bounds if k in ("at_least", "above")),
                   default=min(bounds[k] + inside[k] for k in bounds))
        build_config(spec, {name: int(edge) if ints and edge == int(edge) else edge}, {})


def test_the_bounds_speak_plainly() -> None:
    assert out_of_bounds(0, {"at_least": 1}) == "must be at least 1"
    assert out_of_bounds(0.5, {"above": 0, "below": 0.5}) == "must be above 0 and below 0.5"
    assert out_of_bounds(0.25, {"above": 0, "below": 0.5}) is None
    assert out_of_bounds(None, {"at_least": 1}) is None  # None, where allowed, is a default
    assert out_of_bounds(True, {"above": 3}) is None  # the type check refuses a bool
    assert out_of_bounds(float("nan"), {"at_most": 1}) == "must be at most 1"
    assert out_of_bounds(np.int64(0), {"at_least": 1}) == "must be at least 1"  # numpy's too
