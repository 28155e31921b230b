"""Cosine (spherical) k-means: the row clusterer and the semantic k-means method.

:class:`CosineKMeans` clusters rows ``[N, C]``: k-means++ seeding, restarts, chunked so memory
stays flat. Points and centres live on the unit sphere; a point's cost is ``1 - cos(x, c)`` and a
centre is the normalised mean of its points. Distances are computed ``chunk_size`` rows at a
time, so the extra memory is ``chunk_size x K`` whatever the number of points. It is the second
half of PriMaPs-EM's initialisation.

:class:`KMeans` is the k-means *method* under the estimator contract (``unseg.methods.base``):
cosine k-means of every feature vector of the training images (optionally after subtracting
their mean feature, a statistic of the fit kept in the state), cosine logits to the centres.
This is the baseline every PriMaPs-EM table compares against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.methods.base import feature_mean as feature_mean  # re-exported (moved)
from unseg.methods.prototypes import PrototypeEstimator, state_tensor
from unseg.methods.prototypes import center_features as center_features  # re-exported (moved)
from unseg.registry import register
from unseg.utils.options import check_bounds, option


@dataclass(frozen=True)
class KMeansConfig:
    """Cosine k-means settings (``center`` is read by :class:`KMeans` only: subtract the
    training images' mean feature before clustering and before the logits)."""

    num_classes: int = 27
    n_init: int = option(3, "k-means++ restarts (the best inertia is kept)", at_least=1)
    max_iter: int = option(100, "Lloyd iterations per restart", at_least=1)
    tol: float = option(1e-6, "relative inertia change that stops the iterations", at_least=0)
    chunk_size: int = option(65536, "feature vectors per distance block (memory)", at_least=1)
    center: bool = option(
        False,
        "subtract the training images' mean feature, kept in the run (default: on where the "
        "backbone's default tap was measured best centred)",
    )
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse values out of their fields' bounds (:func:`~unseg.utils.options.option`)."""
        check_bounds(self)


def _best_similarity(
    x: torch.Tensor, centers: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of unit ``x [N, C]``: (max cosine to unit ``centers [K, C]``, its index)."""
    sims, idx = [], []
    for start in range(0, x.shape[0], chunk):
        s = x[start : start + chunk] @ centers.T
        m, i = s.max(dim=1)
        sims.append(m)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding with the cosine cost ``1 - cos`` (``2 + log k`` trials per centre,
    as scikit-learn)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    cost = (1.0 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        total = cost.sum()
        if total <= 0:
            picks = torch.randint(n, (trials,), generator=gen)
        else:
            probs = (cost / total).cpu().double()
            picks = torch.multinomial(probs, trials, replacement=True, generator=gen)
        cand = (1.0 - x @ x[picks.to(x.device)].T).clamp_min(0)  # [N, trials]
        new_cost = torch.minimum(cost[:, None], cand)
        best = int(new_cost.sum(dim=0).argmin())
        centers.append(x[int(picks[best])])
        cost = new_cost[:, best]
    return torch.stack(centers)


def _lloyd(
    x: torch.Tensor, centers: torch.Tensor, config: KMeansConfig, iterations: int
) -> tuple[torch.Tensor, float]:
    """Cosine Lloyd iterations from ``centers``; returns (centres, inertia = sum of 1 - cos)."""
    k = centers.shape[0]
    prev = float("inf")
    inertia = prev
    for _ in range(iterations):
        sim, assign = _best_similarity(x, centers, config.chunk_size)
        inertia = float((1.0 - sim).sum())
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero()[:, 0]
        if empty.numel():
            # re-seed empty clusters on the worst-served points
            worst = torch.topk(-sim, empty.numel()).indices
            sums[empty] = x[worst]
        centers = F.normalize(sums, dim=1)
        if prev - inertia <= config.tol * max(prev, 1e-12) and not empty.numel():
            break
        prev = inertia
    sim, _ = _best_similarity(x, centers, config.chunk_size)
    return centers, float((1.0 - sim).sum())


class CosineKMeans:
    """Cosine k-means estimator: ``fit(x [N, C])`` → ``centers_ [K, C]``; ``predict`` → ids."""

    def __init__(self, config: KMeansConfig | None = None) -> None:
        self.config = config or KMeansConfig()
        self.centers_: torch.Tensor | None = None
        self.inertia_: float | None = None

    def fit(
        self, x: torch.Tensor, init: torch.Tensor | None = None, max_iter: int | None = None
    ) -> CosineKMeans:
        """Cluster the rows of ``x [N, C]`` (normalised inside).

        ``init [K, C]`` replaces k-means++ (one run from it); ``max_iter`` overrides the config
        (e.g. a fixed number of passes).
        """
        k = self.config.num_classes
        if x.ndim != 2:
            raise UnsegError(f"k-means needs a [N, C] matrix, got {tuple(x.shape)}")
        if k < 2:
            raise UnsegError(f"number of classes must be at least 2, got {k}")
        if k > x.shape[0]:
            raise UnsegError(
                f"number of classes ({k}) is larger than the number of feature vectors "
                f"({x.shape[0]}); use fewer classes or more / larger images"
            )
        xn = F.normalize(x.float(), dim=1)
        iterations = self.config.max_iter if max_iter is None else max_iter
        gen = torch.Generator().manual_seed(self.config.seed)
        best: tuple[torch.Tensor, float] | None = None
        if init is not None:
            if init.shape != (k, x.shape[1]):
                raise UnsegError(f"init must be [{k}, {x.shape[1]}], got {tuple(init.shape)}")
            starts = [F.normalize(init.float().to(xn.device), dim=1)]
        else:
            starts = [_kmeanspp(xn, k, gen) for _ in range(self.config.n_init)]
        for start in starts:
            centers, inertia = _lloyd(xn, start, self.config, iterations)
            if best is None or inertia < best[1]:
                best = (centers, inertia)
        assert best is not None
        self.centers_, self.inertia_ = best
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster id ``[N]`` (int64) of each row of ``x [N, C]``."""
        if self.centers_ is None:
            raise UnsegError("CosineKMeans.predict called before fit")
        xn = F.normalize(x.float(), dim=1)
        return _best_similarity(xn, self.centers_.to(xn.device), self.config.chunk_size)[1]


# ------------------------------------------------------------------ dense logits of prototypes


def upsampled_norm(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel L2 norm ``[H, W]`` of ``features [C, h, w]`` upsampled bilinearly to ``size``."""
    x = features.float()[None]
    if tuple(size) != tuple(features.shape[1:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].norm(dim=0).clamp_min(1e-12)


def linear_logits(
    features: torch.Tensor, weight: torch.Tensor, factor: int = 1
) -> torch.Tensor:
    """``weight [K, C]`` applied to ``features [C, h, w]`` upsampled bilinearly by ``factor``:
    ``[K, h·factor, w·factor]``, computed as ``up(W·F)`` (upsampling is linear, so this equals
    ``W·up(F)`` without materialising the C-channel upsampled map)."""
    lg = torch.einsum("kc,chw->khw", weight.float().to(features.device), features.float())
    if factor != 1:
        size = (features.shape[1] * factor, features.shape[2] * factor)
        lg = F.interpolate(lg[None], size=size, mode="bilinear", align_corners=False)[0]
    return lg


def cosine_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    factor: int = 1,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine logits ``[K, h·factor, w·factor]`` of ``features [C, h, w]``.

    The value is that of features upsampled bilinearly by ``factor``, L2-normalised per pixel
    and compared to the L2-normalised rows of ``prototypes [K, C]``: :func:`linear_logits` of
    the unit rows divided by ``‖up(F)‖`` (``norm``, from :func:`upsampled_norm`, computed here
    when not given).
    """
    lg = linear_logits(features, F.normalize(prototypes.float(), dim=1), factor)
    if norm is None:
        norm = upsampled_norm(features, (lg.shape[1], lg.shape[2]))
    return lg / norm.to(lg.device)


def feature_rows(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """All feature vectors ``[N, C]`` of ``features[i] [C, h, w]``, image after image."""
    return torch.cat([f.float().reshape(f.shape[0], -1).T for f in features])


@register(
    "kmeans",
    config=KMeansConfig,
    output="semantic",
    needs=("features",),
    summary="cosine k-means of the backbone features (the baseline)",
    pipeline_fields=("num_classes", "seed"),
    rank=20,
)
class KMeans(PrototypeEstimator):
    """The semantic k-means method: cosine k-means of the training images' feature vectors.

    ``fit(FitInputs)`` reads ``features``; the state is ``prototypes [K, C]`` (unit centres)
    and, with ``center``, ``mean [C]``; ``logits`` are the cosine logits of the (centred)
    features to the centres (the shared state and centring:
    :class:`~unseg.methods.prototypes.PrototypeEstimator`).
    """

    what = "k-means"
    config: KMeansConfig

    def __init__(
        self, config: KMeansConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        super().__init__(config or KMeansConfig(), device)
        self.inertia_: float | None = None

    def fit(self, inputs: FitInputs) -> KMeans:
        """Cluster every feature vector of ``inputs.features[i] [C, h, w]``; returns ``self``."""
        if not len(inputs):
            raise UnsegError("k-means needs at least one feature map (FitInputs.features is empty)")
        feats = [f.to(self.device) for f in inputs.features]
        self.fit_center(feats)
        rows = feature_rows([self.centered(f) for f in feats])
        km = CosineKMeans(self.config).fit(rows)
        assert km.centers_ is not None and km.inertia_ is not None
        self.prototypes_, self.inertia_ = km.centers_, km.inertia_
        self.history_ = [km.inertia_]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``prototypes [K, C]`` and, with ``center``, ``mean [C]`` (CPU tensors)."""
        if self.prototypes_ is None:
            raise UnsegError("KMeans has not been fitted")
        return {"prototypes": self.prototypes_.cpu(), **self.center_state()}

    def load_fitted(self, state: dict[str, torch.Tensor]) -> None:
        """``prototypes [K, C]`` from ``state`` (for :meth:`from_state`)."""
        self.prototypes_ = state_tensor(state, "prototypes", self.what).to(self.device)
        k = self.config.num_classes
        if self.prototypes_.ndim != 2 or self.prototypes_.shape[0] != k:
            raise UnsegError(
                f"k-means prototypes {tuple(self.prototypes_.shape)} do not fit K={k}"
            )

    def logits(self, features: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """Cosine logits ``[K, h·factor, w·factor]`` of ``features [C, h, w]`` to the centres."""
        if self.prototypes_ is None:
            raise UnsegError("KMeans.predict called before fit")
        return cosine_logits(self.prediction_input(features), self.prototypes_, factor)
