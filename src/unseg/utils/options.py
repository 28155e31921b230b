"""Config fields that carry their command-line help (timm's habit: the help beside the value).

``field: int = option(3, "k-means++ restarts")`` is a dataclass field with default 3 whose
``metadata["help"]`` is the option's help text (:func:`unseg.registry.config_options` reads it);
``flags`` adds short spellings (``("--size",)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: tuple[str, ...] = (),
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with ``default`` (or ``factory``), its ``help`` and extra ``flags``."""
    metadata: dict[str, Any] = {"help": help}
    if flags:
        metadata["flags"] = tuple(flags)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
