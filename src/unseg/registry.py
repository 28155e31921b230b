"""The method registry (timm's habit): every method registers once, and the commands read it.

A :class:`MethodSpec` names the method, its config dataclass (defaults = the paper's values), its
estimator class (the contract of :mod:`unseg.methods.base`), what the estimator needs of the
training images (:data:`NEEDS`), and its output kind (``"semantic"`` class ids,
``"saliency"`` foreground probabilities, or ``"embedding"``: pixel embeddings and a saliency
logit, turned into class ids by clustering the images a run predicts). From it:

- ``unseg fit METHOD``, ``unseg segment --method``, ``unseg discover --method`` and their help
  get one command-line option per config field (:func:`config_options`: the field's type gives
  the parser, its ``metadata["help"]`` or the spec's ``option_help`` the help text); fields the
  pipeline fills from its own options (``pipeline_fields``, e.g. ``num_classes`` from ``-k``) get
  none;
- a run folder records the method's name and config (:func:`config_to_dict`), and
  :func:`config_from_dict` plus the estimator's ``from_state`` rebuild it.

Adding a method: one module with its config and estimator, and one :func:`register_method` call
at the end of this file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from unseg.errors import UnsegError

Output = Literal["semantic", "saliency", "embedding"]
NEEDS: tuple[str, ...] = (
    "features",  # dense features [C, h, w] of each training image (always)
    "images",  # the uint8 image [3, H, W] the features were computed on
    "proposals",  # PriMaPs pseudo-labels [H, W] (semantic methods)
    "student_features",  # features of a photometrically augmented view
    "backbone",  # the frozen backbone itself (the estimator's feature_fn), e.g. for crops
    "masks",  # saliency mask proposals [H, W] of each image (from a folder, e.g. --saliency)
)


@dataclass(frozen=True)
class MethodSpec:
    """One registered method (see the module docstring)."""

    name: str
    config: type
    estimator: type
    output: Output
    needs: tuple[str, ...]
    summary: str
    aliases: tuple[str, ...] = ()
    feature_kind: Literal["tokens", "keys"] = "tokens"
    pipeline_fields: tuple[str, ...] = ()
    option_help: Mapping[str, str] = field(default_factory=dict)
    option_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def needs_for(self, config: Any) -> tuple[str, ...]:
        """What a fit with ``config`` needs: :attr:`needs`, less ``student_features`` when the
        config turns the student view off (``student_augs=False``)."""
        if not getattr(config, "student_augs", True):
            return tuple(n for n in self.needs if n != "student_features")
        return self.needs


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; its name and aliases must be new, its needs known."""
    unknown = sorted(set(spec.needs) - set(NEEDS))
    if unknown:
        raise UnsegError(f"method {spec.name!r} needs unknown inputs: {', '.join(unknown)}")
    if not dataclasses.is_dataclass(spec.config):
        raise UnsegError(f"method {spec.name!r}: its config must be a dataclass")
    for name in (spec.name, *spec.aliases):
        if name in _METHODS:
            raise UnsegError(f"method name {name!r} is registered twice")
    for name in (spec.name, *spec.aliases):
        _METHODS[name] = spec
    return spec


def list_methods(output: Output | None = None) -> list[MethodSpec]:
    """Registered methods (each once, in registration order), optionally of one output kind."""
    seen: dict[str, MethodSpec] = {}
    for spec in _METHODS.values():
        if output is None or spec.output == output:
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or an alias of it), or a clear error listing them."""
    spec = _METHODS.get(name)
    if spec is None:
        known = ", ".join(s.name for s in list_methods())
        raise UnsegError(f"unknown method {name!r}; this unseg knows: {known}")
    return spec


# ----------------------------------------------------------------------- configs <-> options


@dataclass(frozen=True)
class ConfigOption:
    """One command-line option generated from a config field (``path``: nested field names)."""

    path: tuple[str, ...]
    flags: tuple[str, ...]
    kind: Literal["bool", "int", "float", "str", "pair", "optional-int", "ints", "floats"]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination of this option."""
        return "cfg__" + "__".join(self.path)


def _kind(tp: Any) -> tuple[str, tuple[str, ...] | None]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if tp is bool or (optional and set(args) == {bool, type(None)}):
        return "bool", None  # None: the pipeline decides (e.g. from the backbone)
    if tp is int:
        return "int", None
    if tp is float:
        return "float", None
    if tp is str:
        return "str", None
    if origin is Literal:
        return "str", tuple(str(a) for a in args)
    if origin in (typing.Union, types.UnionType) and set(args) == {int, type(None)}:
        return "optional-int", None
    if origin is tuple and len(args) == 2 and all(a in (int, float) for a in args):
        return "pair", None
    if origin is tuple and len(args) == 2 and args == (int, Ellipsis):
        return "ints", None  # any number of ints
    if origin is tuple and len(args) > 2 and all(a is float for a in args):
        return "floats", None  # as many floats as the default has
    raise UnsegError(f"config field type {tp!r} has no command-line form")


def config_options(spec: MethodSpec) -> list[ConfigOption]:
    """One option per field of ``spec.config`` (nested dataclasses flattened as
    ``--outer-inner``), except :attr:`MethodSpec.pipeline_fields`."""
    return _options(spec, spec.config, ())


def _options(spec: MethodSpec, cls: type, prefix: tuple[str, ...]) -> list[ConfigOption]:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out: list[ConfigOption] = []
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        key = ".".join(path)
        if key in spec.pipeline_fields:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _options(spec, tp, path)
            continue
        kind, choices = _kind(tp)
        default = getattr(defaults, f.name)
        text = f.metadata.get("help") or spec.option_help.get(key) or key.replace("_", " ")
        flags = ("--" + "-".join(path).replace("_", "-"), *spec.option_flags.get(key, ()))
        shown = text if "(default:" in text else f"{text} (default: {default})"
        out.append(ConfigOption(path, flags, kind, default, shown,
                                choices))  # type: ignore[arg-type]
    return out


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: Mapping[str, Any], source: str = "config") -> Any:
    """``cls`` built from ``values`` (as :func:`config_to_dict` wrote them): nested dataclasses
    rebuilt, lists turned back into tuples, absent fields at their defaults; unknown keys are an
    error naming ``source``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UnsegError(f"{source}: unknown {cls.__name__} settings: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            value = config_from_dict(tp, value, source)  # type: ignore[arg-type]
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UnsegError(f"{source}: invalid {cls.__name__} ({exc})") from None


def config_with(config: Any, values: Mapping[tuple[str, ...], Any]) -> Any:
    """``config`` with the (possibly nested) fields at ``values``' paths replaced."""
    by_head: dict[str, dict[tuple[str, ...], Any]] = {}
    direct: dict[str, Any] = {}
    for path, value in values.items():
        if len(path) == 1:
            direct[path[0]] = value
        else:
            by_head.setdefault(path[0], {})[path[1:]] = value
    for head, sub in by_head.items():
        direct[head] = config_with(getattr(config, head), sub)
    return dataclasses.replace(config, **direct)


# ---------------------------------------------------------------------------- registrations

# Options both saliency heads have: the Boosting multi-scale trick and the guided filter.
_MULTISCALE_HELP = {
    "multiscale": "multi-scale consistency (Boosting trick)",
    "crop_scale": "crop side as a fraction of the image side (LO HI)",
    "fixed_crop": "the reference code's near-fixed (top-left) crop, for comparison",
    "crop_mode": "crop features: cache (backbone once per pooled crop), roi "
    "(RoI-align of the full map) or backbone (every step)",
    "crop_pool": "crops cached per image",
    "weight_consistency": "weight of the multi-scale MSE",
}
_GUIDED_HELP = {
    "guided_filter": "guided-filter refinement at prediction",
    "guided.radius": "guided-filter radius",
    "guided.eps": "guided-filter ε",
    "guided.guide": "guided-filter guide: mean of RGB (reference code) or BT.601 luma",
    "guided.standardize": "standardise each mask channel before filtering",
}


def _register_builtin() -> None:
    from unseg.methods.found import FoundConfig, FoundHead
    from unseg.methods.kmeans import KMeans, KMeansConfig
    from unseg.methods.maskcontrast import MaskContrast, MaskContrastConfig
    from unseg.methods.primaps_em import PriMaPsEM, PriMaPsEMConfig
    from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig

    register_method(MethodSpec(
        name="primaps-em",
        config=PriMaPsEMConfig,
        estimator=PriMaPsEM,
        output="semantic",
        needs=("features", "images", "proposals", "student_features"),
        summary="PriMaPs-EM: class prototypes fitted to principal mask proposals",
        pipeline_fields=("num_classes", "seed", "label_factor", "crf"),
        option_help={
            "epochs": "EM epochs over the images (paper: 50)",
            "steps": "a fixed number of EM steps instead of epochs",
            "batch_size": "images per EM step",
            "lr": "Adam learning rate of θ",
            "focal_gamma": "focal weighting exponent γ",
            "ema_decay": "ceiling of θ_m's warm-up EMA decay",
            "ema_every": "steps between θ_m updates",
            "ema_warmup": "θ_m's decay warms up as min(ceiling, 1 − 1/k) at the k-th update "
            "(off: the ceiling from the first update, unseg 0.1.0's schedule; on street scenes "
            "--no-ema-warmup --no-student-augs --no-center scored best, "
            "docs/results-primaps.md)",
            "kmeans_passes": "cosine k-means passes of the initialisation",
            "init_max_points": "feature vectors sampled for the initialisation",
            "classifier": "reference: weight-normalised θ with trainable gain on raw features; "
            "cosine: unit-gain cosine classifier (default: reference on a ViT's LayerNorm-ed "
            "tokens and on MaskContrast embeddings, cosine on a CNN's features, as measured)",
            "center": "subtract the training images' mean feature, kept in the run (default: "
            "on where the backbone's default tap was measured best centred)",
            "student_augs": "train θ on the student view (blur, jitter/greyscale; seeded)",
            "flip": "average the features of the image and its mirror image at prediction",
            "ignore_index": "pseudo-label id of pixels outside every proposal",
        },
    ))
    register_method(MethodSpec(
        name="kmeans",
        config=KMeansConfig,
        estimator=KMeans,
        output="semantic",
        needs=("features",),
        summary="cosine k-means of the backbone features (the baseline)",
        pipeline_fields=("num_classes", "seed"),
        option_help={
            "n_init": "k-means++ restarts (the best inertia is kept)",
            "max_iter": "Lloyd iterations per restart",
            "tol": "relative inertia change that stops the iterations",
            "chunk_size": "feature vectors per distance block (memory)",
            "center": "subtract the training images' mean feature, kept in the run (default: "
            "on where the backbone's default tap was measured best centred)",
        },
    ))
    register_method(MethodSpec(
        name="saliency-head",
        config=SaliencyHeadConfig,
        estimator=SaliencyHead,
        output="saliency",
        needs=("features", "images", "backbone"),
        summary="SEMPART-style saliency head trained with the soft normalized cut",
        aliases=("saliency", "head"),
        feature_kind="keys",
        option_help={
            "image_size": "training crop side and prediction short side in pixels",
            "lr": "AdamW learning rate",
            "batch_size": "images per step",
            "epochs": "training epochs (paper: 30)",
            "tau": "key-affinity threshold τ of the cut",
            "eps": "affinity below τ",
            "dim": "head width",
            "layers": "transformer layers of the head",
            "heads": "attention heads",
            "weight_coarse": "weight of the cut on the coarse prediction",
            "weight_agree": "weight of the coarse/fine agreement",
            "weight_border": "weight of the border prior",
            **_MULTISCALE_HELP,
            "weight_crop_ncut": "weight of the cut on the crop",
            **_GUIDED_HELP,
            "seed": "random seed",
        },
        option_flags={"image_size": ("--size",), "guided.guide": ("--guide",)},
    ))
    register_method(MethodSpec(
        name="found",
        config=FoundConfig,
        estimator=FoundHead,
        output="saliency",
        needs=("features", "images", "backbone"),
        summary="FOUND-style head: a 1x1 conv trained against background-seed pseudo-masks",
        aliases=("found-head",),
        feature_kind="keys",
        option_help={
            "image_size": "training crop side and prediction short side in pixels",
            "seed_rule": "background seed: the most typical patch of the border ring or of "
            "the whole grid",
            "bkg_threshold": "cosine similarity to the seed above which a patch is background",
            "n_seeds": "patches averaged as the background seed (the seed and its nearest)",
            "refine_targets": "guided-filter the 0/1 targets (stands in for the bilateral "
            "solver)",
            "lr": "AdamW learning rate",
            "batch_size": "images per step",
            "steps": "training steps (reference: 500)",
            "lr_step": "steps between learning-rate decays",
            "lr_gamma": "learning-rate decay factor",
            "stop_bkg_loss": "steps trained on the pseudo-masks before self-training",
            "weight_refined": "weight of the loss against the refined own prediction",
            "weight_self": "weight of the self-training loss",
            "standardize": "standardise each input channel by its training-set mean and std "
            "(folded into the conv after training) (default: on for CNN backbones, off for "
            "ViTs, whose scale the reference's lr was set for)",
            **_MULTISCALE_HELP,
            "weight_crop_base": "weight of the base loss on the crop",
            **_GUIDED_HELP,
            "seed": "random seed",
        },
        option_flags={"image_size": ("--size",), "guided.guide": ("--guide",)},
    ))
    register_method(MethodSpec(
        name="maskcontrast",
        config=MaskContrastConfig,
        estimator=MaskContrast,
        output="embedding",
        needs=("features", "student_features", "masks"),
        summary="MaskContrast: pixel embeddings contrasting salient-object mask proposals",
        aliases=("mask-contrast",),
        pipeline_fields=("seed", "stage_of"),
        option_help={
            "embed_dim": "pixel embedding dimension",
            "width": "decoder width",
            "aspp_rates": "dilation rates of the ASPP branches",
            "momentum": "momentum of the key model",
            "temperature": "contrastive temperature T",
            "queue_size": "prototype queue length (paper: 256 unsupervised, 128 supervised "
            "saliency)",
            "lr": "SGD learning rate (paper: 0.004 at batch 128)",
            "sgd_momentum": "SGD momentum",
            "weight_decay": "SGD weight decay",
            "poly_power": "exponent of the poly learning-rate decay",
            "epochs": "training epochs (the paper's 40)",
            "batch_size": "images per step (paper: 128 unsupervised, 64 supervised saliency; "
            "16 scored higher on a few hundred images)",
            "view_size": "view side in image pixels",
            "loss_size": "pixels per side where the losses are taken (0: the view size)",
            "crop_scale": "random resized crop area range (LO HI)",
            "crop_ratio": "random resized crop aspect range (LO HI)",
            "flip_p": "horizontal flip probability",
            "min_view_area": "smallest salient share of a view",
            "max_view_area": "largest salient share of a view",
            "max_redraws": "view redraws before the whole image is used",
            "saliency_weight": "weight of the balanced BCE saliency loss",
            "jitter": "colour jitter strengths (not an option: photometric views come from "
            "the student features)",
            "jitter_p": "colour jitter probability (photometric_view)",
            "grey_p": "greyscale probability (photometric_view)",
            "train_last_stage": "fine-tune the backbone's last stage with the head (CNN taps "
            "but the first; features are cached before that stage)",
        },
        option_flags={"queue_size": ("--queue",)},
    ))


_register_builtin()
