"""Which backbone a command uses: the one asked for, or the default and the reason for it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from unseg.backbones import (
    create_backbone,
    create_fitted_backbone,
    default_backbone_name,
    default_backbone_reason,
)
from unseg.backbones.base import Backbone, get_spec
from unseg.errors import UnsegError

logger = logging.getLogger(__name__)

# the largest --size: a working image of up to 2048 x 8192 pixels (4 x on the long side); larger
# ones upsample ordinary photos and their feature maps and pseudo-labels outgrow memory
MAX_SIZE = 2048


def check_resolution(size: int, max_side: int | None, backbone: str, tap: str | None) -> None:
    """Refuse (``UnsegError``) a ``--size`` outside ``[2 x stride, MAX_SIZE]`` of ``backbone``'s
    ``tap`` and a ``--max-side`` that is negative or below two strides: a working image one
    feature row (or column) wide leaves PriMaPs and the CRF nothing to work on."""
    spec = get_spec(backbone)
    stride = spec.tap_info(tap or spec.default_tap).stride
    floor = 2 * stride
    if not floor <= size <= MAX_SIZE:
        raise UnsegError(
            f"--size {size}: must be {floor} to {MAX_SIZE} with {backbone} (stride {stride}): "
            f"the short side must span at least two feature rows ({floor} px), and above "
            f"{MAX_SIZE} px images are upsampled and their features outgrow memory"
        )
    if max_side is not None and max_side != 0 and not floor <= max_side:
        raise UnsegError(
            f"--max-side {max_side}: must be 0 (no limit) or at least {floor} with {backbone} "
            f"(two feature rows at stride {stride})"
        )


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


def _tap(tap: str | None) -> dict[str, Any]:
    return {} if tap is None else {"tap": tap}


def open_backbone(
    name: str | None, weights: str | Path | None, tap: str | None, device: torch.device
) -> Backbone:
    """The frozen backbone ``name`` (default: :func:`resolve_backbone_name`) at feature ``tap``
    (``None``: the backbone's default) on ``device``."""
    return create_backbone(resolve_backbone_name(name), weights=weights, device=device,
                           **_tap(tap))


def open_fitted_backbone(
    meta: dict[str, Any], weights: str | Path | None, device: torch.device, source: str
) -> Backbone:
    """The backbone a run was fitted with (name, tap, weights checked against its sha256);
    ``weights``: a file to use instead of the run's own."""
    return create_fitted_backbone(
        meta["backbone"],
        meta["weights_sha256"],
        weights=weights or meta.get("weights_path"),
        device=device,
        source=source,
        **_tap(meta.get("tap")),
    )
