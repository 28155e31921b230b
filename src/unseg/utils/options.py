"""Config fields that carry their command-line help (timm's habit: the help beside the value).

``field: int = option(3, "k-means++ restarts")`` is a dataclass field with default 3 whose
``metadata["help"]`` is the option's help text (:func:`unseg.registry.config_options` reads it);
``flags`` adds short spellings (``("--size",)``); ``at_least``, ``above``, ``at_most`` and
``below`` the bounds a value must keep, which :func:`check_bounds` enforces (the method configs
call it when built, so the commands, the Segmenter and a run's ``config.json`` all refuse a
value out of range, naming the field).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

from unseg.errors import UnsegError


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    factory: Callable[[], Any] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with ``default`` (or ``factory``), its ``help``, extra ``flags`` and
    the bounds a value must keep (:func:`out_of_bounds`; None, where allowed, always is)."""
    metadata: dict[str, Any] = {"help": help}
    if flags:
        metadata["flags"] = tuple(flags)
    bounds = {name: value for name, value in (("at_least", at_least), ("above", above),
                                              ("at_most", at_most), ("below", below))
              if value is not None}
    if bounds:
        metadata["bounds"] = bounds
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TESTS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "at_least": (lambda v, b: v >= b, "at least"),
    "above": (lambda v, b: v > b, "above"),
    "at_most": (lambda v, b: v <= b, "at most"),
    "below": (lambda v, b: v < b, "below"),
}


def out_of_bounds(value: Any, bounds: dict[str, float]) -> str | None:
    """What ``value`` must be when it breaks one of ``bounds`` (from :func:`option`), e.g.
    ``"must be at least 1"``; None when it keeps them all or is not a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if all(test(value, bounds[name]) for name, (test, _) in _TESTS.items() if name in bounds):
        return None
    return f"must be {bounds_text(bounds)}"


def bounds_text(bounds: dict[str, float]) -> str:
    """``bounds`` (from :func:`option`) in words, e.g. ``"above 0 and below 0.5"``; ``""``
    without any."""
    return " and ".join(f"{word} {bounds[name]:g}" for name, (_, word) in _TESTS.items()
                        if name in bounds)


def check_bounds(config: Any, prefix: str = "") -> Any:
    """``config`` when every field (nested configs too) keeps the bounds its :func:`option`
    declares; else an :class:`UnsegError` naming the first field that does not (``prefix``
    before its name: a file, or ``outer.``)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{prefix}{f.name}.")
            continue
        problem = out_of_bounds(value, f.metadata.get("bounds", {}))
        if problem:
            raise UnsegError(f"{prefix}{f.name} {problem}, got {value!r}")
    return config
