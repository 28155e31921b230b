"""Command-line options generated from a registered method's config dataclass.

Every option defaults to "not given" (``argparse.SUPPRESS``), so a method's own default applies
unless the user sets it; :func:`given_options` returns what was set, by config field name
(``outer.inner`` for nested fields), ready for the pipelines' ``options``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from unseg.errors import UnsegError
from unseg.registry import ConfigOption, MethodSpec, config_options


def _kwargs(option: ConfigOption, help_text: str) -> dict[str, Any]:
    base: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "help": help_text}
    if option.kind == "bool":
        return {**base, "action": argparse.BooleanOptionalAction}
    metavar = option.path[-1].upper()
    if option.kind in ("int", "optional-int"):
        return {**base, "type": int, "metavar": metavar}
    if option.kind in ("float", "optional-float"):
        return {**base, "type": float, "metavar": metavar}
    if option.kind == "pair":
        return {**base, "type": float, "nargs": 2, "metavar": ("LO", "HI")}
    if option.kind == "ints":
        return {**base, "type": int, "nargs": "+", "metavar": metavar}
    if option.kind == "floats":
        return {**base, "type": float, "nargs": len(option.default), "metavar": metavar}
    if option.choices:
        return {**base, "choices": option.choices}
    return {**base, "metavar": metavar}


def add_method_options(
    parser: argparse.ArgumentParser, specs: Sequence[MethodSpec], title: str | None = None
) -> None:
    """One option per config field of each of ``specs``; a field several methods share is one
    option (its help names each method's default)."""
    group = parser.add_argument_group(title) if title else parser
    merged: dict[tuple[str, ...], tuple[ConfigOption, list[str]]] = {}
    for spec in specs:
        for option in config_options(spec):
            where = f"{spec.name}: {option.help}" if len(specs) > 1 else option.help
            if option.flags in merged:
                merged[option.flags][1].append(where)
            else:
                merged[option.flags] = (option, [where])
    for option, helps in merged.values():
        group.add_argument(*option.flags, **_kwargs(option, "; ".join(helps)))


def given_options(args: argparse.Namespace, spec: MethodSpec) -> dict[str, Any]:
    """The options of ``spec`` set on the command line, by config field name; an option of
    another method (in a command that serves several) is an error naming it."""
    own = {o.dest: o for o in config_options(spec)}
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg__"):
            continue
        if dest not in own:
            flag = "--" + dest.removeprefix("cfg__").replace("__", "-").replace("_", "-")
            raise UnsegError(f"{flag} is not an option of {spec.name}")
        option = own[dest]
        multi = option.kind in ("pair", "ints", "floats")
        out[".".join(option.path)] = tuple(value) if multi else value
    return out
