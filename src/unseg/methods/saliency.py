"""The trainable saliency head (SEMPART-style base of the Boosting paper), scikit-learn style.

Trained without labels on frozen patch features (attention keys) and the images:

- base loss: soft normalized cut (affinity 1 where key cosine > τ = 0.4, ε = 1e-6 elsewhere) of
  the fine prediction max-pooled to patch resolution, plus ``weight_coarse`` × the same loss on
  the coarse (patch-level) prediction, plus ``weight_agree`` × the squared difference between
  the coarse prediction and the fine one average-pooled to patches (the max-pooled cut alone
  is satisfied by one bright pixel per patch; SEMPART couples its coarse and fine masks too);
- border prior (our addition, ``weight_border``): the mean foreground probability of the outer
  ring of patches minus the mean over all patches. The cut is symmetric in foreground and
  background; this small term fixes which side the head calls foreground (objects rarely fill
  the image border) and is zero for constant maps, so it does not pull towards an empty mask;
- polarity: after training, :meth:`SaliencyHead.orient` negates the output once if the model
  calls the border foreground on average over the training images (the prior alone does not
  always win; see docs/results-boosting.md);
- restarts (``restarts`` > 1, our addition): short trainings of the patch-level part, one kept
  by a label-free rule, before the ``epochs`` of the whole head (:mod:`unseg.methods.restarts`;
  ``epochs=0`` keeps the chosen cut upsampled through the zero-initialised stages); the scores
  are in ``restarts_``;
- multi-scale consistency (``multiscale=True``, the Boosting trick): see
  :mod:`unseg.methods.multiscale`; weight 0.01 for the MSE and 0.01 for the cut on the crop.
  The crops' features come from :mod:`unseg.methods.crop_cache` (``crop_mode``: by default a
  pool of ``crop_pool`` crops per image through the backbone once, before the first epoch);
- failure check: after training, ``collapse_`` holds the
  :class:`~unseg.methods.collapse.CollapseReport` of the maps on the training images (a warning
  is logged when the head diverged or collapsed to a trivial map).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from unseg.data.color import as_float_images
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, stack_crops
from unseg.methods.collapse import CollapseConfig
from unseg.methods.crop_cache import CropSource
from unseg.methods.head_base import HeadEstimator
from unseg.methods.head_config import HeadTrainingConfig
from unseg.methods.multiscale import consistency_loss
from unseg.methods.ncut import key_affinity, soft_ncut_loss
from unseg.methods.restarts import (
    RestartScore,
    Rule,
    choose,
    holdout_split,
    orient_sign,
    score_restarts,
)
from unseg.methods.saliency_head import SaliencyHeadNet
from unseg.registry import register
from unseg.utils.options import option
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class SaliencyHeadConfig(HeadTrainingConfig):
    """Training and inference settings; defaults are the Boosting/SEMPART reference values; the
    multi-scale, guided-filter and seed fields are :class:`HeadTrainingConfig`'s."""

    lr: float = option(1e-4, "AdamW learning rate", above=0)
    batch_size: int = option(8, "images per step", at_least=1)
    epochs: int = option(30, "training epochs (paper: 30; 0 with --restarts: the kept restart's "
                         "cut alone)", at_least=0)
    tau: float = option(0.4, "key-affinity threshold τ of the cut", at_least=-1, at_most=1)
    eps: float = option(1e-6, "affinity below τ", at_least=0)
    dim: int = option(128, "head width", at_least=1)
    layers: int = option(2, "transformer layers of the head", at_least=1)
    heads: int = option(4, "attention heads", at_least=1)
    weight_coarse: float = option(1.0, "weight of the cut on the coarse prediction", at_least=0)
    weight_agree: float = option(1.0, "weight of the coarse/fine agreement", at_least=0)
    weight_border: float = option(0.1, "weight of the border prior", at_least=0)
    weight_crop_ncut: float = option(0.01, "weight of the cut on the crop", at_least=0)
    restarts: int = option(
        1,
        "short restarts of the patch-level cut, one kept by a label-free rule "
        "(unseg.methods.restarts; 1: none)",
        at_least=1,
    )
    restart_steps: int = option(150, "training steps of each restart", at_least=1)
    restart_holdout: float = option(
        0.1, "share of the training images held back to choose the restart", at_least=0, below=1
    )
    restart_rule: Rule = option(
        "agreement",
        "which restart is kept: agreement (the partition most restarts find) or cut "
        "(the lowest normalized cut on the held-back images)",
    )


def border_prior(probs: torch.Tensor) -> torch.Tensor:
    """Mean of ``probs`` ``[B, 1, h, w]`` over the outer ring of cells minus its mean over all
    cells (scalar in ``[-1, 1]``; 0 for a constant map, so it never favours an empty mask)."""
    ring = torch.ones_like(probs[0, 0], dtype=torch.bool)
    if min(ring.shape) > 2:
        ring[1:-1, 1:-1] = False
    return (probs[..., ring].mean(dim=-1) - probs.flatten(1).mean(dim=-1, keepdim=True)).mean()


@register(
    "saliency-head",
    config=SaliencyHeadConfig,
    output="saliency",
    needs=("features", "images", "backbone"),
    summary="SEMPART-style saliency head trained with the soft normalized cut",
    aliases=("saliency", "head"),
    feature_kind="keys",
    rank=30,
)
class SaliencyHead(HeadEstimator):
    """Estimator under the contract of :mod:`unseg.methods.base`: ``fit(FitInputs)`` on the
    attention keys and the images, then ``predict_proba(features, images)``; ``feature_fn`` and
    ``collapse_`` as :class:`~unseg.methods.head_base.HeadEstimator`'s.
    """

    config_class = SaliencyHeadConfig
    title = "the saliency head"
    state_name = "saliency-head"
    misfit = "saved saliency-head weights do not fit its config"

    def __init__(
        self, config: SaliencyHeadConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        super().__init__(config, device)
        self.restarts_: list[RestartScore] = []

    def _build(self, in_dim: int, stride: int) -> SaliencyHeadNet:
        c = self.config
        return SaliencyHeadNet(in_dim, stride, c.dim, c.layers, c.heads)

    def base_loss(
        self, coarse: torch.Tensor, fine: torch.Tensor, affinity: torch.Tensor
    ) -> torch.Tensor:
        """Soft-NCut of the max-pooled fine and the coarse prediction, plus the border prior."""
        c = self.config
        h, w = coarse.shape[-2:]
        pooled = F.adaptive_max_pool2d(torch.sigmoid(fine), (h, w))
        loss = soft_ncut_loss(pooled.flatten(1), affinity)
        coarse_p = torch.sigmoid(coarse)
        if c.weight_coarse:
            loss = loss + c.weight_coarse * soft_ncut_loss(coarse_p.flatten(1), affinity)
        if c.weight_agree:
            mean_fine = F.adaptive_avg_pool2d(torch.sigmoid(fine), (h, w))
            loss = loss + c.weight_agree * F.mse_loss(mean_fine, coarse_p)
        if c.weight_border:
            loss = loss + c.weight_border * border_prior(pooled)
        return loss

    def fit(self, inputs: FitInputs) -> SaliencyHead:
        """Train on ``inputs.features[i] [C, h, w]`` (keys) and ``inputs.images[i] [3, H, W]``
        (uint8 or ``[0, 1]``, one size for all, ``H = stride·h``); returns ``self``."""
        features, images, stride = stack_crops(inputs, "saliency head")
        return self._fit(features, images, stride)

    def _fit(self, features: torch.Tensor, images: torch.Tensor, stride: int) -> SaliencyHead:
        c = self.config
        dev = self.device
        gen = torch.Generator().manual_seed(c.seed)
        torch.manual_seed(c.seed)
        crops = self.crop_source(images, gen, batch_size=c.batch_size)
        self.net = self._start(features, stride, gen)
        opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr)
        n = features.shape[0]
        self.history_ = []
        for epoch in range(c.epochs):
            order = torch.randperm(n, generator=gen)
            total, steps = 0.0, 0
            batches = [order[i : i + c.batch_size] for i in range(0, n, c.batch_size)]
            for idx in progress(batches, total=len(batches), desc=f"epoch {epoch + 1}"):
                feats = features[idx].to(dev, torch.float32)
                imgs = as_float_images(images[idx]).to(dev)
                loss = self.step_loss(idx, feats, imgs, gen, crops)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            self.history_.append(total / max(steps, 1))
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, c.epochs, self.history_[-1])
        self.net.eval()
        self.orient(features, images)
        self.after_fit(features, images)
        return self

    def _start(self, features: torch.Tensor, stride: int, gen: torch.Generator) -> SaliencyHeadNet:
        """The network training starts from: a fresh one, or with ``restarts`` > 1 the restart
        :mod:`unseg.methods.restarts` keeps (its scores in ``restarts_``)."""
        c = self.config
        self.restarts_ = []
        if c.restarts < 1:
            raise UnsegError(f"restarts must be >= 1, got {c.restarts}")
        if c.restarts == 1:
            return self._build(features.shape[1], stride).to(self.device)
        train, held = holdout_split(features.shape[0], c.restart_holdout, gen)
        held_f = features[held].to(self.device, torch.float32)
        nets, probs = [], []
        for r in range(c.restarts):
            net = self._short_restart(features, train, stride, gen, r)
            with torch.no_grad():
                logits = torch.cat([net.coarse_logits(f) for f in held_f.split(c.batch_size)])
                sign = orient_sign(float(border_prior(torch.sigmoid(logits))))
            if sign < 0:
                net.polarity.neg_()
            nets.append(net)
            probs.append(torch.sigmoid(logits * sign)[:, 0])
        affinity = key_affinity(held_f, c.tau, c.eps)
        scores = score_restarts(probs, lambda p: float(soft_ncut_loss(p.flatten(1), affinity)))
        k = choose(scores, c.restart_rule, CollapseConfig().max_typical_foreground)
        self.restarts_ = [replace(s, chosen=i == k) for i, s in enumerate(scores)]
        logger.info(
            "kept restart %d of %d (%s rule): %s", k + 1, c.restarts, c.restart_rule,
            ", ".join(f"cut {s.cut:.3f} fg {s.foreground:.0%} agree {s.agreement:.2f}"
                      for s in scores),
        )
        return nets[k].train()

    def _short_restart(
        self, features: torch.Tensor, train: torch.Tensor, stride: int, gen: torch.Generator,
        index: int,
    ) -> SaliencyHeadNet:
        """Restart ``index``: a fresh network whose patch-level part is trained for
        ``restart_steps`` steps on the ``train`` images with the coarse cut and border prior."""
        c = self.config
        torch.manual_seed(c.seed * 1009 + index)
        net = self._build(features.shape[1], stride).to(self.device)
        opt = torch.optim.AdamW(net.parameters(), lr=c.lr)
        order, pos = train[torch.randperm(train.numel(), generator=gen)], 0
        for _ in range(c.restart_steps):
            if pos >= order.numel():
                order, pos = train[torch.randperm(train.numel(), generator=gen)], 0
            idx = order[pos : pos + c.batch_size]
            pos += idx.numel()
            feats = features[idx].to(self.device, torch.float32)
            probs = torch.sigmoid(net.coarse_logits(feats))
            loss = soft_ncut_loss(probs.flatten(1), key_affinity(feats, c.tau, c.eps))
            if c.weight_border:
                loss = loss + c.weight_border * border_prior(probs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return net.eval()

    @torch.no_grad()
    def orient(self, features: torch.Tensor, images: torch.Tensor) -> bool:
        """Fix which side of the cut is foreground, once for the model; returns True if flipped.

        The cut is symmetric, so training may settle on either side; if the coarse prediction
        over ``features`` ``[N, C, h, w]`` is on average brighter on the border ring than over
        the whole grid (:func:`border_prior` > 0), the output is negated from then on.
        """
        net = self.fitted_net()
        dev = next(net.parameters()).device
        total, n = 0.0, features.shape[0]
        for i in range(0, n, self.config.batch_size):
            f = features[i : i + self.config.batch_size].to(dev, torch.float32)
            x = as_float_images(images[i : i + self.config.batch_size]).to(dev)
            coarse, _ = net(f, x)
            total += float(border_prior(torch.sigmoid(coarse))) * f.shape[0]
        flipped = total / max(n, 1) > 0
        if flipped:
            net.polarity.neg_()
            logger.info("the head's cut came out inverted (border brighter); output negated")
        return flipped

    def step_loss(
        self,
        index: torch.Tensor,
        feats: torch.Tensor,
        imgs: torch.Tensor,
        gen: torch.Generator,
        crops: CropSource | None,
    ) -> torch.Tensor:
        """The training loss of one batch: images ``index`` ``[B]`` of the training set, their
        features ``[B, C, h, w]`` and images ``[B, 3, H, W]`` in ``[0, 1]``; with multi-scale
        consistency when ``crops`` is given."""
        c = self.config
        assert self.net is not None
        coarse, fine = self.net(feats, imgs)
        loss = self.base_loss(coarse, fine, key_affinity(feats, c.tau, c.eps))
        if crops is None:
            return loss
        boxes, crop_imgs, crop_feats = crops.crops(index, feats, imgs, gen)
        crop_feats = crop_feats.to(feats.dtype)
        c_coarse, c_fine = self.net(crop_feats, crop_imgs)
        crop_loss = self.base_loss(c_coarse, c_fine, key_affinity(crop_feats, c.tau, c.eps))
        cons = consistency_loss(
            torch.sigmoid(fine), torch.sigmoid(c_fine), crop_imgs, boxes, c.guided
        )
        return loss + c.weight_crop_ncut * crop_loss + c.weight_consistency * cons

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities ``[B, 1, H, W]`` (no guided filter) for ``[B, C, h, w]``
        features and their ``[B, 3, H, W]`` images."""
        net = self.fitted_net()
        dev = next(net.parameters()).device
        _, fine = net(features.to(dev, torch.float32), as_float_images(images).to(dev))
        return torch.sigmoid(fine)

    @property
    def in_dim(self) -> int:
        """Channels of the features the fitted network takes."""
        return int(self.fitted_net().proj.in_channels)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's weights and its ``in_dim`` and ``stride`` (int64 scalars), on the CPU."""
        state = self.net_state()
        state["in_dim"] = torch.tensor(self.net.proj.in_channels)
        state["stride"] = torch.tensor(self.net.stride)
        return state

    def empty_net(self, state: dict[str, torch.Tensor]) -> SaliencyHeadNet:
        """The network of this config for ``state``'s ``in_dim`` and ``stride`` (popped)."""
        try:
            in_dim, stride = int(state.pop("in_dim")), int(state.pop("stride"))
        except KeyError as exc:
            raise UnsegError(f"saliency-head state lacks tensor {exc}") from None
        return self._build(in_dim, stride)
