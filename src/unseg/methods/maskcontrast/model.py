"""MaskContrast's model: the ASPP-style head and its momentum update, the two losses (weighted
contrastive cross-entropy, class-balanced BCE) and the FIFO queue of key prototypes, gathered
across torchrun processes."""

from __future__ import annotations

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from unseg.errors import UnsegError
from unseg.methods.maskcontrast.config import MaskContrastConfig
from unseg.utils import dist


def _conv_bn(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MaskContrastHead(nn.Module):
    """ASPP-style decoder on dense features: ``[B, C, h, w]`` → (raw embedding ``[B, D, h, w]``,
    saliency logit ``[B, 1, h, w]``); with ``stage`` (a backbone's last stage, output
    ``in_channels``) the input goes through it first."""

    def __init__(
        self, in_channels: int, config: MaskContrastConfig, stage: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.stage = stage
        w = config.width
        self.branches = nn.ModuleList(
            [_conv_bn(in_channels, w, 1)]
            + [_conv_bn(in_channels, w, 3, r) for r in config.aspp_rates]
        )
        # no BN on the pooled branch: one value per channel and image
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, w, 1), nn.ReLU(inplace=True)
        )
        self.project = _conv_bn(w * (len(config.aspp_rates) + 2), w, 1)
        self.decode = _conv_bn(w, w, 3)
        self.embed = nn.Conv2d(w, config.embed_dim, 1)
        self.saliency = nn.Conv2d(w, 1, 1, bias=False)

    def train(self, mode: bool = True) -> MaskContrastHead:
        """As ``nn.Module.train``, but the stage's BatchNorm keeps the backbone's statistics."""
        super().train(mode)
        if self.stage is not None:
            self.stage.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding ``[B, D, h, w]``, saliency logit ``[B, 1, h, w]``) of ``x [B, C, h, w]``."""
        if self.stage is not None:
            x = self.stage(x)
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        y = self.decode(self.project(torch.cat(outs, dim=1)))
        return self.embed(y), self.saliency(y)


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """``θ_k ← m·θ_k + (1 − m)·θ_q`` for every parameter (buffers untouched, as MoCo)."""
    for pk, pq in zip(key.parameters(), query.parameters(), strict=True):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)


def image_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights ``1/ln(1.02 + p_c)`` ``[num_classes]``, p_c = share of ``labels [P]``
    equal to c (the reference's E-Net weighting)."""
    p = torch.bincount(labels, minlength=num_classes).double() / max(labels.numel(), 1)
    return 1.0 / torch.log(1.02 + p)


def contrastive_loss(
    query: torch.Tensor,
    mask: torch.Tensor,
    prototypes: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Weighted cross-entropy of every salient query pixel against the prototypes and queue.

    ``query [B, D, H, W]`` (raw embeddings, normalised here), ``mask [B, H, W]`` (bool),
    ``prototypes [B, D]`` and ``queue [K, D]`` (unit rows). Logits ``[q·Pᵀ, q·queueᵀ] / T``,
    target = the pixel's image, class weights :func:`image_weights`; 0 without salient pixels.
    """
    b = query.shape[0]
    q = F.normalize(query.permute(0, 2, 3, 1)[mask], dim=1)  # [P, D], salient pixels only
    if q.shape[0] == 0:
        return query.sum() * 0.0
    labels = torch.arange(b, device=query.device)[:, None, None].expand_as(mask)[mask]
    logits = torch.cat([q @ prototypes.T, q @ queue.T], dim=1) / temperature
    weight = image_weights(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(logits, labels, weight=weight)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE (HED-style) of ``logits`` against ``target`` (same shape, 0/1).

    ``(w·Σ_pos bce + (1 − w)·Σ_neg bce) / N`` with ``w`` = the share of negatives.
    """
    t = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    w = (1.0 - t).sum() / t.numel()
    return (w * (t * bce).sum() + (1.0 - w) * ((1.0 - t) * bce).sum()) / t.numel()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``x [n_r, D]`` concatenated in rank order (``x`` in one process)."""
    if not dist.is_distributed():
        return x
    world = dist.world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    top = int(max(int(s) for s in sizes))
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


class PrototypeQueue:
    """FIFO memory of past key prototypes ``items [K, D]`` (unit rows), oldest replaced first."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        if size < 1:
            raise UnsegError(f"queue size must be at least 1, got {size}")
        self.items = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.ptr = 0

    def to(self, device: torch.device | str) -> PrototypeQueue:
        """Move the queue to ``device``; returns ``self``."""
        self.items = self.items.to(device)
        return self

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append every rank's ``keys [n, D]`` (all-gathered, rank order) in place of the oldest."""
        keys = gather_rows(keys.detach())
        size = self.items.shape[0]
        if keys.shape[0] >= size:
            self.items = keys[-size:].clone()
            self.ptr = 0
            return
        idx = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.items[idx] = keys
        self.ptr = (self.ptr + keys.shape[0]) % size
