"""PriMaPs-EM: class prototypes fitted to PriMaPs pseudo-labels by stochastic EM (methods.md §3).

Two classifiers over K classes, each a direction ``v [K, C]`` and a per-class gain ``g [K]``:
the *running* prototypes θ, trained by Adam, and the *momentum* prototypes θ_m, an EMA copy of θ
that makes the E-step and the final prediction. ``classifier`` chooses their form:

- ``"reference"`` (the reference code): a weight-normalised 1x1 conv without bias,
  ``logit_k = g_k·⟨v_k/‖v_k‖, f⟩`` on the raw features f (their norm acts as a temperature);
  v and g are both trained.
- ``"cosine"``: the unit-gain cosine classifier ``⟨v_k/‖v_k‖, f/‖f‖⟩``; only v is trained
  (g stays 1).

One step on a batch of images:

- E-step: θ_m's argmax at every pixel of the clean view; inside each PriMaPs proposal its mode
  (ties → the smallest class id) becomes the pseudo-label of the whole proposal; pixels outside
  every proposal are ignored.
- M-step: Adam on the focal-weighted cross-entropy of θ on the student view (the clean view
  when no student features are given): class weight ``(1 - c_k)^gamma`` with c_k the mean of
  θ's detached softmax over *all* pixels of the batch; the per-pixel loss (0 at ignored pixels)
  is averaged over all pixels (the reference's ``reduction="none"`` then ``.mean()``).
- after the M-step of (0-based) step s, when ``s > 0 and s % ema_every == 0``: the k-th update
  ``θ_m ← d·θ_m + (1 − d)·θ`` on (v, g) with ``d = min(ema_decay, 1 − 1/k)`` (the first copies θ);
  with ``ema_warmup=False``, ``d = ema_decay`` from the first update (unseg 0.1.0's schedule,
  which keeps θ_m close to its initialisation for the first ~1/(1 − d) updates).

Initialisation: the top-K principal directions of the centred features (exact ``eigh`` of the
C×C covariance instead of the reference's ``pca_lowrank(q=2K, niter=200)``), ``g = 1``, then
``kmeans_passes`` full passes of cosine k-means from them (``init="kmeans"``, the default) or,
with ``init="probe"``, the reference's refinement: 2 epochs of a unit-gain cosine probe trained
by Adam at 5e-3 on batches of ``batch_size`` images (:func:`probe_kmeans`); θ and θ_m start
there.

``center``: subtract the training images' mean feature (fitted in ``fit``, kept in the state as
``mean``) before everything, at prediction too.

Deviations for CPU budgets (all parameters): features are upsampled by ``label_factor``
(default: the backbone stride, i.e. the paper's full label resolution) rather than always to
320x320; each step uses whole images at their extraction size (the reference uses 320×320
random resized crops); the step budget is ``steps`` or ``epochs`` over the images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.methods.kmeans import (
    CosineKMeans,
    KMeansConfig,
    feature_rows,
    linear_logits,
    state_tensor,
    upsampled_norm,
)
from unseg.methods.kmeans import (
    cosine_logits as cosine_logits,  # re-exported: the semantic pipeline imports it from here
)
from unseg.methods.prototypes import PrototypeEstimator
from unseg.registry import register
from unseg.utils import dist
from unseg.utils.device import cpu_threads
from unseg.utils.options import check_bounds, option
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)

Classifier = Literal["reference", "cosine"]
CLASSIFIERS: tuple[str, ...] = ("reference", "cosine")
Init = Literal["kmeans", "probe"]
INITS: tuple[str, ...] = ("kmeans", "probe")
PROBE_EPOCHS = 2  # the reference's initialisation: 2 epochs of a cosine probe, Adam lr 5e-3
PROBE_LR = 5e-3


@dataclass(frozen=True)
class PriMaPsEMConfig:
    """PriMaPs-EM settings; defaults are the paper's values except where noted.

    ``student_augs``, ``flip`` and ``crf`` are read by the pipelines (how the student view is
    made, how prediction runs); the estimator takes the student features it is given.
    """

    num_classes: int = 27
    epochs: int = option(50, "EM epochs over the images (paper: 50)", at_least=1)
    steps: int | None = option(None, "a fixed number of EM steps instead of epochs", at_least=1)
    batch_size: int = option(32, "images per EM step", at_least=1)
    lr: float | None = option(
        None,
        "Adam learning rate of θ (default: the paper's 5e-3 with the reference classifier, "
        "1e-3 with the cosine one: at 5e-3 it empties clusters on street scenes, measured on "
        "VOC2012, VOC2007 and CamVid in docs/results-primaps.md)",
        above=0,
    )
    focal_gamma: float = option(2.0, "focal weighting exponent γ", at_least=0)
    ema_decay: float = option(
        0.98,
        "ceiling of θ_m's warm-up EMA decay",
        at_least=0, at_most=1,
    )
    ema_every: int = option(10, "steps between θ_m updates", at_least=1)
    ema_warmup: bool = option(
        True,
        "θ_m's decay warms up as min(ceiling, 1 − 1/k) at the k-th update (off: the ceiling "
        "from the first update, unseg 0.1.0's schedule)",
    )
    kmeans_passes: int = option(2, "cosine k-means passes of the initialisation", at_least=1)
    init: Init = option(
        "kmeans",
        "how the initial PCA directions are refined: kmeans: `kmeans_passes` full passes of "
        "cosine k-means; probe: the reference's 2 epochs of a cosine probe trained by Adam "
        "(lr 5e-3) on batches of `batch_size` images",
    )
    init_max_points: int = option(
        200_000,
        "feature vectors sampled for the initialisation",
        at_least=1,
    )
    label_factor: int | None = None  # None: upsample features by the stride (paper)
    classifier: Classifier = option(
        "reference",
        "reference: weight-normalised θ with trainable gain on raw features; cosine: unit-gain "
        "cosine classifier (default: reference on a ViT's LayerNorm-ed tokens and on "
        "MaskContrast embeddings, cosine on a CNN's features, as measured)",
    )
    center: bool = option(
        False,
        "subtract the training images' mean feature, kept in the run (default: on where the "
        "backbone's default tap was measured best centred)",
    )
    student_augs: bool = option(
        True,
        "train θ on the student view (blur, jitter/greyscale; seeded)",
    )
    flip: bool = option(
        True,
        "average the features of the image and its mirror image at prediction",
    )
    crf: bool = True
    ignore_index: int = option(255, "pseudo-label id of pixels outside every proposal")
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse values out of their fields' bounds (:func:`~unseg.utils.options.option`)."""
        check_bounds(self)


DEFAULT_LR: dict[str, float] = {"reference": 5e-3, "cosine": 1e-3}  # by classifier


def learning_rate(config: PriMaPsEMConfig) -> float:
    """θ's Adam learning rate: ``config.lr``, or the classifier's default (:data:`DEFAULT_LR`:
    the paper's 5e-3 for its reference classifier; 1e-3 for the unit-gain cosine classifier,
    whose logits lie in [-1, 1], measured on three dev sets)."""
    if config.lr is not None:  # above 0: the config's bound
        return config.lr
    _check_choices(config)
    return DEFAULT_LR[config.classifier]


def _check_choices(config: PriMaPsEMConfig) -> None:
    """A clear error for an unknown ``classifier`` or ``init``."""
    if config.classifier not in CLASSIFIERS:
        raise UnsegError(f"unknown classifier {config.classifier!r}; choose from {CLASSIFIERS}")
    if config.init not in INITS:
        raise UnsegError(f"unknown init {config.init!r}; choose from {INITS}")


def prototype_logits(
    features: torch.Tensor,
    direction: torch.Tensor,
    gain: torch.Tensor,
    classifier: Classifier,
    factor: int = 1,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[K, h·factor, w·factor]`` of ``features [C, h, w]`` upsampled by ``factor``.

    ``"reference"``: ``g_k·⟨v_k/‖v_k‖, up(F)⟩``; ``"cosine"``: the same divided by ``‖up(F)‖``
    (``norm``, computed when not given). ``direction [K, C]``, ``gain [K]``; differentiable in
    both.
    """
    weight = gain[:, None] * F.normalize(direction, dim=1)
    lg = linear_logits(features, weight, factor)
    if classifier == "cosine":
        if norm is None:
            norm = upsampled_norm(features, (lg.shape[1], lg.shape[2]))
        lg = lg / norm
    return lg


def e_step(
    predictions: torch.Tensor, proposals: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pseudo-labels: the mode of ``predictions`` inside each proposal (same shapes, int64).

    Proposal ids are non-negative integers (any, not necessarily contiguous); pixels where
    ``proposals == ignore_index`` stay ``ignore_index``; ties go to the smallest class id.
    """
    if predictions.shape != proposals.shape:
        raise UnsegError(f"shapes differ: {tuple(predictions.shape)} vs {tuple(proposals.shape)}")
    return proposal_modes(predictions, proposals, proposal_count(proposals, ignore_index),
                          num_classes, ignore_index)


def proposal_count(proposals: torch.Tensor, ignore_index: int = 255) -> int:
    """One more than the largest proposal id of ``proposals`` (0 when all are ignored); a clear
    error for a negative id. Reads the tensor (a host sync on a GPU): once per training image."""
    valid = proposals[proposals != ignore_index]
    if not valid.numel():
        return 0
    if int(valid.min()) < 0:
        raise UnsegError("proposal ids must be non-negative (apart from the ignore index)")
    return int(valid.max()) + 1


def proposal_modes(
    predictions: torch.Tensor,
    proposals: torch.Tensor,
    count: int,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """:func:`e_step` given ``count`` = :func:`proposal_count` of ``proposals`` (any integer
    dtype, same shape as ``predictions``): no data-dependent shapes, so on a GPU the host
    never waits for it. Returns int64."""
    proposals = proposals.long()
    valid = proposals != ignore_index
    if count == 0:
        return torch.full_like(proposals, ignore_index)
    pid = torch.where(valid, proposals, 0)
    # ignored pixels vote in a last bucket of their own
    key = torch.where(valid, pid * num_classes + predictions, count * num_classes)
    votes = torch.zeros(count * num_classes + 1, dtype=torch.long, device=key.device)
    votes.scatter_add_(0, key.reshape(-1), torch.ones_like(key).reshape(-1))
    mode = votes[:-1].view(count, num_classes).argmax(dim=1)
    return torch.where(valid, mode[pid], ignore_index)


def focal_weights(probs: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Class weights ``(1 − mean confidence)^gamma`` from softmax ``probs [P, K]`` → ``[K]``."""
    return (1.0 - probs.mean(dim=0)) ** gamma


def ema_decay(update: int, ceiling: float = 0.98) -> float:
    """Decay of the ``update``-th EMA update (1-based): ``min(ceiling, 1 − 1/update)``."""
    if update < 1:
        raise UnsegError(f"EMA updates are counted from 1, got {update}")
    return min(ceiling, 1.0 - 1.0 / update)


def ema_update(momentum: torch.Tensor, running: torch.Tensor, decay: float) -> torch.Tensor:
    """``decay·momentum + (1 − decay)·running`` (a new tensor)."""
    return decay * momentum + (1.0 - decay) * running


def top_eigenvectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Unit eigenvectors ``[C, k]`` of the ``k`` largest eigenvalues of the symmetric float64
    ``matrix [C, C]``, largest first.

    On the CPU with ``k`` below ``C / 2``: Lanczos (ARPACK ``eigsh``, fixed start vector,
    machine precision), a fraction of a full ``eigh`` (C = 1280, k = 10: 0.7 s against 4.2 s,
    a fixed cost of every fit); otherwise, or if ARPACK does not converge, ``eigh``.
    """
    size = matrix.shape[0]
    if matrix.device.type == "cpu" and k < size // 2:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        try:
            _, vecs = eigsh(matrix.numpy(), k=k, which="LA", v0=np.ones(size), tol=0)
            return torch.from_numpy(vecs[:, ::-1].copy())
        except ArpackNoConvergence:
            pass
    return torch.linalg.eigh(matrix)[1][:, -k:].flip(1)


def pca_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal directions ``[k, C]`` of the centred rows of ``x [N, C]``.

    Each direction's sign is chosen so that its largest projection is positive.
    """
    xc = x.float() - x.float().mean(dim=0, keepdim=True)
    dirs = top_eigenvectors((xc.T @ xc).double(), k).T.contiguous().float()  # descending
    proj = xc @ dirs.T
    flip = proj.max(dim=0).values < -proj.min(dim=0).values
    dirs[flip] = -dirs[flip]
    return dirs.to(x.dtype)


def probe_kmeans(
    features: Sequence[torch.Tensor],
    init: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    epochs: int = PROBE_EPOCHS,
    lr: float = PROBE_LR,
) -> torch.Tensor:
    """The reference's refinement of the initial directions: mini-batch cosine k-means as a
    unit-gain cosine probe trained by Adam. For each batch of ``batch_size`` images (shuffled by
    ``gen``) of ``features[i] [C, h, w]``, every feature vector's cosine to its best direction is
    maximised (loss ``−mean max_k cos(f, v_k)``, so only the winning direction moves).
    ``init [K, C]``; returns unit rows ``[K, C]``."""
    direction = init.detach().float().clone().requires_grad_(True)
    optim = Adam([direction], lr=lr)
    n = len(features)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            rows = feature_rows([features[i] for i in order[start : start + batch_size]])
            cos = F.normalize(rows.to(direction.device), dim=1) @ F.normalize(direction, dim=1).T
            loss = -cos.max(dim=1).values.mean()
            direction.grad = None
            loss.backward()
            optim.step()
    return F.normalize(direction.detach(), dim=1)


class Adam:
    """Adam with ``torch.optim.Adam``'s defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay),
    its single-tensor update operation for operation, so the same parameters bit for bit.

    Not ``torch.optim.Adam`` itself because creating the first torch optimizer of a process
    imports ``torch._dynamo``: 2 s of CPU (4 s on a loaded machine) per ``fit`` / ``segment``
    whatever the number of images (measured with cProfile; docs/pipeline-cost.md).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter from its ``.grad``."""
        self.steps += 1
        step_size = self.lr / (1 - self.beta1 ** float(self.steps))
        correction2_sqrt = (1 - self.beta2 ** float(self.steps)) ** 0.5
        for p, avg, avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            assert p.grad is not None
            avg.lerp_(p.grad, 1 - self.beta1)
            avg_sq.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denom = (avg_sq.sqrt() / correction2_sqrt).add_(self.eps)
            p.addcdiv_(avg, denom, value=-step_size)


@dataclass
class _View:
    """One training image at label resolution: clean and student features, their upsampled
    norms (cosine classifier only), the upsampling factor, the flattened proposal ids
    (int16; widened per batch) and their :func:`proposal_count`."""

    clean: torch.Tensor
    clean_norm: torch.Tensor | None
    student: torch.Tensor
    student_norm: torch.Tensor | None
    factor: int
    proposals: torch.Tensor
    proposal_count: int


def _resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label map ``[H, W]`` → ``[*size]`` (nearest), held as int16: a quarter of int64's memory
    for what the EM keeps of every training image (ids and the ignore index fit)."""
    if tuple(labels.shape) == size:
        return labels.to(torch.int16)
    out = F.interpolate(labels[None, None].float(), size=size, mode="nearest")
    return out[0, 0].to(torch.int16)


@register(
    "primaps-em",
    config=PriMaPsEMConfig,
    output="semantic",
    needs=("features", "images", "proposals", "student_features"),
    summary="PriMaPs-EM: class prototypes fitted to principal mask proposals",
    pipeline_fields=("num_classes", "seed", "label_factor", "crf"),
    rank=10,
)
class PriMaPsEM(PrototypeEstimator):
    """PriMaPs-EM estimator on precomputed features and PriMaPs pseudo-labels.

    ``fit(FitInputs(features, proposals=..., student_features=...))``; fitted state: θ_m's
    ``prototypes_ [K, C]`` and ``gain_ [K]``, θ's ``running_`` and ``running_gain_``, and with
    ``center`` the ``mean_ [C]`` (the shared state and centring:
    :class:`~unseg.methods.prototypes.PrototypeEstimator`).
    """

    what = "PriMaPs-EM"
    config: PriMaPsEMConfig

    def __init__(
        self, config: PriMaPsEMConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        config = config or PriMaPsEMConfig()
        _check_choices(config)
        # the rate that runs, so a run's saved configuration says it
        super().__init__(replace(config, lr=learning_rate(config)), device)
        self.gain_: torch.Tensor | None = None
        self.running_: torch.Tensor | None = None
        self.running_gain_: torch.Tensor | None = None

    # ------------------------------------------------------------------ fitting
    def _factor(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        if self.config.label_factor is not None:
            return self.config.label_factor
        return max(1, labels.shape[-2] // features.shape[-2])

    def initialise(self, features: Sequence[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """PCA + cosine k-means directions ``[K, C]`` (unit rows) from the images' feature
        vectors ``features[i] [C, h, w]`` (already centred when ``center``)."""
        k = self.config.num_classes
        rows = feature_rows(features)
        if k < 2:
            raise UnsegError(f"number of classes must be at least 2, got {k}")
        if k > rows.shape[0]:
            raise UnsegError(
                f"number of classes ({k}) is larger than the number of feature vectors "
                f"({rows.shape[0]}); use fewer classes or more / larger images"
            )
        if rows.shape[0] > self.config.init_max_points:
            pick = torch.randperm(rows.shape[0], generator=gen)[: self.config.init_max_points]
            rows = rows[pick.to(rows.device)]
        init = pca_directions(rows, min(k, rows.shape[1]))
        if init.shape[0] < k:  # fewer channels than classes: pad with k-means++ picks
            extra = CosineKMeans(KMeansConfig(num_classes=k, n_init=1, seed=self.config.seed))
            init = torch.cat([init, extra.fit(rows, max_iter=0).centers_[init.shape[0] :]])
        if self.config.init == "probe":
            return probe_kmeans(features, init, self.config.batch_size, gen)
        km = CosineKMeans(KMeansConfig(num_classes=k, seed=self.config.seed))
        return km.fit(rows, init=init, max_iter=self.config.kmeans_passes).centers_

    def _check(self, inputs: FitInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features and proposals of ``inputs``, or a clear error."""
        if inputs.proposals is None:
            raise UnsegError("PriMaPs-EM needs FitInputs.proposals (PriMaPs pseudo-labels)")
        features, proposals = list(inputs.features), list(inputs.proposals)
        if len(features) != len(proposals) or not features:
            raise UnsegError(f"{len(features)} feature maps but {len(proposals)} label maps")
        student = inputs.student_features
        if student is not None and len(student) != len(features):
            raise UnsegError("student_features must match features one to one")
        return features, proposals

    def _views(
        self,
        features: list[torch.Tensor],
        proposals: list[torch.Tensor],
        student: Sequence[torch.Tensor] | None,
    ) -> list[_View]:
        cosine = self.config.classifier == "cosine"
        views = []
        for i, (f, p) in enumerate(zip(features, proposals, strict=True)):
            r = self._factor(f, p)
            size = (f.shape[1] * r, f.shape[2] * r)
            clean = self.centered(f.to(self.device).float())
            if student is None:
                stud = clean
            else:
                stud = self.centered(student[i].to(self.device).float())
            cn = upsampled_norm(clean, size) if cosine else None
            sn = (cn if student is None else upsampled_norm(stud, size)) if cosine else None
            labels = _resize_labels(p.to(self.device), size).reshape(-1)
            count = proposal_count(labels, self.config.ignore_index)
            views.append(_View(clean, cn, stud, sn, r, labels, count))
        return views

    def fit(self, inputs: FitInputs) -> PriMaPsEM:
        """Fit on ``features[i] [C, h, w]``, PriMaPs ``proposals[i] [H, W]`` (any integer
        dtype, 255 = none) and optional ``student_features[i] [C, h, w]``; returns ``self``.

        Under torchrun every rank passes the same inputs; each computes its share of every
        batch, and gradients, focal statistics and the logged loss are summed across ranks.
        """
        cfg = self.config
        features, proposals = self._check(inputs)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.fit_center(features)
        views = self._views(features, proposals, inputs.student_features)
        init = self.initialise([v.clean for v in views], gen).to(self.device)
        direction = init.clone().requires_grad_(True)
        gain = torch.ones(cfg.num_classes, device=self.device)
        params = [direction]
        if cfg.classifier == "reference":
            gain.requires_grad_(True)
            params.append(gain)
        momentum = (init.clone(), gain.detach().clone())
        optim = Adam(params, lr=learning_rate(cfg))
        n = len(views)
        batch = min(cfg.batch_size, n)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(n / batch)
        rank, world = dist.rank(), dist.world_size()
        order: list[int] = []
        updates = 0
        losses: list[torch.Tensor] = []  # on the device: read once at the end, not per step
        # the steps are many small ops on K-channel maps: on CPU one thread beats intra-op
        # parallelism, by far on a loaded machine (idle threads spin-waiting for the cores)
        with cpu_threads(self.device, 1):
            for step in progress(range(total), total=total, desc="PriMaPs-EM"):
                if len(order) < batch:
                    order += torch.randperm(n, generator=gen).tolist()
                idx, order = order[:batch], order[batch:]
                mine = [views[i] for i in dist.shard(idx, rank, world)]
                losses.append(self._step(mine, params, momentum, optim))
                if step > 0 and step % cfg.ema_every == 0:
                    updates += 1
                    d = ema_decay(updates, cfg.ema_decay) if cfg.ema_warmup else cfg.ema_decay
                    momentum = (
                        ema_update(momentum[0], direction.detach(), d),
                        ema_update(momentum[1], gain.detach(), d),
                    )
        self.history_ = torch.cat(losses).tolist() if losses else []
        self.running_, self.running_gain_ = direction.detach(), gain.detach()
        self.prototypes_, self.gain_ = momentum
        logger.info(
            "PriMaPs-EM (%s): %d steps, %d EMA updates, final loss %.4g", cfg.classifier, total,
            updates, self.history_[-1] if self.history_ else float("nan"),
        )
        return self

    def _step(
        self,
        views: list[_View],
        params: list[torch.Tensor],
        momentum: tuple[torch.Tensor, torch.Tensor],
        optim: Adam,
    ) -> torch.Tensor:
        """One E+M step on this rank's ``views``; returns the batch's loss ``[1]`` (all ranks),
        on the device."""
        cfg = self.config
        k = cfg.num_classes
        direction = params[0]
        gain = params[1] if len(params) > 1 else torch.ones(k, device=direction.device)
        with torch.no_grad():
            targets = [
                proposal_modes(
                    prototype_logits(
                        v.clean, momentum[0], momentum[1], cfg.classifier, v.factor, v.clean_norm
                    ).reshape(k, -1).argmax(dim=0),
                    v.proposals, v.proposal_count, k, cfg.ignore_index,
                )
                for v in views
            ]
        logits_list = [
            prototype_logits(
                v.student, direction, gain, cfg.classifier, v.factor, v.student_norm
            ).reshape(k, -1).T
            for v in views
        ]
        logits = torch.cat(logits_list) if logits_list else direction.new_zeros((0, k))
        y = torch.cat(targets) if targets else direction.new_zeros(0, dtype=torch.long)
        per_pixel, count = focal_loss_terms(logits, y, cfg.focal_gamma, cfg.ignore_index)
        loss = per_pixel.sum() / count
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        if per_pixel.numel():
            loss.backward()
        value = loss.detach().reshape(1).clone()
        if dist.is_distributed():
            for p in params:
                assert p.grad is not None
                torch.distributed.all_reduce(p.grad)
            torch.distributed.all_reduce(value)
        optim.step()
        return value

    # --------------------------------------------------------------- prediction
    def logits(self, features: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """θ_m's logits ``[K, h·factor, w·factor]`` for ``features [C, h, w]``."""
        if self.prototypes_ is None or self.gain_ is None:
            raise UnsegError("PriMaPsEM.predict called before fit")
        x = self.prediction_input(features)
        with torch.no_grad():
            return prototype_logits(x, self.prototypes_, self.gain_, self.config.classifier, factor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """θ_m (``prototypes [K, C]``, ``gain [K]``), θ (``running``, ``running_gain``) and,
        with ``center``, ``mean [C]`` (CPU tensors)."""
        if self.prototypes_ is None or self.gain_ is None or self.running_ is None:
            raise UnsegError("PriMaPsEM has not been fitted")
        assert self.running_gain_ is not None
        state = {
            "prototypes": self.prototypes_.cpu(),
            "gain": self.gain_.cpu(),
            "running": self.running_.cpu(),
            "running_gain": self.running_gain_.cpu(),
        }
        return {**state, **self.center_state()}

    def load_fitted(self, state: dict[str, torch.Tensor]) -> None:
        """θ_m (``prototypes``, ``gain``) and θ (``running``, ``running_gain``) from ``state``
        (for :meth:`from_state`)."""
        get = {key: state_tensor(state, key, self.what).to(self.device)
               for key in ("prototypes", "gain", "running", "running_gain")}
        k = self.config.num_classes
        if get["prototypes"].ndim != 2 or get["prototypes"].shape[0] != k or get[
            "gain"
        ].shape != (k,):
            raise UnsegError(
                f"PriMaPs-EM prototypes {tuple(get['prototypes'].shape)} / gain "
                f"{tuple(get['gain'].shape)} do not fit K={k}"
            )
        self.prototypes_, self.gain_ = get["prototypes"], get["gain"]
        self.running_, self.running_gain_ = get["running"], get["running_gain"]


def focal_loss_terms(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel focal-weighted cross-entropy ``[P]`` (0 at ignored pixels) of ``logits [P, K]``
    against ``targets [P]``, and the pixel count to divide their sum by.

    The class weights :func:`focal_weights` use the detached softmax of every pixel; under
    torchrun their statistics and the count are summed over all ranks first.
    """
    probs = logits.detach().softmax(dim=1)
    stats = torch.cat([probs.sum(dim=0), probs.new_tensor([probs.shape[0]])])
    if dist.is_distributed():
        torch.distributed.all_reduce(stats)
    count = stats[-1].clamp_min(1)
    weight = (1.0 - stats[:-1] / count) ** gamma
    per_pixel = F.cross_entropy(
        logits, targets, weight=weight, ignore_index=ignore_index, reduction="none"
    )
    return per_pixel, count
