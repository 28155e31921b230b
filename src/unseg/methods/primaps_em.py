"""PriMaPs-EM: class prototypes fitted to PriMaPs pseudo-labels by stochastic EM (methods.md §3).

Two cosine classifiers over K classes (unit-norm prototype rows applied to L2-normalised
features): the *running* prototypes θ, trained by Adam, and the *momentum* prototypes θ_m, an
EMA of θ that makes the E-step and the final prediction.

One step on a batch of images:

- E-step: θ_m's argmax at every pixel; inside each PriMaPs proposal its mode (ties → the
  smallest class id) becomes the pseudo-label of the whole proposal; ignore pixels stay ignored.
- M-step: Adam on the focal-weighted cross-entropy of θ (on the student features when given)
  against those labels; class weight ``(1 - mean softmax confidence of the class)^gamma`` over the
  batch's pixels, summed over labelled pixels and divided by *all* pixels (the reference's
  ``reduction="none"`` then ``.mean()``).
- every ``ema_every`` steps: ``θ_m ← decay·θ_m + (1 − decay)·θ`` on the stored (un-normalised)
  weights, as the reference's EMA of the weight-norm parameters.

Initialisation: the top-K principal directions of the (centred, raw) features (exact ``eigh`` of
the C×C covariance instead of the reference's ``pca_lowrank(q=2K, niter=200)`` whose first K
columns it keeps), then ``kmeans_passes`` passes of cosine k-means from them; θ and θ_m start
there.

Deviations for CPU budgets (all parameters): features are upsampled by ``label_factor``
(default: the backbone stride, i.e. the paper's full label resolution) rather than always to the
image size; each step uses whole images at their extraction size (the reference uses 320×320
random resized crops); the step budget is ``steps`` or ``epochs`` over the images.

Where the reference differs from the spec: its θ is a weight-normalised 1x1 conv with a
*trainable* gain applied to *un-normalised* features. The spec's cosine classifier is used here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.methods.kmeans import CosineKMeans, KMeansConfig
from unseg.utils import dist
from unseg.utils.device import cpu_threads
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriMaPsEMConfig:
    """PriMaPs-EM settings; defaults are the paper's values except where noted."""

    num_classes: int = 27
    epochs: int = 50
    steps: int | None = None  # a fixed step budget instead of epochs
    batch_size: int = 32
    lr: float = 5e-3
    focal_gamma: float = 2.0
    ema_decay: float = 0.98
    ema_every: int = 10
    kmeans_passes: int = 2
    init_max_points: int = 200_000
    label_factor: int | None = None  # None: upsample features by the stride (paper)
    logit_scale: float = 1.0  # M-step logits = scale x cosine (spec: 1, a unit-gain classifier)
    student_augs: bool = False
    flip: bool = True
    crf: bool = True
    ignore_index: int = 255
    seed: int = 0


def upsampled_norm(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel L2 norm ``[H, W]`` of ``features [C, h, w]`` upsampled bilinearly to ``size``."""
    x = features.float()[None]
    if tuple(size) != tuple(features.shape[1:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].norm(dim=0).clamp_min(1e-12)


def cosine_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    factor: int = 1,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine logits ``[K, h·factor, w·factor]`` of ``features [C, h, w]``.

    The value is that of features upsampled bilinearly by ``factor``, L2-normalised per pixel
    and compared to the L2-normalised rows of ``prototypes [K, C]``. Computed without
    materialising the upsampled features: upsampling is linear, so ``W·up(F) = up(W·F)`` (K
    channels instead of C) divided by ``‖up(F)‖`` (``norm``, from :func:`upsampled_norm`,
    computed here when not given).
    """
    size = (features.shape[1] * factor, features.shape[2] * factor)
    w = F.normalize(prototypes.float().to(features.device), dim=1)
    lg = torch.einsum("kc,chw->khw", w, features.float())
    if factor != 1:
        lg = F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0]
    if norm is None:
        norm = upsampled_norm(features, size)
    return lg / norm


def e_step(
    predictions: torch.Tensor, proposals: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pseudo-labels: the mode of ``predictions`` inside each proposal (same shapes, int64).

    Proposal ids are non-negative integers (any, not necessarily contiguous); pixels where
    ``proposals == ignore_index`` stay ``ignore_index``; ties go to the smallest class id.
    """
    if predictions.shape != proposals.shape:
        raise UnsegError(f"shapes differ: {tuple(predictions.shape)} vs {tuple(proposals.shape)}")
    out = torch.full_like(proposals, ignore_index)
    valid = proposals != ignore_index
    if not bool(valid.any()):
        return out
    pid = proposals[valid]
    if int(pid.min()) < 0:
        raise UnsegError("proposal ids must be non-negative (apart from the ignore index)")
    n = int(pid.max()) + 1
    counts = torch.bincount(pid * num_classes + predictions[valid], minlength=n * num_classes)
    mode = counts.view(n, num_classes).argmax(dim=1)
    out[valid] = mode[pid]
    return out


def focal_weights(probs: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class weights ``(1 − mean confidence)^gamma`` from softmax ``probs [P, K]`` → ``[K]``."""
    return (1.0 - probs.mean(dim=0)) ** gamma


def ema_update(momentum: torch.Tensor, running: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay·momentum + (1 − decay)·running`` (a new tensor)."""
    return decay * momentum + (1.0 - decay) * running


def pca_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal directions ``[k, C]`` of the centred rows of ``x [N, C]``.

    Each direction's sign is chosen so that its largest projection is positive.
    """
    xc = x.float() - x.float().mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh((xc.T @ xc).double())
    dirs = vecs[:, -k:].flip(1).T.float()  # descending eigenvalues
    proj = xc @ dirs.T
    flip = proj.max(dim=0).values < -proj.min(dim=0).values
    dirs[flip] = -dirs[flip]
    return dirs.to(x.dtype)


# per image: features, their upsampled norm, student features, their norm, factor, labels
_View = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]


def _resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(labels.shape) == size:
        return labels.long()
    out = F.interpolate(labels[None, None].float(), size=size, mode="nearest")
    return out[0, 0].long()


class PriMaPsEM:
    """PriMaPs-EM estimator on precomputed features and PriMaPs pseudo-labels.

    ``fit(features, proposals)``; ``predict(features, size)``; the fitted state is
    ``prototypes_`` (θ_m, ``[K, C]``) and ``running_`` (θ).
    """

    def __init__(self, config: PriMaPsEMConfig | None = None) -> None:
        self.config = config or PriMaPsEMConfig()
        self.prototypes_: torch.Tensor | None = None
        self.running_: torch.Tensor | None = None
        self.history_: list[float] = []

    # ------------------------------------------------------------------ fitting
    def _factor(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        if self.config.label_factor is not None:
            return self.config.label_factor
        return max(1, labels.shape[-2] // features.shape[-2])

    def initialise(self, features: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """PCA + cosine k-means prototypes ``[K, C]`` from the images' feature vectors."""
        k = self.config.num_classes
        rows = torch.cat([f.reshape(f.shape[0], -1).T for f in features]).float()
        if k < 2:
            raise UnsegError(f"number of classes must be at least 2, got {k}")
        if k > rows.shape[0]:
            raise UnsegError(
                f"number of classes ({k}) is larger than the number of feature vectors "
                f"({rows.shape[0]}); use fewer classes or more / larger images"
            )
        if rows.shape[0] > self.config.init_max_points:
            pick = torch.randperm(rows.shape[0], generator=gen)[: self.config.init_max_points]
            rows = rows[pick]
        init = pca_directions(rows, min(k, rows.shape[1]))
        if init.shape[0] < k:  # fewer channels than classes: pad with k-means++ picks
            extra = CosineKMeans(KMeansConfig(num_classes=k, n_init=1, seed=self.config.seed))
            init = torch.cat([init, extra.fit(rows, max_iter=0).centers_[init.shape[0] :]])
        km = CosineKMeans(KMeansConfig(num_classes=k, seed=self.config.seed))
        return km.fit(rows, init=init, max_iter=self.config.kmeans_passes).centers_

    def fit(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        student_features: Sequence[torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> PriMaPsEM:
        """Fit on ``features[i] [C, h, w]`` and PriMaPs ``proposals[i] [H, W]`` (int64, ignore).

        Under torchrun every rank passes the same lists; each computes its share of every batch
        and gradients (and focal statistics) are averaged across ranks.
        """
        cfg = self.config
        if len(features) != len(proposals) or not features:
            raise UnsegError(f"{len(features)} feature maps but {len(proposals)} label maps")
        if student_features is not None and len(student_features) != len(features):
            raise UnsegError("student_features must match features one to one")
        device = torch.device(device or "cpu")
        gen = torch.Generator().manual_seed(cfg.seed)
        init = self.initialise(features, gen).to(device)
        running = init.clone().requires_grad_(True)
        momentum = init.clone()
        optim = torch.optim.Adam([running], lr=cfg.lr)
        n = len(features)
        batch = min(cfg.batch_size, n)
        per_epoch = math.ceil(n / batch)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        rank, world = dist.rank(), dist.world_size()
        factors = [self._factor(f, p) for f, p in zip(features, proposals, strict=True)]
        sizes = [(f.shape[1] * r, f.shape[2] * r) for f, r in zip(features, factors, strict=True)]
        labels = [_resize_labels(p, s).reshape(-1) for p, s in zip(proposals, sizes, strict=True)]
        norms = [upsampled_norm(features[i], sizes[i]) for i in range(n)]
        students = features if student_features is None else student_features
        student_norms = (
            norms
            if student_features is None
            else [upsampled_norm(student_features[i], sizes[i]) for i in range(n)]
        )
        order: list[int] = []
        self.history_ = []
        # the steps are many small ops on K-channel maps: on CPU one thread beats intra-op
        # parallelism, by far on a loaded machine (idle threads spin-waiting for the cores)
        with cpu_threads(device, 1):
            for step in progress(range(1, total + 1), total=total, desc="PriMaPs-EM"):
                if len(order) < batch:
                    order += torch.randperm(n, generator=gen).tolist()
                idx, order = order[:batch], order[batch:]
                mine = dist.shard(idx, rank, world)
                views = [
                    (
                        features[i].to(device),
                        norms[i].to(device),
                        students[i].to(device),
                        student_norms[i].to(device),
                        factors[i],
                        labels[i].to(device),
                    )
                    for i in mine
                ]
                loss_value = self._step(views, running, momentum, optim)
                self.history_.append(loss_value)
                if step % cfg.ema_every == 0:
                    momentum = ema_update(momentum, running.detach(), cfg.ema_decay)
        self.running_ = running.detach().cpu()
        self.prototypes_ = momentum.cpu()
        return self

    def _step(
        self,
        views: list[_View],
        running: torch.Tensor,
        momentum: torch.Tensor,
        optim: torch.optim.Optimizer,
    ) -> float:
        """One E+M step on ``views``: (features, norm, student features, student norm, factor,
        proposal labels) per image."""
        cfg = self.config
        k = cfg.num_classes
        with torch.no_grad():
            targets = [
                e_step(
                    cosine_logits(f, momentum, r, nrm).reshape(k, -1).argmax(dim=0),
                    lab, k, cfg.ignore_index,
                )
                for f, nrm, _, _, r, lab in views
            ]
        logits_list = [
            cfg.logit_scale * cosine_logits(fs, running, r, ns).reshape(k, -1).T
            for _, _, fs, ns, r, _ in views
        ]
        logits = torch.cat(logits_list) if logits_list else running.new_zeros((0, k))
        y = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
        probs = logits.detach().softmax(dim=1)
        stats = torch.cat([probs.sum(dim=0), probs.new_tensor([probs.shape[0]])])
        if dist.is_distributed():
            torch.distributed.all_reduce(stats)
        count = stats[-1].clamp_min(1)
        weight = (1.0 - stats[:-1] / count) ** cfg.focal_gamma
        per_pixel = F.cross_entropy(
            logits, y, weight=weight, ignore_index=cfg.ignore_index, reduction="none"
        )
        loss = per_pixel.sum() / count
        optim.zero_grad(set_to_none=False)
        if running.grad is None:
            running.grad = torch.zeros_like(running)
        if per_pixel.numel():
            loss.backward()
        if dist.is_distributed():
            torch.distributed.all_reduce(running.grad)
        optim.step()
        return float(loss.detach())

    # --------------------------------------------------------------- prediction
    def logits(self, features: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """θ_m's cosine logits ``[K, h·factor, w·factor]`` for ``features [C, h, w]``."""
        if self.prototypes_ is None:
            raise UnsegError("PriMaPsEM.predict called before fit")
        return cosine_logits(features, self.prototypes_, factor)

    def predict(
        self, features: torch.Tensor, size: tuple[int, int], factor: int = 1
    ) -> torch.Tensor:
        """Class ids ``[H, W]`` (int64): θ_m's logits upsampled bilinearly to ``size``, argmax."""
        lg = self.logits(features, factor)[None]
        return F.interpolate(lg, size=size, mode="bilinear", align_corners=False)[0].argmax(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state for ``unseg.runs.save_run``."""
        if self.prototypes_ is None or self.running_ is None:
            raise UnsegError("PriMaPsEM has not been fitted")
        return {"prototypes": self.prototypes_, "running": self.running_}

    @classmethod
    def from_tensors(
        cls, config: PriMaPsEMConfig, tensors: dict[str, torch.Tensor]
    ) -> PriMaPsEM:
        """Rebuild a fitted estimator from :meth:`tensors`' output."""
        model = cls(config)
        try:
            model.prototypes_ = tensors["prototypes"].float()
            model.running_ = tensors["running"].float()
        except KeyError as exc:
            raise UnsegError(f"PriMaPs-EM weights lack tensor {exc}") from None
        return model
