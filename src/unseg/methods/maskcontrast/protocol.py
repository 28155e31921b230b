"""MaskContrast's evaluation protocol (the paper's per-image k-means): one vector per image,
PCA-whitened, clustered by Euclidean k-means; salient pixels take their image's cluster + 1.

The k-means here is Euclidean on the whitened vectors (as the paper's scikit-learn ``KMeans``),
with plain k-means++ seeding and Lloyd iterations until the assignment stops changing;
:class:`unseg.methods.kmeans.CosineKMeans` (the semantic baseline's) clusters unit vectors by
cosine, so it would change the protocol's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unseg.errors import UnsegError


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
