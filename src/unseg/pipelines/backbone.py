"""Which backbone a command uses: the one asked for, or the default and the reason for it."""

from __future__ import annotations

import logging

from unseg.backbones import default_backbone_name, default_backbone_reason

logger = logging.getLogger(__name__)


def choose_backbone(name: str | None) -> tuple[str, str]:
    """``(name, why)``: ``name`` when given, else the default backbone and why it is the default."""
    if name:
        return name, f"backbone {name} (from --backbone)"
    return default_backbone_name(), default_backbone_reason()


def resolve_backbone_name(name: str | None) -> str:
    """:func:`choose_backbone`'s name; the reason for a default is logged (the CLI prints it)."""
    chosen, why = choose_backbone(name)
    if not name:
        logger.info(why)
    return chosen
