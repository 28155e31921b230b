"""PriMaPs: principal mask proposals of one image's dense features (methods.md section 2).

The loop follows the reference (visinf/primaps ``primaps_modules/primaps.py``):

1. ``v`` = first principal direction of the *raw* features at the available positions, centred
   (``torch.pca_lowrank`` centres by default; the reference calls it on un-normalised features).
2. cosine similarity of every L2-normalised feature to ``v``, zero where unavailable;
3. re-anchor on the available feature most similar to ``v`` and recompute the similarity map;
4. keep values ``>= threshold * max``, divide by the max: one soft proposal; its support stops
   being available;
5. stop at ``coverage`` of the positions used, or when the available set has not changed over the
   last ``patience`` iterations.

Then a 3x3 median filter (reflect padding, as the reference's ``MedianPool2d``), gain 10 and clamp
to ``[0, 1]``, a background channel first, log-softmax, refinement at the given image's size
(``refine``: the dense CRF by default, as the paper; :mod:`unseg.refine.semantic`), argmax, and
the background id becomes the ignore label. The pipelines give the image resized as for the
features (the 320 short side, the reference's resolution). Everything runs on the features'
device (the image is taken there once): on a GPU the proposals and their CRF stay there.

Details the paper leaves open, fixed here and documented:

- *Sign of v.* A principal direction is defined up to sign; the reference takes whatever its
  randomized SVD returns, so the anchor may be either end of the principal axis. Here ``v`` is
  oriented so that its most similar available feature is at least as similar as the most
  dissimilar one is dissimilar (``max cos >= -min cos``): the anchor is the most extreme feature
  along the axis. The reference re-implementation in ``bench/primaps.py`` uses the same rule.
- *Solver.* ``solver="eigh"`` (default) takes the top eigenvector of the centred C×C covariance
  of the available features, converged to machine precision (Lanczos on CPU, ``eigh`` on GPU);
  the covariance is updated as positions are removed rather than recomputed. Once fewer
  positions than channels are available (from the start for a CNN's 1280-channel head on a
  10x13 grid) the same direction comes from the ``n × n`` Gram matrix, about 100x cheaper there.
  ``solver="lowrank"`` is the reference's ``torch.pca_lowrank(q=3, niter=100)`` every time.
- *Empty proposals* (an anchor whose feature is the zero vector) are not kept: they would be
  an all-zero channel competing in the softmax. They still count as iterations for the
  unchanged-set rule, which is how that rule can fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.refine.crf import CRFConfig, CRFPool
from unseg.refine.semantic import DEFAULT_PSEUDO_REFINE, Refine, RefineConfig, refine_logits

StopReason = Literal["coverage", "unchanged"]


@dataclass(frozen=True)
class PriMaPsConfig:
    """PriMaPs parameters; the defaults are the paper's / reference code's values."""

    threshold: float = 0.4
    coverage: float = 0.95
    patience: int = 3
    median_kernel: int = 3
    gain: float = 10.0
    solver: Literal["eigh", "lowrank"] = "eigh"
    lowrank_niter: int = 100
    refine: Refine = DEFAULT_PSEUDO_REFINE  # none | crf | guided | guided+crf
    ignore_index: int = 255


@dataclass
class Proposals:
    """Soft proposals of one image: ``masks [N, h, w]`` in ``[0, 1]`` and why the loop stopped."""

    masks: torch.Tensor
    stop: StopReason
    iterations: int


def top_eigenvector(matrix: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector ``[C]`` of the largest eigenvalue of symmetric ``matrix [C, C]``.

    On CPU: Lanczos (ARPACK ``eigsh``, fixed start vector, machine precision); elsewhere, or if
    ARPACK does not converge: ``torch.linalg.eigh``.
    """
    if matrix.device.type == "cpu" and matrix.shape[0] > 2:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh

        a = matrix.double().numpy()
        try:
            _, vec = eigsh(a, k=1, which="LA", v0=np.ones(a.shape[0]), tol=0)
            return F.normalize(torch.from_numpy(vec[:, 0]).to(matrix.dtype), dim=0)
        except ArpackNoConvergence:
            pass
    _, vecs = torch.linalg.eigh(matrix)
    return F.normalize(vecs[:, -1], dim=0)


def first_principal_direction(
    x: torch.Tensor, solver: Literal["eigh", "lowrank"] = "eigh", niter: int = 100
) -> torch.Tensor:
    """First principal direction ``[C]`` (unit norm, any sign) of centred rows of ``x [n, C]``."""
    if x.ndim != 2 or x.shape[0] < 1:
        raise UnsegError(f"need a non-empty [n, C] matrix, got {tuple(x.shape)}")
    if solver == "lowrank":
        q = min(3, x.shape[0], x.shape[1])
        _, _, v = torch.pca_lowrank(x, q=q, niter=niter, center=True)
        return F.normalize(v[:, 0], dim=0)
    xc = (x - x.mean(dim=0, keepdim=True)).double()
    return top_eigenvector(xc.T @ xc).to(x.dtype)


class _AvailableCovariance:
    """Scatter matrix and sum of the available rows, updated as rows are removed.

    All removals together cost one pass over the rows, so every iteration's centred covariance
    comes at ``O(C^2)`` instead of ``O(n C^2)``.
    """

    def __init__(self, x: torch.Tensor) -> None:
        x64 = x.double()
        self.scatter = x64.T @ x64
        self.total = x64.sum(dim=0)
        self.count = x.shape[0]
        self._x = x

    def remove(self, rows: torch.Tensor) -> None:
        r = self._x[rows].double()
        self.scatter -= r.T @ r
        self.total -= r.sum(dim=0)
        self.count -= r.shape[0]

    def direction(self) -> torch.Tensor:
        mean = self.total / self.count
        cov = self.scatter - self.count * torch.outer(mean, mean)
        return top_eigenvector(cov).to(self._x.dtype)


def gram_principal_direction(x: torch.Tensor) -> torch.Tensor:
    """First principal direction ``[C]`` (unit norm, any sign) of centred rows of ``x [n, C]``
    through the ``n × n`` Gram matrix: with ``u`` its top eigenvector, ``Xcᵀ u`` spans the top
    right singular vector of the centred ``Xc``. The cheap route when ``n < C`` (a CNN's 1280
    channels on a 10x13 grid); zero when the rows are all equal."""
    xc = (x - x.mean(dim=0, keepdim=True)).double()
    _, vecs = torch.linalg.eigh(xc @ xc.T)
    return F.normalize(xc.T @ vecs[:, -1], dim=0).to(x.dtype)


def _similarity(v: torch.Tensor, unit: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    sim = unit @ v
    return torch.where(available, sim, torch.zeros_like(sim))


def principal_masks(features: torch.Tensor, config: PriMaPsConfig | None = None) -> Proposals:
    """Run the proposal loop on one image's ``features [C, h, w]``; returns soft masks."""
    config = config or PriMaPsConfig()
    if features.ndim != 3:
        raise UnsegError(f"PriMaPs needs features [C, h, w], got {tuple(features.shape)}")
    channels, height, width = features.shape
    flat = features.reshape(channels, -1).T.float()  # [n, C]
    unit = F.normalize(flat, dim=1)
    total = flat.shape[0]
    available = torch.ones(total, dtype=torch.bool, device=flat.device)
    history: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    iterations = 0
    stop: StopReason = "coverage"
    # the C x C covariance only while more positions than channels are available; the n x n
    # Gram matrix after that (the same direction, cheaper)
    eigh = config.solver == "eigh"
    cov = _AvailableCovariance(flat) if eigh and total > channels else None
    while (total - int(available.sum())) / total < config.coverage:
        iterations += 1
        idx = available.nonzero()[:, 0]
        if cov is not None and idx.numel() <= channels:
            cov = None
        if cov is not None:
            v = cov.direction()
        elif eigh:
            v = gram_principal_direction(flat[idx])
        else:
            v = first_principal_direction(flat[idx], config.solver, config.lowrank_niter)
        sim_avail = unit[idx] @ v
        if sim_avail.max() < -sim_avail.min():
            sim_avail = -sim_avail
        anchor = unit[idx[int(sim_avail.argmax())]]
        sim = _similarity(anchor, unit, available)
        peak = sim.max()
        if peak > 0:
            sim = torch.where(sim >= config.threshold * peak, sim / peak, torch.zeros_like(sim))
            masks.append(sim.reshape(height, width))
            taken = available & (sim > 0)
            if cov is not None:
                cov.remove(taken.nonzero()[:, 0])
            available = available & ~taken
        history.append(available.clone())
        if len(history) >= config.patience and all(
            torch.equal(history[-1], h) for h in history[-config.patience :]
        ):
            stop = "unchanged"
            break
    if masks:
        stacked = torch.stack(masks)
    else:
        stacked = flat.new_zeros((0, height, width))
    return Proposals(masks=stacked, stop=stop, iterations=iterations)


def median_filter(masks: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Per-channel ``kernel``×``kernel`` median of ``masks [N, h, w]`` with reflect padding."""
    if kernel <= 1:
        return masks
    pad = kernel // 2
    mode = "reflect" if min(masks.shape[-2:]) > pad else "replicate"
    x = F.pad(masks[None], (pad, pad, pad, pad), mode=mode)[0]
    patches = x.unfold(1, kernel, 1).unfold(2, kernel, 1)
    return patches.reshape(*patches.shape[:3], -1).median(dim=-1).values


def proposal_log_probs(masks: torch.Tensor, config: PriMaPsConfig | None = None) -> torch.Tensor:
    """Soft proposals ``[N, h, w]`` → log-probabilities ``[N + 1, h, w]``, background first."""
    config = config or PriMaPsConfig()
    height, width = masks.shape[-2:]
    filtered = (median_filter(masks, config.median_kernel) * config.gain).clamp(0, 1)
    nonzero = filtered[filtered != 0]
    level = nonzero.mean() if nonzero.numel() else filtered.new_tensor(1.0)
    background = (level - filtered.sum(dim=0)).clamp(0, 1).reshape(1, height, width)
    return torch.log_softmax(torch.cat([background, filtered]), dim=0)


def labels_from_log_probs(
    log_probs: torch.Tensor, size: tuple[int, int], ignore_index: int = 255
) -> torch.Tensor:
    """Argmax of ``log_probs [N + 1, h, w]`` upsampled to ``size``; background → ``ignore_index``.

    Returns int64 ``[H, W]`` with proposal ids ``0..N-1`` and ``ignore_index``.
    """
    up = F.interpolate(log_probs[None], size=size, mode="bilinear", align_corners=False)[0]
    return ids_from_argmax(up.argmax(dim=0), ignore_index)


def ids_from_argmax(argmax: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Channel ids (0 = background) → proposal ids ``0..N-1`` with background as ignore."""
    out = argmax.long() - 1
    out[argmax == 0] = ignore_index
    return out


def pseudo_labels_one(
    image: np.ndarray | torch.Tensor,
    features: torch.Tensor,
    config: PriMaPsConfig | None = None,
    crf_config: CRFConfig | None = None,
) -> torch.Tensor:
    """PriMaPs pseudo-label ``[H, W]`` (int64, on the features' device) of one image:
    proposals, refinement (the CRF by default), background → ignore.

    ``image`` is uint8 RGB ``[H, W, 3]`` (the output resolution; an array or a tensor),
    ``features`` ``[C, h, w]``.
    """
    config = config or PriMaPsConfig()
    log_probs = proposal_log_probs(principal_masks(features, config).masks, config)
    if config.refine == "none":
        return labels_from_log_probs(log_probs, tuple(image.shape[:2]), config.ignore_index)
    up = F.interpolate(log_probs[None], size=tuple(image.shape[:2]), mode="bilinear",
                       align_corners=False)[0]
    refine = RefineConfig(config.refine, crf_config or CRFConfig())
    return ids_from_argmax(refine_logits(up, image, refine).argmax(dim=0), config.ignore_index)


def _pseudo_task(
    args: tuple[np.ndarray | torch.Tensor, torch.Tensor, PriMaPsConfig, CRFConfig | None],
) -> torch.Tensor:
    return pseudo_labels_one(*args)


def primaps_pseudo_labels(
    images: list[np.ndarray] | list[torch.Tensor],
    features: list[torch.Tensor],
    config: PriMaPsConfig | None = None,
    crf_config: CRFConfig | None = None,
    num_workers: int = 1,
    pool: CRFPool | None = None,
) -> list[torch.Tensor]:
    """:func:`pseudo_labels_one` for several images, spread over ``num_workers`` threads, each
    on its features' device.

    An open ``pool`` is used instead of starting one.
    """
    config = config or PriMaPsConfig()
    if len(images) != len(features):
        raise UnsegError(f"{len(images)} images but {len(features)} feature maps")
    tasks = [(img, f, config, crf_config) for img, f in zip(images, features, strict=True)]
    if pool is not None:
        return pool.map_fn(_pseudo_task, tasks)
    with CRFPool(num_workers, crf_config) as own:
        return own.map_fn(_pseudo_task, tasks)
