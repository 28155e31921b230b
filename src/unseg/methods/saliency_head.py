"""The SEMPART-style saliency head: frozen patch features + the image → full-resolution logits.

1x1 conv to ``dim`` channels, a small transformer over the patches, a coarse logit map at patch
resolution, then ``ceil(log2(stride))`` upsampling stages. Each stage doubles the resolution
(the last one lands exactly on the image size), concatenates the image downscaled to that size
with the upsampled hidden map and logit, and predicts a residual correction of the logit.

The convolutions run in the channels-last memory format (weights and activations): the stages'
few-channel full-resolution convolutions are the head's main cost on a CPU, and oneDNN runs
them faster that way (4 to 15 % per training step here, docs/results-boosting.md); the
numbers are the same up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Stage(nn.Module):
    """One upsampling stage: (hidden, logit, image) at the new size → (hidden', logit')."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin + 1 + 3, cout, 3, padding=1), nn.ReLU(inplace=True))
        self.to_logit = nn.Conv2d(cout, 1, 1)
        nn.init.zeros_(self.to_logit.weight)
        nn.init.zeros_(self.to_logit.bias)

    def forward(
        self, hidden: torch.Tensor, logit: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = image.shape[-2:]
        hidden = F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)
        logit = F.interpolate(logit, size=size, mode="bilinear", align_corners=False)
        hidden = self.body(torch.cat([hidden, logit, image], dim=1))
        return hidden, logit + self.to_logit(hidden)


class SaliencyHeadNet(nn.Module):
    """``(features [B, C, h, w], images [B, 3, H, W] in [0, 1])`` → coarse ``[B, 1, h, w]`` and
    fine ``[B, 1, H, W]`` foreground logits."""

    def __init__(
        self,
        in_dim: int,
        stride: int,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        stage_channels: tuple[int, ...] = (32, 16, 8, 8, 8),
    ) -> None:
        super().__init__()
        self.stride = stride
        n_stages = max(1, math.ceil(math.log2(stride)))
        chans = [*stage_channels[:n_stages]]
        chans += [stage_channels[-1]] * (n_stages - len(chans))
        self.proj = nn.Conv2d(in_dim, dim, 1)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.coarse = nn.Conv2d(dim, 1, 1)
        self.to_hidden = nn.Conv2d(dim, chans[0], 1)
        self.stages = nn.ModuleList(
            _Stage(cin, cout) for cin, cout in zip([chans[0], *chans[:-1]], chans, strict=True)
        )
        # +1 or -1: which side of the learned cut is called foreground (set after training)
        self.register_buffer("polarity", torch.ones(()))
        self.to(memory_format=torch.channels_last)

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → the normed patch tokens ``[B, dim, h, w]`` (a channels-last view)."""
        b, _, h, w = features.shape
        x = self.proj(features.contiguous(memory_format=torch.channels_last))
        tokens = self.encoder(x.flatten(2).transpose(1, 2))
        return self.norm(tokens).reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def coarse_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The coarse logits ``[B, 1, h, w]`` alone (as :meth:`forward` gives them), without the
        image-resolution stages: what the short restarts train (:mod:`unseg.methods.restarts`)."""
        return self.coarse(self._encode(features)) * self.polarity

    def forward(
        self, features: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse and fine logits (see the class docstring)."""
        h, w = features.shape[-2:]
        x = self._encode(features)
        coarse = self.coarse(x)
        last = torch.channels_last
        hidden, logit = self.to_hidden(x), coarse
        images = images.contiguous(memory_format=last)
        big_h, big_w = images.shape[-2:]
        n = len(self.stages)
        for k, stage in enumerate(self.stages):
            f = 2 ** (n - 1 - k)
            size = (big_h, big_w) if f == 1 else (max(h, big_h // f), max(w, big_w // f))
            image = F.interpolate(images, size=size, mode="area") if f > 1 else images
            hidden, logit = stage(hidden, logit, image)
        return coarse * self.polarity, logit * self.polarity
