"""Training-free object discovery by a normalized-cut bipartition of the patch graph (TokenCut).

Graph: patches are nodes, ``W_ij = 1`` where the cosine similarity of their key features is above
τ (0.2) and ε (1e-5) otherwise (self-loops included, as in TokenCut). The second-smallest
generalized eigenvector of ``(D − W) x = λ D x`` is split at its mean; the side holding the entry
of largest magnitude (the seed) is the foreground, and only the 4-connected component containing
the seed is kept (``scipy.ndimage.label``), exactly as TokenCut's ``ncut`` / ``detect_box``.

Degenerate graphs: when every off-diagonal weight is the same (a uniform image: all keys alike,
or all-zero keys) the graph has no cut better than any other, the eigenvector is arbitrary, and
the result is defined as an **empty** mask with ``seed = None``. Grids with fewer than two
patches are degenerate too. Grids larger than ``max_patches`` are average-pooled by the smallest
integer factor that fits before solving, and the mask is expanded back (nearest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

from unseg.errors import UnsegError


@dataclass
class SpectralConfig:
    """TokenCut's defaults: τ = 0.2, ε = 1e-5 on the binarised key-similarity graph."""

    tau: float = 0.2
    eps: float = 1e-5
    max_patches: int = 4096


@dataclass
class Bipartition:
    """Result on the patch grid: ``mask`` ``[h, w]`` bool, ``eigenvector`` ``[h, w]`` (oriented
    so the foreground is above the mean; zeros when degenerate), ``seed`` (row, col) or None."""

    mask: np.ndarray
    eigenvector: np.ndarray
    seed: tuple[int, int] | None


def binary_affinity(features: torch.Tensor, tau: float, eps: float) -> np.ndarray:
    """Cosine-similarity graph of ``[C, N]`` features binarised at ``tau``: ``[N, N]`` float64."""
    f = F.normalize(features.to(torch.float64), dim=0)
    sim = (f.T @ f).cpu().numpy()
    return np.where(sim > tau, 1.0, eps)


def _is_degenerate(w: np.ndarray) -> bool:
    n = w.shape[0]
    if n < 2:
        return True
    off = w[~np.eye(n, dtype=bool)]
    return bool(np.all(off == off[0]))


def second_eigenvector(w: np.ndarray) -> np.ndarray:
    """Second-smallest generalized eigenvector of ``(D − W) x = λ D x``: ``[N]`` float64."""
    d = np.diag(w.sum(axis=1))
    _, vecs = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 1])
    return vecs[:, 0]


def _pool_factor(h: int, w: int, max_patches: int) -> int:
    k = 1
    while math.ceil(h / k) * math.ceil(w / k) > max_patches:
        k += 1
    return k


def ncut_bipartition(features: torch.Tensor, config: SpectralConfig | None = None) -> Bipartition:
    """TokenCut bipartition of a ``[C, h, w]`` feature map (attention keys) into fg/bg patches."""
    cfg = config or SpectralConfig()
    if features.ndim != 3:
        raise UnsegError(f"expected features [C, h, w], got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise UnsegError("features contain NaN or infinite values")
    h, w = features.shape[-2:]
    k = _pool_factor(h, w, cfg.max_patches)
    feats = F.avg_pool2d(features[None], k, ceil_mode=True)[0] if k > 1 else features
    gh, gw = feats.shape[-2:]
    graph = binary_affinity(feats.reshape(feats.shape[0], -1), cfg.tau, cfg.eps)
    if _is_degenerate(graph):
        return Bipartition(np.zeros((h, w), bool), np.zeros((h, w)), None)
    try:
        vec = second_eigenvector(graph)
    except np.linalg.LinAlgError:  # D singular: only possible with eps = 0 and isolated nodes
        return Bipartition(np.zeros((h, w), bool), np.zeros((h, w)), None)
    part = vec > vec.mean()
    seed = int(np.argmax(np.abs(vec)))
    if not part[seed]:
        vec, part = -vec, ~part
    labels, _ = ndimage.label(part.reshape(gh, gw))
    seed_rc = (seed // gw, seed % gw)
    mask = labels == labels[seed_rc]
    vec = vec.reshape(gh, gw)
    if k > 1:
        mask = np.kron(mask, np.ones((k, k), bool))[:h, :w]
        vec = np.kron(vec, np.ones((k, k)))[:h, :w]
        seed_rc = (min(seed_rc[0] * k, h - 1), min(seed_rc[1] * k, w - 1))
    return Bipartition(mask, vec, seed_rc)
