"""MaskContrast: pixel embeddings from contrasting salient-object mask proposals (methods.md §4).

A head on the frozen backbone's dense features — ASPP-style parallel dilated 3x3 convs, a 1x1
branch and image pooling, a 1x1 projection, a 3x3 conv (``width``, BN, ReLU), then a 1x1 conv to
a ``embed_dim``-d embedding (with bias) and a 1x1 conv (no bias) to one saliency logit, both
upsampled bilinearly — and its momentum copy (``m = 0.999``, parameters only, updated before the
keys are computed), as the reference.

One step on a batch of images, each seen in two views (query, key):

- key prototype of image i = L2-normalise(Σ over the key view's salient pixels of the
  L2-normalised key embeddings);
- every salient query pixel (L2-normalised) gets logits ``[q·P_batchᵀ, q·queueᵀ] / T`` against
  the batch's prototypes and a FIFO queue of past prototypes (all-gathered across torchrun
  processes), target = its image; cross-entropy weighted per image by ``1/ln(1.02 + p_i)`` (p_i =
  image i's share of the salient query pixels), ``reduction="mean"``;
- plus the class-balanced BCE of the query's saliency logit against its mask (weight 1);
- SGD (momentum 0.9, weight decay 1e-4), lr × ``(1 − epoch/epochs)^0.9`` per epoch; lr 0.01 at
  batch 16 by default (the paper's 0.004 at batch 128: see :class:`MaskContrastConfig`).

Views: random resized crop (scale 0.2–1, aspect 3/4–4/3), horizontal flip; both views of an image
are re-drawn (``max_redraws`` times, then the whole image is used) until the salient area of each
lies strictly between 1 % and 99 %.

**CPU deviation.** The backbone is frozen, so a view's features are not recomputed: they are
cropped and resampled from the full image's feature map (RoI-align: ``grid_sample``, 2x2 samples
per output cell), and the mask is cropped the same way. This costs one backbone pass per image
for the whole run instead of two per image per epoch. What it loses: the colour jitter
(0.4/0.4/0.4/0.1, p = 0.8) and greyscale (p = 0.2) cannot act on cached features, so the head no
longer learns invariance to them. It is recovered where it can act: when
``FitInputs.student_features`` are given (features of a photometrically jittered copy of each
image, e.g. by :func:`photometric_view`), the query view is cut from them and the key view from
the plain features. A crop is also resampled from features that saw the whole image (the
backbone's context and receptive field differ from a real crop's), and the crop's features come
at the full image's stride rather than at ``view_size / stride`` of a resized crop.

**Last stage trainable** (``train_last_stage``; the reference fine-tunes its backbone): the
features are then the maps *before* the backbone's last stage
(:meth:`unseg.backbones.base.Backbone.last_stage`), cached as above, and a copy of that stage,
initialised with the backbone's weights, runs on every view in front of the decoder, trained
with it (same SGD settings), carried by the momentum copy and saved with the head; its BatchNorm
statistics stay the backbone's (eval mode), only its weights move. ``stage_of``
(``"backbone:tap"``, set by the pipeline) lets a saved run rebuild the stage. CNN taps only.

Resume: every random draw is seeded from ``(seed, epoch, image)`` (views) or ``(seed, epoch)``
(batch order), so the epoch number is the run's whole RNG state; the checkpoint written after
every epoch (model, momentum model, queue, SGD buffers, epoch, losses) resumes to the same
weights as an uninterrupted run.

Evaluation (the paper's per-image k-means protocol): one vector per image = Σ of the raw
embeddings weighted by the model's saliency logit where it exceeds 0.5, L2-normalised; PCA(32,
whitened); Euclidean k-means (20 clusters); salient pixels take cluster + 1, the rest 0.
:func:`backbone_prototypes` gives the same protocol on plain backbone features (the baseline).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from unseg.backbones import LastStage, build_backbone
from unseg.data.transforms import color_jitter, sample_crop_box
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.registry import register
from unseg.utils import dist
from unseg.utils.device import cpu_threads
from unseg.utils.io import atomic_write
from unseg.utils.options import option

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
Box = tuple[float, float, float, float]  # top, left, height, width in image pixels


@dataclass(frozen=True)
class MaskContrastConfig:
    """MaskContrast settings; defaults are the paper's (unsupervised-saliency) values except
    ``aspp_rates`` (the reference's 12/24/36 sit on a 28-cell grid; frozen-backbone grids of
    7-20 cells take 2/4/6), the CPU view design (module docstring), the CPU budget:
    ``loss_size`` 56 (paper: the losses at the 224-pixel view size), and the batch: 16 at lr
    0.01 (paper: 128 at 0.004, on 10,582 images; on a few hundred images that is 4 steps an
    epoch, and 16/0.01 scored 1.7 to 5.0 points higher on both VOC dev sets, 3 training seeds,
    ``docs/results-maskcontrast.md``). With them the paper's 40 epochs on the 422 VOC2007 images
    of ``../shared/data`` take minutes on a shared 2-core CPU, and beat 15 epochs in every
    measured pair on both VOC sets; ``loss_size=None`` gives the paper's losses."""

    embed_dim: int = option(32, "pixel embedding dimension")
    width: int = option(256, "decoder width")
    aspp_rates: tuple[int, ...] = option((2, 4, 6), "dilation rates of the ASPP branches")
    momentum: float = option(0.999, "momentum of the key model")
    temperature: float = option(0.5, "contrastive temperature T")
    queue_size: int = option(
        256,
        "prototype queue length (paper: 256 unsupervised, 128 supervised saliency)",
        flags=("--queue",),
    )
    lr: float = option(0.01, "SGD learning rate (paper: 0.004 at batch 128)")
    sgd_momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "SGD weight decay")
    poly_power: float = option(0.9, "exponent of the poly learning-rate decay")
    epochs: int = option(
        40,
        "training epochs (the paper's 40)",
    )
    batch_size: int = option(
        16,
        "images per step (paper: 128 unsupervised, 64 supervised saliency; 16 scored higher on "
        "a few hundred images)",
    )
    view_size: int = option(224, "view side in image pixels")
    loss_size: int | None = option(
        56,
        "pixels per side where the losses are taken (0: the view size)",
    )
    crop_scale: tuple[float, float] = option((0.2, 1.0), "random resized crop area range (LO HI)")
    crop_ratio: tuple[float, float] = option(
        (3 / 4, 4 / 3),
        "random resized crop aspect range (LO HI)",
    )
    flip_p: float = option(0.5, "horizontal flip probability")
    min_view_area: float = option(0.01, "smallest salient share of a view")
    max_view_area: float = option(0.99, "largest salient share of a view")
    max_redraws: int = option(10, "view redraws before the whole image is used")
    saliency_weight: float = option(1.0, "weight of the balanced BCE saliency loss")
    jitter: tuple[float, float, float, float] = option(
        (0.4, 0.4, 0.4, 0.1),
        "colour jitter strengths (not an option: photometric views come from the student "
        "features)",
    )
    jitter_p: float = option(0.8, "colour jitter probability (photometric_view)")
    grey_p: float = option(0.2, "greyscale probability (photometric_view)")
    train_last_stage: bool = option(
        False,
        "fine-tune the backbone's last stage with the head (CNN taps but the first; features "
        "are cached before that stage)",
    )
    stage_of: str = ""  # "backbone:tap" of the trained stage (the pipeline fills it)
    seed: int = 0


# ------------------------------------------------------------------------------------- model
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


# ------------------------------------------------------------------------------------- losses
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


# ------------------------------------------------------------------------------------- views
def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _grid(
    box: Box, flip: bool, n: int, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """``grid_sample`` grid ``[1, n, n, 2]`` of the centres of an n×n split of ``box``."""
    top, left, ch, cw = box
    h, w = size
    steps = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    ys = 2.0 * (top + steps * ch) / h - 1.0
    xs = 2.0 * (left + steps * cw) / w - 1.0
    if flip:
        xs = xs.flip(0)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


def crop_features(
    features: torch.Tensor, box: Box, flip: bool, cells: int, image_size: tuple[int, int]
) -> torch.Tensor:
    """RoI-align ``features [C, h, w]`` (covering an image of ``image_size``) over ``box`` to
    ``[C, cells, cells]``: bilinear samples, 2x2 per output cell, averaged."""
    grid = _grid(box, flip, 2 * cells, image_size, features.device)
    x = F.grid_sample(
        features[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return F.avg_pool2d(x, 2)[0]


def crop_mask(mask: torch.Tensor, box: Box, flip: bool, size: int) -> torch.Tensor:
    """Nearest-neighbour crop of ``mask [H, W]`` over ``box`` to ``[size, size]`` (bool)."""
    grid = _grid(box, flip, size, tuple(mask.shape), mask.device)
    x = F.grid_sample(
        mask[None, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    return x[0, 0] > 0.5


@dataclass
class ViewPair:
    """Two views of one image: features ``[C, g, g]`` and masks ``[S, S]`` (bool)."""

    query: torch.Tensor
    key: torch.Tensor
    query_mask: torch.Tensor
    key_mask: torch.Tensor
    fallback: bool


def view_cells(features: torch.Tensor, mask: torch.Tensor, config: MaskContrastConfig) -> int:
    """Feature cells per side of a view of ``view_size`` mask pixels, for ``features [C, h, w]``
    covering ``mask [H, W]`` (the view keeps the image's stride in mask pixels)."""
    stride = math.sqrt(mask.shape[0] * mask.shape[1] / (features.shape[1] * features.shape[2]))
    return max(1, round(config.view_size / stride))


def draw_views(
    features: torch.Tensor,
    mask: torch.Tensor,
    config: MaskContrastConfig,
    gen: torch.Generator,
    query_features: torch.Tensor | None = None,
) -> ViewPair:
    """Query and key views of one image (``features [C, h, w]``, ``mask [H, W]``) whose salient
    areas both lie in ``(min_view_area, max_view_area)``; the query is cut from
    ``query_features`` when given (a photometrically jittered copy)."""
    size = (int(mask.shape[0]), int(mask.shape[1]))
    cells = view_cells(features, mask, config)
    side = config.loss_size or config.view_size
    binary = mask > 0.5
    lo, hi = config.min_view_area, config.max_view_area
    chosen = None
    for _ in range(config.max_redraws):
        draws = []
        for _ in range(2):
            box = sample_crop_box(size, gen, config.crop_scale, config.crop_ratio)
            flip = _uniform(gen, 0.0, 1.0) < config.flip_p
            draws.append((box, flip, crop_mask(binary, box, flip, side)))
        if all(lo < float(m.float().mean()) < hi for _, _, m in draws):
            chosen = draws
            break
    fallback = chosen is None
    if chosen is None:
        whole = (0.0, 0.0, float(size[0]), float(size[1]))
        chosen = [(whole, False, crop_mask(binary, whole, False, side))] * 2
    (qbox, qflip, qmask), (kbox, kflip, kmask) = chosen
    source = features if query_features is None else query_features
    return ViewPair(
        query=crop_features(source, qbox, qflip, cells, size),
        key=crop_features(features, kbox, kflip, cells, size),
        query_mask=qmask,
        key_mask=kmask,
        fallback=fallback,
    )


def photometric_view(
    image: torch.Tensor, gen: torch.Generator, config: MaskContrastConfig | None = None
) -> torch.Tensor:
    """The paper's photometric augmentation of ``image [3, H, W]`` (float in ``[0, 1]``): colour
    jitter with probability ``jitter_p``, then greyscale with probability ``grey_p``; for the
    ``student_features`` that let the query view keep photometric invariance."""
    cfg = config or MaskContrastConfig()
    if _uniform(gen, 0.0, 1.0) < cfg.jitter_p:
        image, _ = color_jitter(image, None, gen, *cfg.jitter)
    if _uniform(gen, 0.0, 1.0) < cfg.grey_p:
        grey = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
        image = grey[None].expand(3, -1, -1).clone()
    return image


# ------------------------------------------------------------------------------------- evaluation
def pca_fit(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitening PCA of the rows of ``x [N, D]``: ``(mean [D], projection [D, n_components])``
    (float64) such that ``(x − mean) @ projection`` has unit variance per component (``N − 1``
    denominator), signs as scikit-learn's (largest |loading| positive); components of zero
    variance (rank-deficient ``x``) project to 0."""
    if not 1 <= n_components <= min(x.shape):
        raise UnsegError(f"PCA needs 1 <= n_components <= min{tuple(x.shape)}, got {n_components}")
    xd = x.double()
    mean = xd.mean(dim=0)
    _, s, vh = torch.linalg.svd(xd - mean, full_matrices=False)
    vh = vh[:n_components]
    pivot = vh.abs().argmax(dim=1)
    vh = vh * torch.sign(vh[torch.arange(n_components), pivot])[:, None]
    var = s[:n_components] ** 2 / max(x.shape[0] - 1, 1)
    # directions of (numerically) zero variance are set to 0, not blown up to unit variance
    scale = torch.where(var > 1e-12 * var[0], var.clamp_min(1e-300).rsqrt(), 0.0)
    return mean, vh.T * scale


def pca_whiten(x: torch.Tensor, n_components: int) -> torch.Tensor:
    """PCA of the rows of ``x [N, D]`` projected to ``[N, n_components]`` and whitened
    (:func:`pca_fit` applied to ``x`` itself)."""
    mean, proj = pca_fit(x, n_components)
    return ((x.double() - mean) @ proj).to(x.dtype)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (squared Euclidean), ``[k, D]``."""
    centers = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    d2 = ((x - centers[0]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            pick = int(torch.randint(x.shape[0], (1,), generator=gen))
        else:
            pick = int(torch.multinomial((d2 / total).cpu(), 1, generator=gen))
        centers.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(dim=1))
    return torch.stack(centers)


def kmeans(
    x: torch.Tensor, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 300
) -> torch.Tensor:
    """Euclidean k-means (k-means++, Lloyd, best of ``n_init``) of ``x [N, D]`` → ids ``[N]``."""
    if k > x.shape[0]:
        raise UnsegError(f"{k} clusters need at least {k} images, got {x.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    xd = x.double()
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(n_init):
        centers = _kmeanspp(xd, k, gen)
        assign = torch.full((x.shape[0],), -1, dtype=torch.long)
        for _ in range(max_iter):
            new = torch.cdist(xd, centers).argmin(dim=1)
            if torch.equal(new, assign):
                break
            assign = new
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(centers).index_add_(0, assign, xd)
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        inertia = float(((xd - centers[assign]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    assert best is not None
    return best[1]


def cluster_prototypes(
    prototypes: torch.Tensor, num_clusters: int = 20, pca_dim: int = 32, seed: int = 0
) -> torch.Tensor:
    """Cluster ids ``[N]`` of ``prototypes [N, D]``: PCA-whitened to ``pca_dim`` (at most
    ``N − 1`` components: ``N`` centred points span no more, so a small set never whitens a
    zero-variance direction), then k-means into ``num_clusters``."""
    n, d = prototypes.shape
    if n < 2:
        raise UnsegError(f"the k-means protocol needs at least 2 images, got {n}")
    x = pca_whiten(prototypes.float(), min(pca_dim, n - 1, d))
    return kmeans(x, num_clusters, seed=seed)


@dataclass(frozen=True)
class PrototypeClusters:
    """Clusters fitted on one set of image prototypes, to assign other images to: the whitening
    (``mean [D]``, ``projection [D, d]``) and the k-means centres ``[K, d]`` (float64)."""

    mean: torch.Tensor
    projection: torch.Tensor
    centres: torch.Tensor

    @classmethod
    def fit(
        cls, prototypes: torch.Tensor, num_clusters: int = 20, pca_dim: int = 32, seed: int = 0
    ) -> PrototypeClusters:
        """:func:`cluster_prototypes` on ``prototypes [N, D]``, kept as a model."""
        n, d = prototypes.shape
        if n < 2:
            raise UnsegError(f"the k-means protocol needs at least 2 images, got {n}")
        mean, proj = pca_fit(prototypes.float(), min(pca_dim, n - 1, d))
        x = (prototypes.double() - mean) @ proj
        ids = kmeans(x.float(), num_clusters, seed=seed)
        sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=num_clusters).clamp_min(1)
        return cls(mean, proj, sums / counts[:, None])

    def assign(self, prototypes: torch.Tensor) -> torch.Tensor:
        """Nearest centre ``[M]`` of each of ``prototypes [M, D]`` in the whitened space."""
        x = (prototypes.double() - self.mean) @ self.projection
        return torch.cdist(x, self.centres).argmin(dim=1)


def kmeans_protocol(
    prototypes: torch.Tensor,
    masks: Sequence[torch.Tensor],
    num_clusters: int = 20,
    pca_dim: int = 32,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The per-image k-means protocol: ``prototypes [N, D]`` (one per image) clustered by
    :func:`cluster_prototypes`; each image's salient pixels (``masks[i] [H, W]``, bool) take its
    cluster + 1, the rest 0. Returns label maps ``[H, W]`` (int64)."""
    if len(masks) != prototypes.shape[0]:
        raise UnsegError(f"{prototypes.shape[0]} prototypes but {len(masks)} masks")
    ids = cluster_prototypes(prototypes, num_clusters, pca_dim, seed)
    return [m.bool().long() * (int(c) + 1) for m, c in zip(masks, ids, strict=True)]


def weighted_prototype(embedding: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``Σ_p weight_p · embedding[:, p]`` ``[D]`` for ``embedding [D, H, W]`` and
    ``weight [H, W]``."""
    return F.normalize((embedding.flatten(1) @ weight.flatten().to(embedding.dtype)), dim=0)


def backbone_prototypes(
    features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Baseline image vectors ``[N, C]``: the mean of plain backbone ``features[i] [C, h, w]``
    over the salient pixels of ``masks[i] [H, W]`` (each cell weighted by its salient share,
    i.e. features upsampled by nearest neighbour), L2-normalised."""
    rows = []
    for f, m in zip(features, masks, strict=True):
        share = F.interpolate(m[None, None].float(), size=f.shape[-2:], mode="area")[0, 0]
        rows.append(weighted_prototype(f.float(), share))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------- estimator
@register(
    "maskcontrast",
    config=MaskContrastConfig,
    output="embedding",
    needs=("features", "student_features", "masks"),
    summary="MaskContrast: pixel embeddings contrasting salient-object mask proposals",
    aliases=("mask-contrast",),
    pipeline_fields=("seed", "stage_of"),
    rank=50,
)
class MaskContrast:
    """MaskContrast on frozen dense features (module docstring); estimator contract of
    :mod:`unseg.methods.base`. ``model_`` is the trained (query) head."""

    def __init__(
        self,
        config: MaskContrastConfig | None = None,
        device: str | torch.device | None = None,
        stage: LastStage | None = None,
    ) -> None:
        """``stage``: the backbone's pretrained last stage, needed to fit with
        ``train_last_stage`` (``backbone.last_stage()``)."""
        self.config = config or MaskContrastConfig()
        self.device = torch.device(device or "cpu")
        self.model_: MaskContrastHead | None = None
        self.history_: list[float] = []
        self.fallbacks_: int = 0
        self.in_channels_: int = 0
        self._stage = stage

    def _last_stage(self) -> LastStage | None:
        """The given stage, the config's stage rebuilt (weights to be loaded), or None."""
        if not self.config.train_last_stage:
            return None
        if self._stage is not None:
            return self._stage
        name, _, tap = self.config.stage_of.partition(":")
        if not name or not tap:
            raise UnsegError(
                "train_last_stage needs the backbone's last stage: pass stage= "
                "(backbone.last_stage()) or set stage_of to 'backbone:tap'"
            )
        return build_backbone(name, tap).last_stage()

    def _build(self, in_channels: int) -> MaskContrastHead:
        """The model for features of ``in_channels`` (the stage's input when there is one)."""
        self.in_channels_ = in_channels
        last = self._last_stage()
        stage = None if last is None else copy.deepcopy(last.module).requires_grad_(True)
        head_channels = in_channels if last is None else last.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return MaskContrastHead(head_channels, self.config, stage).to(self.device)

    # ----------------------------------------------------------------- training
    def fit(self, inputs: FitInputs, checkpoint_dir: str | Path | None = None) -> MaskContrast:
        """Train the head on ``inputs.features [C, h, w]`` and ``inputs.masks [H, W]`` (and
        ``inputs.student_features`` for the query views when given).

        With ``checkpoint_dir`` a checkpoint is written there after every epoch and an existing
        one (same config) is resumed. Under torchrun every rank passes the same inputs; each
        takes its share of every batch, gradients are averaged and the queue gathers all ranks.
        """
        cfg = self.config
        feats, masks = list(inputs.features), inputs.masks
        if masks is None:
            raise UnsegError("MaskContrast needs saliency mask proposals (FitInputs.masks)")
        if len(masks) != len(feats) or not feats:
            raise UnsegError(f"{len(feats)} feature maps but {len(masks)} saliency masks")
        students = inputs.student_features
        if cfg.train_last_stage and self._stage is None:
            raise UnsegError(
                "train_last_stage: fitting needs the backbone's pretrained last stage "
                "(MaskContrast(config, stage=backbone.last_stage()))"
            )
        if students is not None and len(students) != len(feats):
            raise UnsegError("student_features must match features one to one")
        if len({f.shape[0] for f in feats}) != 1:
            raise UnsegError("all feature maps must have the same number of channels")
        for i, (f, m) in enumerate(zip(feats, masks, strict=True)):
            _check_pair(i, f, m)
        cells = {view_cells(f, m, cfg) for f, m in zip(feats, masks, strict=True)}
        if len(cells) > 1:
            raise UnsegError(
                f"the images' views would have feature grids of {sorted(cells)} cells per side "
                "(masks at different strides of their feature maps); give every mask at the "
                "size of the image its features were computed on"
            )
        model = self._build(int(feats[0].shape[0]))
        key = copy.deepcopy(model)
        for p in key.parameters():
            p.requires_grad_(False)
        queue = PrototypeQueue(
            cfg.queue_size, cfg.embed_dim, torch.Generator().manual_seed(_mix(cfg.seed, 1))
        ).to(self.device)
        optim = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
        )
        self.history_, self.fallbacks_ = [], 0
        start = 0
        path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        if path is not None and path.exists():
            start = self._resume(path, model, key, queue, optim)
        rank, world = dist.rank(), dist.world_size()
        for epoch in range(start, cfg.epochs):
            for group in optim.param_groups:
                group["lr"] = cfg.lr * (1.0 - epoch / cfg.epochs) ** cfg.poly_power
            order = torch.randperm(
                len(feats), generator=torch.Generator().manual_seed(_mix(cfg.seed, 2, epoch))
            ).tolist()
            for s in range(0, len(order), cfg.batch_size):
                mine = dist.shard(order[s : s + cfg.batch_size], rank, world)
                # many tiny ops: intra-op threads only spin-wait (badly on a loaded machine)
                with cpu_threads(self.device, 1):
                    views = [
                        draw_views(
                            feats[i].to(self.device),
                            masks[i].to(self.device),
                            cfg,
                            torch.Generator().manual_seed(_mix(cfg.seed, 3, epoch, i)),
                            None if students is None else students[i].to(self.device),
                        )
                        for i in mine
                    ]
                self.fallbacks_ += sum(v.fallback for v in views)
                self.history_.append(self._step(views, model, key, queue, optim))
            logger.info(
                "MaskContrast epoch %d/%d: loss %.4f",
                epoch + 1,
                cfg.epochs,
                self.history_[-1] if self.history_ else float("nan"),
            )
            if path is not None:
                if dist.is_main():
                    self._save_checkpoint(path, epoch + 1, model, key, queue, optim)
                dist.barrier()
        if self.fallbacks_:
            logger.info(
                "%d view pairs fell back to the whole image (salient area)", self.fallbacks_
            )
        model.eval()
        self.model_ = model
        return self

    def _step(
        self,
        views: list[ViewPair],
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> float:
        """One SGD step on this rank's ``views``; returns this rank's loss."""
        cfg = self.config
        model.train()
        key.train()
        optim.zero_grad(set_to_none=False)
        momentum_update(key, model, cfg.momentum)
        if views:
            side = views[0].query_mask.shape[-1]
            q_emb, q_sal = model(torch.stack([v.query for v in views]))
            q_emb = F.interpolate(q_emb, size=(side, side), mode="bilinear", align_corners=False)
            q_sal = F.interpolate(q_sal, size=(side, side), mode="bilinear", align_corners=False)
            q_mask = torch.stack([v.query_mask for v in views])
            with torch.no_grad():
                k_emb, _ = key(torch.stack([v.key for v in views]))
                k_emb = F.interpolate(
                    k_emb, size=(side, side), mode="bilinear", align_corners=False
                )
                k_mask = torch.stack([v.key_mask for v in views]).to(k_emb.dtype)
                protos = F.normalize(
                    torch.einsum("bdhw,bhw->bd", F.normalize(k_emb, dim=1), k_mask), dim=1
                )
            loss = contrastive_loss(q_emb, q_mask, protos, queue.items, cfg.temperature)
            loss = loss + cfg.saliency_weight * balanced_bce(q_sal[:, 0], q_mask)
            loss.backward()
        else:
            protos = queue.items.new_zeros((0, cfg.embed_dim))
            loss = torch.zeros(())
        queue.enqueue(protos)
        if dist.is_distributed():
            for p in model.parameters():
                if p.grad is None:  # no views on this rank at the first step
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= dist.world_size()
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)
        optim.step()
        return float(loss.detach())

    # ----------------------------------------------------------------- checkpoints
    def _save_checkpoint(
        self,
        path: Path,
        epoch: int,
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> None:
        """Write everything a resume needs to ``path`` (safetensors, atomically)."""
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"key.{k}": v for k, v in key.state_dict().items()}
        for i, p in enumerate(model.parameters()):
            buf = optim.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{i}"] = buf
        tensors |= {
            "queue": queue.items,
            "queue_ptr": torch.tensor(queue.ptr),
            "epoch": torch.tensor(epoch),
            "fallbacks": torch.tensor(self.fallbacks_),
            "history": torch.tensor(self.history_, dtype=torch.float64),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"config": json.dumps(asdict(self.config))}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))

    def _resume(
        self,
        path: Path,
        model: MaskContrastHead,
        key: MaskContrastHead,
        queue: PrototypeQueue,
        optim: torch.optim.Optimizer,
    ) -> int:
        """Load the checkpoint at ``path`` into the training state; returns the epochs done."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several kinds on a damaged file
            raise UnsegError(f"{path}: unreadable checkpoint ({exc})") from None
        if json.loads(meta.get("config", "null")) != json.loads(json.dumps(asdict(self.config))):
            raise UnsegError(
                f"{path}: checkpoint of another configuration; use a new checkpoint folder or "
                "the same settings"
            )
        try:
            model.load_state_dict(_prefixed(state, "model."))
            key.load_state_dict(_prefixed(state, "key."))
        except RuntimeError as exc:
            raise UnsegError(f"{path}: checkpoint does not fit these features ({exc})") from None
        for i, p in enumerate(model.parameters()):
            if f"optim.{i}" in state:
                optim.state[p]["momentum_buffer"] = state[f"optim.{i}"].to(self.device)
        queue.items = state["queue"].to(self.device)
        queue.ptr = int(state["queue_ptr"])
        self.fallbacks_ = int(state["fallbacks"])
        self.history_ = state["history"].tolist()
        epoch = int(state["epoch"])
        logger.info("resuming MaskContrast from %s after epoch %d", path, epoch)
        return epoch

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained head's tensors (CPU; the trained stage's under ``head.stage.``), plus
        ``in_channels`` (the features' channels)."""
        model = self._model()
        state = {f"head.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        state["in_channels"] = torch.tensor(self.in_channels_)
        return state

    @classmethod
    def from_state(
        cls,
        config: MaskContrastConfig,
        state: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
    ) -> MaskContrast:
        """A fitted estimator rebuilt from :meth:`state_dict`'s output."""
        est = cls(config, device)
        if "in_channels" not in state:
            raise UnsegError("not a MaskContrast state: 'in_channels' is missing")
        model = est._build(int(state["in_channels"]))
        try:
            model.load_state_dict(_prefixed(state, "head."))
        except RuntimeError as exc:
            raise UnsegError(f"MaskContrast state does not fit its config ({exc})") from None
        model.eval()
        est.model_ = model
        return est

    # ----------------------------------------------------------------- inference
    def _model(self) -> MaskContrastHead:
        if self.model_ is None:
            raise UnsegError("MaskContrast used before fit")
        return self.model_

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw embedding ``[D, H, W]``, saliency logit ``[H, W]``) of one image's
        ``features [C, h, w]``, upsampled bilinearly to ``size`` (default: the feature grid)."""
        model = self._model()
        model.eval()
        emb, sal = model(features[None].float().to(self.device))
        if size is not None:
            emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=False)
            sal = F.interpolate(sal, size=size, mode="bilinear", align_corners=False)
        return emb[0], sal[0, 0]

    def embed(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """L2-normalised pixel embeddings ``[D, H, W]`` of ``features [C, h, w]``."""
        return F.normalize(self.forward(features, size)[0], dim=0)

    def image_prototype(
        self, features: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the image's vector ``[D]``, its salient pixels ``[H, W]`` bool) as the paper's
        evaluation: raw embeddings weighted by the saliency logit where it exceeds 0.5."""
        emb, sal = self.forward(features, size)
        salient = sal > 0.5
        return weighted_prototype(emb, sal * salient), salient

    def predict_set(
        self,
        features: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
        num_clusters: int = 20,
        seed: int = 0,
        pca_dim: int = 32,
    ) -> list[torch.Tensor]:
        """Per-image k-means protocol on a set: label maps ``[H, W]`` (int64, 0 = background,
        1..num_clusters) for ``features[i] [C, h, w]`` at ``sizes[i]``."""
        pairs = [self.image_prototype(f, s) for f, s in zip(features, sizes, strict=True)]
        protos = torch.stack([p for p, _ in pairs]).cpu()
        masks = [m.cpu() for _, m in pairs]
        return kmeans_protocol(protos, masks, num_clusters, pca_dim=pca_dim, seed=seed)


def _check_pair(index: int, features: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise unless ``mask [H, W]`` covers the image of ``features [C, h, w]`` (same aspect)."""
    if features.ndim != 3 or mask.ndim != 2:
        raise UnsegError(
            f"image {index}: features must be [C, h, w] and its mask [H, W], got "
            f"{tuple(features.shape)} and {tuple(mask.shape)}"
        )
    sy, sx = mask.shape[0] / features.shape[1], mask.shape[1] / features.shape[2]
    if min(sy, sx) < 1 or abs(sy - sx) > 0.1 * max(sy, sx):
        raise UnsegError(
            f"image {index}: mask {mask.shape[0]}x{mask.shape[1]} is not at the size of the "
            f"image of its {features.shape[1]}x{features.shape[2]} feature map"
        )


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
