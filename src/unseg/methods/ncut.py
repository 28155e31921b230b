"""The soft normalized-cut loss on a patch affinity graph (the SEMPART / Boosting base loss).

For foreground probabilities ``s`` on the ``N`` patches and affinity ``W`` with degrees ``d``,
``Ncut(s) = cut(s, 1 − s) / assoc(s) + cut(s, 1 − s) / assoc(1 − s)`` with
``cut = sᵀ W (1 − s)`` and ``assoc(s) = sᵀ d``; for a hard 0/1 ``s`` it is Shi and Malik's
normalized cut. Both sides enter symmetrically, so the loss alone cannot tell foreground from
background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_affinity(features: torch.Tensor, tau: float = 0.4, eps: float = 1e-6) -> torch.Tensor:
    """``[B, C, h, w]`` features → ``[B, N, N]`` affinity (1 where cosine > ``tau``, else ``eps``).

    No gradient flows through the graph (it is built from frozen features).
    """
    f = F.normalize(features.detach().flatten(2), dim=1)
    sim = f.transpose(1, 2) @ f
    return torch.where(sim > tau, torch.ones_like(sim), torch.full_like(sim, eps))


def soft_ncut_loss(probs: torch.Tensor, affinity: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean soft normalized cut of ``probs`` ``[B, N]`` in ``[0, 1]`` on ``affinity`` ``[B, N, N]``.

    Returns a scalar in ``[0, 2]``: 0 for a perfect split of disconnected parts, 1 for ``s ≡ ½``.
    """
    s = probs.unsqueeze(-1)
    t = 1.0 - s
    deg = affinity.sum(dim=-1, keepdim=True)
    cut = (s.transpose(1, 2) @ affinity @ t).squeeze(-1).squeeze(-1)
    assoc_s = (s * deg).sum(dim=(1, 2))
    assoc_t = (t * deg).sum(dim=(1, 2))
    return (cut / (assoc_s + eps) + cut / (assoc_t + eps)).mean()
