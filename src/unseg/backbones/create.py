"""Building ready-to-use backbones: weights loaded, frozen, eval mode, on the right device."""

from __future__ import annotations

from pathlib import Path

import torch

from unseg.backbones.base import SIZE_POLICIES, Backbone, SizePolicy, build_backbone, get_spec
from unseg.backbones.weights import (
    load_strict,
    read_state_dict,
    resolve_weights,
    unseg_home,
    weights_status,
)
from unseg.errors import UnsegError
from unseg.utils.device import resolve_device

PREFERRED = "dino_vits8"
FALLBACK = "efficientnet_lite0"


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    size_policy: SizePolicy = "error",
    pretrained: bool = True,
) -> Backbone:
    """Backbone ``name`` with pretrained weights (see ``unseg.backbones.weights``), frozen.

    ``weights`` is an explicit file (``.safetensors`` or torch); it is loaded even when
    ``pretrained=False``. With ``pretrained=False`` and no file the module keeps its random init
    and ``weights_sha256`` is None. ``size_policy``: "error", "pad" or "resize" (see base.py).
    """
    if size_policy not in SIZE_POLICIES:
        raise UnsegError(f"unknown size policy {size_policy!r}; use one of {SIZE_POLICIES}")
    spec = get_spec(name)
    digest = None
    state = None
    if pretrained or weights is not None:
        path, digest = resolve_weights(spec, weights)
        state = read_state_dict(path)
    model = build_backbone(name)
    if state is not None:
        load_strict(model, state, str(path))
    model.requires_grad_(False)
    model.eval()
    model.size_policy = size_policy
    model.weights_sha256 = digest
    return model.to(resolve_device(device))


def default_backbone_name() -> str:
    """Return "dino_vits8" when its weights are in the cache, else "efficientnet_lite0"."""
    return PREFERRED if weights_status(get_spec(PREFERRED)).status == "cached" else FALLBACK


def default_backbone_reason() -> str:
    """One line saying which backbone is the default and why."""
    name = default_backbone_name()
    if name == PREFERRED:
        return f"default backbone: {PREFERRED} (weights cached in {unseg_home() / 'weights'})"
    return (
        f"default backbone: {FALLBACK}: DINO weights not found in {unseg_home() / 'weights'} "
        f"(put {get_spec(PREFERRED).weights.filename} there to use {PREFERRED}; "
        "`unseg backbones dino*` lists the URLs)"
    )
