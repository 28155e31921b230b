"""Cosine (spherical) k-means in torch: k-means++ seeding, restarts, chunked so memory stays flat.

Points and centres live on the unit sphere; a point's cost is ``1 - cos(x, c)`` and a centre is
the normalised mean of its points. Distances are computed ``chunk_size`` rows at a time, so the
extra memory is ``chunk_size x K`` whatever the number of points. This is the baseline every
PriMaPs-EM table compares against, and the second half of PriMaPs-EM's initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError


@dataclass(frozen=True)
class KMeansConfig:
    """Cosine k-means settings."""

    num_classes: int = 27
    n_init: int = 3
    max_iter: int = 100
    tol: float = 1e-6
    chunk_size: int = 65536
    seed: int = 0


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
