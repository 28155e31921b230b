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

Adding a method (timm's ``@register_model`` habit): one module in :mod:`unseg.methods` with
its config dataclass, whose fields carry their option help (:func:`unseg.utils.options.option`),
and its estimator class under the :func:`register` decorator; the methods package imports the
module. This module imports no method: the built-ins register when :mod:`unseg.methods` is
first imported, which :func:`get_method` and :func:`list_methods` do.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from unseg.errors import UnsegError
from unseg.utils.options import bounds_text

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
    option_help: Mapping[str, str] = field(default_factory=dict)  # besides the fields' own
    option_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rank: int = 100  # place in listings (lower first; ties in registration order)

    def needs_for(self, config: Any) -> tuple[str, ...]:
        """What a fit with ``config`` needs: :attr:`needs`, less ``student_features`` when the
        config turns the student view off (``student_augs=False``)."""
        if not getattr(config, "student_augs", True):
            return tuple(n for n in self.needs if n != "student_features")
        return self.needs


_METHODS: dict[str, MethodSpec] = {}
BUILTINS = "unseg.methods"  # the package whose import registers the built-in methods
T = TypeVar("T")


def _builtins() -> None:
    importlib.import_module(BUILTINS)


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


def register(
    name: str,
    *,
    config: type,
    output: Output,
    needs: tuple[str, ...],
    summary: str,
    **extra: Any,
) -> Callable[[T], T]:
    """Class decorator registering the estimator it decorates as method ``name`` (the other
    arguments are :class:`MethodSpec`'s); returns the class unchanged."""

    def decorate(estimator: T) -> T:
        register_method(MethodSpec(name=name, config=config, estimator=estimator,  # type: ignore[arg-type]
                                   output=output, needs=needs, summary=summary, **extra))
        return estimator

    return decorate


def list_methods(output: Output | None = None) -> list[MethodSpec]:
    """Registered methods (each once, in registration order), optionally of one output kind."""
    _builtins()
    seen: dict[str, MethodSpec] = {}
    for spec in _METHODS.values():
        if output is None or spec.output == output:
            seen.setdefault(spec.name, spec)
    return sorted(seen.values(), key=lambda s: s.rank)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or an alias of it), or a clear error listing them."""
    _builtins()
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
    kind: Literal["bool", "int", "float", "str", "pair", "optional-int", "optional-float",
                  "ints", "floats"]
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
    if origin in (typing.Union, types.UnionType) and set(args) == {float, type(None)}:
        return "optional-float", None  # None: the method decides (e.g. from another field)
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
        flags = ("--" + "-".join(path).replace("_", "-"), *f.metadata.get("flags", ()),
                 *spec.option_flags.get(key, ()))
        allowed = bounds_text(f.metadata.get("bounds", {}))
        if "(default:" in text:
            shown = f"{text} ({allowed})" if allowed else text
        else:
            shown = f"{text} (default: {default}{'; ' + allowed if allowed else ''})"
        out.append(ConfigOption(path, flags, kind, default, shown,
                                choices))  # type: ignore[arg-type]
    return out


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: Mapping[str, Any], source: str = "config") -> Any:
    """``cls`` built from ``values`` (as :func:`config_to_dict` wrote them): nested dataclasses
    rebuilt, lists turned back into tuples, absent fields at their defaults; unknown keys and
    values out of their fields' bounds (the config's own check) are errors naming ``source``."""
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
    except UnsegError as exc:  # a value out of its bounds (the config's own check)
        raise UnsegError(f"{source}: {exc}") from None


def field_type(cls: type, path: tuple[str, ...]) -> Any:
    """The annotated type of the (possibly nested) field at ``path`` of the dataclass ``cls``;
    None when there is no such field."""
    tp: Any = cls
    for name in path:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(name)
    return tp


def check_value(name: str, tp: Any, value: Any) -> Any:
    """``value`` for the field ``name`` annotated ``tp`` (int, float, bool, str, Literal,
    tuples, unions with None, nested configs), a list given for a tuple made a tuple; a value
    of another type is an error. An int is a float, a bool is not an int."""
    if not _fits(tp, value):
        raise UnsegError(f"{name}: expected {_describe(tp)}, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _fits(tp: Any, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(args[0], v) for v in value)
        return len(value) == len(args) and all(
            _fits(a, v) for a, v in zip(args, value, strict=True))
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return True  # a type this check does not know: left to the config


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    words = {type(None): "None", bool: "True or False", int: "an integer", float: "a number",
             str: "a string"}
    if tp in words:
        return words[tp]
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and args:
        each = _describe(args[0]).removeprefix("an ").removeprefix("a ") + "s"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {each}"
        if len(set(args)) == 1:
            return f"a tuple of {len(args)} {each}"
    return getattr(tp, "__name__", str(tp))


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
