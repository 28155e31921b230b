"""Short restarts of a saliency head's patch-level cut, and a label-free choice among them.

The soft normalized cut (:mod:`unseg.methods.ncut`) has many minima: which region a trained head
calls the object depends on its initialisation and batch order (on ``efficientnet_lite0``, three
training seeds of one configuration scored 41.0 / 29.8 / 22.7 ECSSD IoU,
docs/results-boosting.md). The part of the head that decides *which* partition it learns is the
patch-level one (projection, transformer, coarse logit); the image-resolution stages only refine
its edges, and cost most of a training step. So ``restarts`` copies of the patch-level part are
trained for a few steps each, on the training images minus a held-back share, with the coarse cut
and the border prior; each is oriented (:func:`orient_sign`), and one is kept by a rule that uses
no labels, computed on the held-back images:

- ``"agreement"`` (default): the restart whose binarised masks agree best (mean per-image IoU)
  with those of the other restarts — the partition most restarts find;
- ``"cut"``: the lowest soft normalized cut.

Restarts whose held-back masks are oversized (more than ``max_foreground`` of the pixels
foreground, :mod:`unseg.methods.collapse`) are passed over unless all are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from unseg.errors import UnsegError

Rule = Literal["agreement", "cut"]
RULES: tuple[str, ...] = ("agreement", "cut")


@dataclass(frozen=True)
class RestartScore:
    """Label-free statistics of one restart on the held-back images (shares in ``[0, 1]``)."""

    cut: float
    foreground: float
    agreement: float
    chosen: bool = False

    def as_dict(self) -> dict[str, float | bool]:
        """JSON-able fields."""
        return asdict(self)


def holdout_split(
    n: int, fraction: float, generator: torch.Generator, minimum: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, held)`` of ``n`` images: ``round(fraction · n)`` of them (at least
    ``minimum``) held back at random, unless fewer than ``2 · minimum`` images would remain to
    train on; then every image is in both (the choice is made on the training images)."""
    if not 0.0 <= fraction < 1.0:
        raise UnsegError(f"the held-back share must be in [0, 1), got {fraction}")
    held = max(minimum, round(fraction * n)) if fraction > 0 else 0
    order = torch.randperm(n, generator=generator)
    if held == 0 or n - held < 2 * minimum:
        return order, order
    return order[held:], order[:held]


def mask_agreement(masks: torch.Tensor) -> torch.Tensor:
    """``[R, M, h, w]`` binary masks of ``R`` restarts on ``M`` images → ``[R]``: each restart's
    mean, over the other restarts and the images, of the IoU of its mask with theirs (two empty
    masks agree fully). One restart: ``[1.0]``."""
    if masks.ndim != 4:
        raise UnsegError(f"expected masks [R, M, h, w], got {tuple(masks.shape)}")
    r = masks.shape[0]
    if r == 1:
        return torch.ones(1)
    m = masks.flatten(2).bool()
    inter = (m[:, None] & m[None]).sum(-1).double()
    union = (m[:, None] | m[None]).sum(-1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean(-1)
    return ((iou.sum(1) - iou.diagonal()) / (r - 1)).float()


def choose(scores: list[RestartScore], rule: Rule, max_foreground: float) -> int:
    """Index of the restart ``rule`` keeps, passing over oversized ones unless all are."""
    if rule not in RULES:
        raise UnsegError(f"unknown restart rule {rule!r}; use one of {', '.join(RULES)}")
    if not scores:
        raise UnsegError("no restart to choose from")
    pool = [i for i, s in enumerate(scores) if s.foreground <= max_foreground] or list(
        range(len(scores))
    )
    if rule == "cut":
        return min(pool, key=lambda i: (scores[i].cut, i))
    return max(pool, key=lambda i: (scores[i].agreement, -i))


def orient_sign(border_score: float) -> float:
    """``-1.0`` when a map is brighter on its border ring than overall on average
    (``border_score`` > 0, :func:`unseg.methods.saliency.border_prior`), else ``1.0``."""
    return -1.0 if border_score > 0 else 1.0


def score_restarts(
    held_probs: list[torch.Tensor], cut: Callable[[torch.Tensor], float]
) -> list[RestartScore]:
    """:class:`RestartScore` of each restart from its held-back probabilities ``[M, h, w]``
    (oriented) and ``cut`` (probabilities ``[M, h, w]`` → the mean soft normalized cut)."""
    masks = torch.stack([p > 0.5 for p in held_probs])
    agree = mask_agreement(masks)
    return [
        RestartScore(
            cut=float(cut(p)), foreground=float(masks[i].float().mean()), agreement=float(agree[i])
        )
        for i, p in enumerate(held_probs)
    ]
