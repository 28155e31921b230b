"""Supervised linear probe on frozen features: the upper bound reported next to unsupervised runs.

THIS USES GROUND-TRUTH LABELS. A 1x1 convolution (with bias) maps features to class logits,
upsampled bilinearly to the label resolution and trained with cross-entropy (ignore label
skipped) by Adam, as the PriMaPs reference trains its linear probe alongside PriMaPs-EM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.utils.progress import progress


@dataclass(frozen=True)
class LinearProbeConfig:
    """Linear-probe settings (the reference trains it with Adam, lr 5e-3, batch 32)."""

    num_classes: int = 21
    epochs: int = 50
    batch_size: int = 32
    lr: float = 5e-3
    label_factor: int = 2  # labels are resized to features x label_factor for training
    ignore_index: int = 255
    seed: int = 0


class LinearProbe:
    """Supervised 1x1-conv classifier: ``fit(features, labels)``, ``predict(features, size)``."""

    def __init__(self, config: LinearProbeConfig | None = None) -> None:
        self.config = config or LinearProbeConfig()
        self.weight_: torch.Tensor | None = None
        self.bias_: torch.Tensor | None = None

    def fit(self, features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> LinearProbe:
        """Train on ``features[i] [C, h, w]`` and ``labels[i] [H, W]`` (int, ignore skipped)."""
        cfg = self.config
        if len(features) != len(labels) or not features:
            raise UnsegError(f"{len(features)} feature maps but {len(labels)} label maps")
        gen = torch.Generator().manual_seed(cfg.seed)
        dim = features[0].shape[0]
        conv = torch.nn.Conv2d(dim, cfg.num_classes, 1)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(dim)
            conv.weight.uniform_(-bound, bound, generator=gen)
            conv.bias.uniform_(-bound, bound, generator=gen)
        optim = torch.optim.Adam(conv.parameters(), lr=cfg.lr)
        n = len(features)
        batch = min(cfg.batch_size, n)
        steps = cfg.epochs * math.ceil(n / batch)
        order: list[int] = []
        for _ in progress(range(steps), total=steps, desc="linear probe"):
            if len(order) < batch:
                order += torch.randperm(n, generator=gen).tolist()
            idx, order = order[:batch], order[batch:]
            logits, targets = [], []
            for i in idx:
                f = features[i].float()
                size = (f.shape[1] * cfg.label_factor, f.shape[2] * cfg.label_factor)
                lab = F.interpolate(labels[i][None, None].float(), size=size, mode="nearest")
                lg = F.interpolate(conv(f[None]), size=size, mode="bilinear", align_corners=False)
                logits.append(lg[0].reshape(cfg.num_classes, -1).T)
                targets.append(lab.reshape(-1).long())
            y = torch.cat(targets)
            y[(y < 0) | (y >= cfg.num_classes)] = cfg.ignore_index
            loss = F.cross_entropy(torch.cat(logits), y, ignore_index=cfg.ignore_index)
            optim.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
                optim.step()
        self.weight_ = conv.weight.detach()[:, :, 0, 0].clone()
        self.bias_ = conv.bias.detach().clone()
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[K, h, w]`` of ``features [C, h, w]``."""
        if self.weight_ is None or self.bias_ is None:
            raise UnsegError("LinearProbe.predict called before fit")
        lg = torch.einsum("kc,chw->khw", self.weight_, features.float())
        return lg + self.bias_[:, None, None]

    def predict(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class ids ``[H, W]`` (int64): logits upsampled bilinearly to ``size``, argmax."""
        lg = self.logits(features)[None]
        return F.interpolate(lg, size=size, mode="bilinear", align_corners=False)[0].argmax(0)
