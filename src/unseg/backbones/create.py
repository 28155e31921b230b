"""Building ready-to-use backbones: weights loaded, frozen, eval mode, on the right device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from unseg.backbones.base import SIZE_POLICIES, Backbone, SizePolicy, build_backbone, get_spec
from unseg.backbones.weights import (
    cache_path,
    load_strict,
    read_state_dict,
    record_sha256,
    resolve_weights,
    unseg_home,
    weights_status,
)
from unseg.errors import UnsegError
from unseg.utils.device import resolve_device

PREFERRED = "dino_vits8"
FALLBACK = "efficientnet_lite2"  # measured: docs/feature-taps.md


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    size_policy: SizePolicy = "error",
    pretrained: bool = True,
    tap: str | None = None,
) -> Backbone:
    """Backbone ``name`` with pretrained weights (see ``unseg.backbones.weights``), frozen.

    ``tap`` picks the dense map (``spec.taps``; None: ``spec.default_tap``) and sets
    ``backbone.tap``, hence ``backbone.dim`` and ``backbone.stride``.

    ``weights`` is an explicit file (``.safetensors`` or torch); it is loaded even when
    ``pretrained=False``. With ``pretrained=False`` and no file the module keeps its random init
    and ``weights_sha256`` is None. ``size_policy``: "error", "pad" or "resize" (see base.py).
    """
    if size_policy not in SIZE_POLICIES:
        raise UnsegError(f"unknown size policy {size_policy!r}; use one of {SIZE_POLICIES}")
    spec = get_spec(name)
    if tap is not None:
        spec.tap_info(tap)
    digest = None
    state = None
    if pretrained or weights is not None:
        path, digest = resolve_weights(spec, weights)
        state = read_state_dict(path)
    model = build_backbone(name, tap)
    if state is not None:
        load_strict(model, state, str(path))
        if digest is not None and weights is None and path == cache_path(spec):
            record_sha256(path, digest)  # only a file that loaded is recorded
    model.requires_grad_(False)
    model.eval()
    model.size_policy = size_policy
    model.weights_sha256 = digest
    return model.to(resolve_device(device))


def default_backbone_name() -> str:
    """Return ``PREFERRED`` when its weights are in the cache, else ``FALLBACK``."""
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


def backbone_weights_sha256(backbone: Backbone) -> str:
    """``backbone.weights_sha256`` when set, else a sha256 of its parameters and buffers."""
    sha = getattr(backbone, "weights_sha256", None)
    if sha:
        return str(sha)
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def create_fitted_backbone(
    name: str,
    fitted_sha256: str | None,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    source: str = "",
    tap: str | None = None,
) -> Backbone:
    """The backbone a model was fitted on: ``create_backbone`` plus a check of its weights' hash.

    ``fitted_sha256`` is the hash recorded at fit time (None: not checked); ``source`` names the
    model (e.g. its run folder) in the error raised when the weights found now differ; ``tap``
    as in :func:`create_backbone` (pass the tap recorded at fit time).
    """
    model = create_backbone(name, weights=weights, device=device, tap=tap)
    sha = backbone_weights_sha256(model)
    if fitted_sha256 and sha != fitted_sha256:
        raise UnsegError(
            f"{source}: fitted with {name} weights sha256 {fitted_sha256[:12]}…, but the weights "
            f"found now have {sha[:12]}…; pass the same file with --weights, or refit"
        )
    return model
