"""The FOUND-style saliency head (Siméoni et al., CVPR 2023, "Unsupervised Object Localization:
Observing the Background to Discover Objects"; reference code ``valeoai/FOUND``).

FOUND looks for the background, not the object: one background *seed* patch per image, the
background = the patches similar to it, the object = the rest; a single 1x1 conv on the frozen
patch features is trained against these pseudo-masks and predicts a foreground logit per patch.

- **Seed.** The reference takes the patch the ``[CLS]`` token attends to least (attention summed
  over heads, heads weighted by their sparsity). Our backbones give features, not attention maps
  (a CNN has none), so the seed is defined from the features: the patch with the largest mean
  cosine similarity to all patches (``seed_rule="degree"``: the most typical patch, the
  background being the large self-similar part of an image), or the same restricted to the outer
  ring of patches (``"border"``, default: objects rarely fill the border). Measured on the first
  200 ECSSD images with ``efficientnet_lite0`` ``s16+s32`` features at 320 (threshold 0.3): the
  seed lies in the ground-truth background for 92 % (``degree``) / 94 % (``border``) of the
  images, and the pseudo-masks reach IoU 0.43 / 0.46 with the ground truth. Similarity to the
  image's mean feature (the nearest analogue of ``[CLS]`` attention) put the seed in the object
  for 59 % of the images, so it is not offered.
- **Pseudo-mask.** Background = patches whose cosine similarity to the seed exceeds
  ``bkg_threshold`` (0.3, the reference's, for ViTs; 0.2 on CNN features, see below); with
  ``n_seeds = k > 1`` the similarity is the mean over the seed and its ``k − 1`` most similar
  patches (the paper's seed expansion; the reference configuration uses the seed alone). The
  reference refines pseudo-masks and predictions with a bilateral solver; here the guided filter
  of the Boosting paper stands in for it (``refine_targets``: the 0/1 mask upsampled to the
  image, guided-filtered, averaged back to the patch grid and thresholded at 0.5).
- **Threshold on CNN features** (``bkg_threshold=None``: the pipeline decides by the backbone,
  :func:`unseg.pipelines.saliency.saliency_config`). A CNN's features are non-negative, so their
  cosine similarities run higher than DINO's, and 0.3 calls most of an image foreground. On
  ``efficientnet_lite2`` ``s16+s32`` at 320, the raw pseudo-masks (``bench/found_threshold.py``:
  first 300 ECSSD images, IoU; 422 VOC2007 images, CorLoc) score 42.9 / 33.4 at 0.3, 48.7 / 35.1 at
  0.2, 47.1 / 35.1 at 0.25, and worse with every per-image rule tried (Otsu 40.1 / 31.0, the image's
  mean similarity 36.9 / 30.8, its 25 % quantile 44.1 / 31.3; similarities of mean-centred features,
  0.0: 34.9 / 30.3). Trained heads (5 seeds, ``bench/boosting_ablation.py``; trained on VOC2007 and
  scored on ECSSD IoU, trained on ECSSD and scored on VOC2007 CorLoc): 0.3 gives 47.99 ± 2.48 /
  33.22 ± 0.81 (70 % of VOC2007 called foreground), 0.25 gives 36.64 ± 0.95 CorLoc
  (still over 60 %), 0.2 gives 43.97 ± 1.55 / 46.21 ± 2.50 with no oversized map: the best mean
  over the two tasks (docs/results-boosting.md).
- **Training** (reference values): AdamW lr 5e-2, batch 50, step decay ×0.95 every 50 steps,
  500 steps; loss = 1.5 × BCE(prediction, its refined binarisation) + BCE(prediction,
  pseudo-mask) for the first 100 steps, then 4 × BCE(prediction, its own binarisation) instead of
  the pseudo-mask term (self-training).
- **Input scale** (``standardize``, our addition): the reference's lr 5e-2 was set for DINO's
  features. On a CNN's (``efficientnet_lite0`` ``s16+s32``, 3 training seeds,
  ``bench/boosting_ablation.py``) the head trained on VOC2007 on raw features called 86–98 % of
  ECSSD foreground (IoU 26.0 ± 1.9); with each channel standardised by its training-set mean and
  std, IoU 44.4 ± 1.6. Trained on ECSSD, it finds the VOC2007 object less often (CorLoc 31.4 ±
  0.7 against 39.3 ± 0.4 raw): neither wins both directions, but only the raw input fails
  outright (docs/results-boosting.md).
  The pipeline turns it on for backbones without a final LayerNorm (``None`` → decided there).
  The standardisation is folded into the conv after training (``w / s``, ``b − Σ w·m / s``): the
  saved head is the same plain 1x1 conv on raw features.
- **Ensemble** (``ensemble``, our addition; 1 is the reference): ``R`` heads trained with seeds
  ``R·seed … R·seed + R − 1`` on the same pseudo-masks, averaged into one 1x1 conv (the mean of
  their logits: the head is linear). One head is a lottery on CNN features: trained on VOC2007
  and scored on ECSSD, 15 seeds gave 42.6 ± 4.2 IoU (32.5 to 47.1); on ECSSD itself
  (``discover``'s transductive head) 54.5 ± 2.5. The mean of 5 (20 random 5-subsets of those
  15): 42.9 ± 1.9 and 56.3 ± 0.9; VOC07 CorLoc of heads trained on ECSSD 47.0 ± 2.5 → 47.0 ±
  1.0. Keeping the single head that agrees best with the others (as ``restarts`` does for the
  other head) or the best-agreeing three did no better over the three tasks
  (docs/results-boosting.md, "Five heads instead of one").
- **Prediction**: the patch logits upsampled bilinearly to the image, then the sigmoid; the guided
  filter (Boosting trick 1) is applied by the pipeline as for the other head.
- **Multi-scale consistency** (Boosting trick 2, ``multiscale``): as for the SEMPART-style head
  (:mod:`unseg.methods.multiscale`): MSE (weight 0.01) between the full prediction cropped to the
  box and the guided-filtered, detached prediction on the enlarged crop, plus the base loss on the
  crop (weight 0.01); crops from :mod:`unseg.methods.crop_cache` (``crop_mode``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unseg.data.color import as_float_images
from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, feature_moments, stack_crops
from unseg.methods.crop_cache import CropSource
from unseg.methods.head_base import HeadEstimator
from unseg.methods.head_config import HeadTrainingConfig
from unseg.methods.multiscale import consistency_loss
from unseg.refine.guided_filter import GreyGuides, GuidedFilterConfig, guided_filter, luminance
from unseg.registry import register
from unseg.utils.options import option

logger = logging.getLogger(__name__)

SeedRule = Literal["border", "degree"]

VIT_THRESHOLD = 0.3  # the reference's, for DINO's features
CNN_THRESHOLD = 0.2  # measured on efficientnet_lite2 s16+s32 (module docstring)


@dataclass
class FoundConfig(HeadTrainingConfig):
    """FOUND-style head settings; defaults are the reference's (``configs/found_DUTS-TR.yaml``);
    the multi-scale, guided-filter and seed fields are :class:`HeadTrainingConfig`'s."""

    seed_rule: SeedRule = option(
        "border",
        "background seed: the most typical patch of the border ring or of the whole grid",
    )
    bkg_threshold: float | None = option(
        None,
        "cosine similarity to the seed above which a patch is background (default: 0.3, the "
        "reference's, for ViTs; 0.2 for CNN backbones, measured)",
        at_least=-1, at_most=1,
    )
    n_seeds: int = option(
        1,
        "patches averaged as the background seed (the seed and its nearest)",
        at_least=1,
    )
    refine_targets: bool = option(
        True,
        "guided-filter the 0/1 targets (stands in for the bilateral solver)",
    )
    lr: float = option(5e-2, "AdamW learning rate", above=0)
    batch_size: int = option(50, "images per step", at_least=1)
    steps: int = option(500, "training steps (reference: 500)", at_least=1)
    lr_step: int = option(50, "steps between learning-rate decays", at_least=1)
    lr_gamma: float = option(0.95, "learning-rate decay factor", above=0, at_most=1)
    stop_bkg_loss: int = option(
        100,
        "steps trained on the pseudo-masks before self-training",
        at_least=0,
    )
    weight_refined: float = option(
        1.5,
        "weight of the loss against the refined own prediction",
        at_least=0,
    )
    weight_self: float = option(4.0, "weight of the self-training loss", at_least=0)
    standardize: bool | None = option(
        None,
        "standardise each input channel by its training-set mean and std (folded into the conv "
        "after training) (default: on for CNN backbones, off for ViTs, whose scale the "
        "reference's lr was set for)",
    )
    weight_crop_base: float = option(0.01, "weight of the base loss on the crop", at_least=0)
    ensemble: int = option(
        5,
        "heads averaged into one 1x1 conv (the mean of their logits), trained with seeds "
        "R*seed ... R*seed + R - 1",
        at_least=1,
    )


def _cosine(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → patch cosine similarities ``[B, N, N]`` (``N = h·w``)."""
    f = F.normalize(features.detach().float().flatten(2), dim=1)
    return f.transpose(1, 2) @ f


def border_ring(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """``[h·w]`` bool: the outer ring of an ``h x w`` grid (all of it when a side is < 3)."""
    ring = torch.ones(h, w, dtype=torch.bool, device=device)
    if min(h, w) > 2:
        ring[1:-1, 1:-1] = False
    return ring.flatten()


def background_seed(features: torch.Tensor, rule: SeedRule = "border") -> torch.Tensor:
    """Index ``[B]`` (into the flattened ``h·w`` grid) of each image's background seed patch.

    ``features`` ``[B, C, h, w]``; the seed is the patch of largest mean cosine similarity to all
    patches, among all patches (``"degree"``) or those of the outer ring (``"border"``).
    """
    if rule not in ("border", "degree"):
        raise UnsegError(f"unknown seed rule {rule!r}; use 'border' or 'degree'")
    h, w = features.shape[-2:]
    score = _cosine(features).mean(dim=-1)
    if rule == "border":
        ring = border_ring(h, w, score.device)
        score = score.masked_fill(~ring, float("-inf"))
    return score.argmax(dim=-1)


def background_similarity(
    features: torch.Tensor, seeds: torch.Tensor, n_seeds: int = 1
) -> torch.Tensor:
    """Similarity ``[B, h, w]`` of each patch to the background: its cosine similarity to the seed
    (``seeds`` ``[B]``), or the mean over the seed and its ``n_seeds − 1`` most similar patches."""
    if n_seeds < 1:
        raise UnsegError(f"n_seeds must be >= 1, got {n_seeds}")
    b, _, h, w = features.shape
    sim = _cosine(features)
    rows = sim[torch.arange(b, device=sim.device), seeds.to(sim.device)]
    if n_seeds > 1:
        group = rows.topk(min(n_seeds, rows.shape[-1]), dim=-1).indices
        rows = torch.gather(sim, 1, group[..., None].expand(-1, -1, sim.shape[-1])).mean(dim=1)
    return rows.view(b, h, w)


class Standardized(nn.Module):
    """A 1x1 ``conv`` on per-channel standardised input: ``conv((x − mean) / std)`` for ``x``
    ``[B, C, h, w]``; :meth:`folded` gives the same map as one plain conv on raw ``x``."""

    def __init__(self, conv: nn.Conv2d, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x - self.mean) / self.std)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """The plain conv with ``w / std`` and ``b − Σ w · mean / std``."""
        w = self.conv.weight / self.std.reshape(1, -1, 1, 1)
        out = nn.Conv2d(w.shape[1], w.shape[0], 1).to(w.device)
        out.weight.copy_(w)
        assert self.conv.bias is not None
        out.bias.copy_(self.conv.bias - (w * self.mean.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
        return out


def refine_binary(
    masks: torch.Tensor, guides: torch.Tensor, guided: GuidedFilterConfig
) -> torch.Tensor:
    """0/1 patch masks ``[B, 1, h, w]`` refined with their images' grey guides ``[B, 1, H, W]``
    (:func:`~unseg.refine.guided_filter.luminance` with ``guided.guide``): upsampled (nearest) to
    ``H x W``, guided-filtered (``guided``'s radius and ε), clipped to ``[0, 1]``, averaged back
    to ``h x w``, ``> 0.5``. ``guided.standardize`` is not applied: on 0/1 values it changes
    nothing in exact arithmetic (it keeps soft maps well conditioned), and the thresholded
    targets came out the same to the bit on the trained heads checked."""
    h, w = masks.shape[-2:]
    up = F.interpolate(masks.float(), size=guides.shape[-2:], mode="nearest")
    smooth = guided_filter(guides, up, guided.radius, guided.eps).clamp_(0.0, 1.0)
    return (F.adaptive_avg_pool2d(smooth, (h, w)) > 0.5).float()


def resolved_threshold(config: FoundConfig) -> float:
    """``config.bkg_threshold``, which the pipeline sets from the backbone when it is None
    (:data:`VIT_THRESHOLD` or :data:`CNN_THRESHOLD`); None outside the pipeline is the ViT's."""
    return VIT_THRESHOLD if config.bkg_threshold is None else config.bkg_threshold


def pseudo_masks(
    features: torch.Tensor, config: FoundConfig, guides: torch.Tensor | None = None
) -> torch.Tensor:
    """FOUND's foreground pseudo-masks ``[B, 1, h, w]`` (float 0/1) for ``features``
    ``[B, C, h, w]``: patches not similar to the background seed (see the module docstring);
    refined (:func:`refine_binary`) with the images' grey ``guides`` ``[B, 1, H, W]`` when
    ``config.refine_targets``."""
    seeds = background_seed(features, config.seed_rule)
    sim = background_similarity(features, seeds, config.n_seeds)
    fg = (sim <= resolved_threshold(config)).float()[:, None]
    if config.refine_targets and guides is not None:
        fg = refine_binary(fg, guides.to(fg.device), config.guided)
    return fg


@register(
    "found",
    config=FoundConfig,
    output="saliency",
    needs=("features", "images", "backbone"),
    summary="FOUND-style head: a 1x1 conv trained against background-seed pseudo-masks",
    aliases=("found-head",),
    feature_kind="keys",
    rank=40,
)
class FoundHead(HeadEstimator):
    """Estimator (contract of :mod:`unseg.methods.base`): ``fit(FitInputs)`` on the keys and the
    images, then ``predict_proba(features, images)``; ``feature_fn`` and ``collapse_`` as
    :class:`~unseg.methods.head_base.HeadEstimator`'s.
    """

    config_class = FoundConfig
    title = "the FOUND head"
    state_name = "FOUND-head"
    misfit = "saved FOUND-head weights do not fit"

    def __init__(
        self, config: FoundConfig | None = None, device: str | torch.device | None = None
    ) -> None:
        super().__init__(config, device)
        self.stride: int = 0

    def fit(self, inputs: FitInputs) -> FoundHead:
        """Train on ``inputs.features[i]`` ``[C, h, w]`` and ``inputs.images[i]`` ``[3, H, W]``
        (uint8 or ``[0, 1]``, one size for all, ``H = stride·h``); returns ``self``. With
        ``config.ensemble = R`` the R heads of seeds ``R·seed … R·seed + R − 1`` are averaged
        (two seeds share no member)."""
        features, images, self.stride = stack_crops(inputs, "FOUND head")
        c = self.config
        if c.ensemble < 1:
            raise UnsegError(f"ensemble must be >= 1 head, got {c.ensemble}")
        guides = GreyGuides(images, c.guided.guide, device=self.device)
        pseudo = self._pseudo_all(features, guides)
        members, histories = [], []
        for k in range(c.ensemble):
            seed = c.ensemble * c.seed + k
            if c.ensemble > 1:
                logger.info("head %d/%d (seed %d)", k + 1, c.ensemble, seed)
            net, history = self._train_one(features, images, guides, pseudo, seed)
            members.append(net)
            histories.append(history)
        self.net = mean_conv(members).eval()
        self.history_ = [sum(step) / len(step) for step in zip(*histories, strict=True)]
        self.after_fit(features, images)
        return self

    def _train_one(
        self,
        features: torch.Tensor,
        images: torch.Tensor,
        guides: GreyGuides,
        pseudo: torch.Tensor,
        seed: int,
    ) -> tuple[nn.Conv2d, list[float]]:
        """One head trained with ``seed`` on ``features`` ``[N, C, h, w]``, ``images`` ``[N, 3,
        H, W]`` (their grey ``guides``) and their pseudo-masks ``[N, 1, h, w]``: its plain 1x1
        conv and loss per step."""
        c = self.config
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        dev = self.device
        self.net = nn.Conv2d(features.shape[1], 1, 1).to(dev)
        if c.standardize:
            mean, std = feature_moments(features)
            self.net = Standardized(self.net, mean.to(dev), std.to(dev))
        crops = self.crop_source(images, gen)
        opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c.lr_step, gamma=c.lr_gamma)
        n, order, pos = features.shape[0], torch.empty(0, dtype=torch.long), 0
        history: list[float] = []
        for step in range(c.steps):
            if pos >= order.numel():
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + c.batch_size]
            pos += idx.numel()
            feats = features[idx].to(dev, torch.float32)
            imgs = None if crops is None else as_float_images(images[idx]).to(dev)
            loss = self.step_loss(idx, feats, guides[idx], pseudo[idx].to(dev), step,
                                  gen, crops, imgs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            if (step + 1) % c.lr_step == 0:
                logger.info("step %d/%d: loss %.4f", step + 1, c.steps, history[-1])
        net = self.net.folded() if isinstance(self.net, Standardized) else self.net
        return net, history

    def _pseudo_all(self, features: torch.Tensor, guides: GreyGuides) -> torch.Tensor:
        """Pseudo-masks ``[N, 1, h, w]`` of all training images (computed once: frozen features)
        from their features ``[N, C, h, w]`` and grey ``guides``."""
        c, out = self.config, []
        for i in range(0, features.shape[0], c.batch_size):
            f = features[i : i + c.batch_size].to(self.device, torch.float32)
            g = guides[i : i + c.batch_size]
            out.append(pseudo_masks(f, c, g).cpu())
        return torch.cat(out)

    def base_loss(
        self, logits: torch.Tensor, pseudo: torch.Tensor, guides: torch.Tensor, step: int
    ) -> torch.Tensor:
        """FOUND's loss at ``step`` for patch ``logits`` ``[B, 1, h, w]``, pseudo-masks ``[B, 1,
        h, w]`` and the images' grey guides ``[B, 1, H, W]`` (see the module docstring)."""
        c = self.config
        own = (torch.sigmoid(logits.detach()) > 0.5).float()
        loss = logits.new_zeros(())
        if c.weight_refined:
            target = refine_binary(own, guides, c.guided) if c.refine_targets else own
            loss = loss + c.weight_refined * F.binary_cross_entropy_with_logits(logits, target)
        if step < c.stop_bkg_loss:
            return loss + F.binary_cross_entropy_with_logits(logits, pseudo)
        return loss + c.weight_self * F.binary_cross_entropy_with_logits(logits, own)

    def step_loss(
        self,
        index: torch.Tensor,
        feats: torch.Tensor,
        guides: torch.Tensor,
        pseudo: torch.Tensor,
        step: int,
        generator: torch.Generator,
        crops: CropSource | None,
        imgs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of one batch: images ``index`` ``[B]`` of the training set, their
        features ``[B, C, h, w]``, grey guides ``[B, 1, H, W]`` and pseudo-masks ``[B, 1, h,
        w]``; with multi-scale consistency when ``crops`` is given (then ``imgs`` ``[B, 3, H,
        W]`` in ``[0, 1]``, the images themselves, are needed)."""
        c = self.config
        assert self.net is not None
        logits = self.net(feats)
        loss = self.base_loss(logits, pseudo, guides, step)
        if crops is None:
            return loss
        if imgs is None:
            raise UnsegError("multi-scale consistency needs the batch's images")
        boxes, crop_imgs, crop_feats = crops.crops(index, feats, imgs, generator)
        c_logits = self.net(crop_feats)
        c_guides = luminance(crop_imgs, c.guided.guide)
        c_pseudo = pseudo_masks(crop_feats, c, c_guides)
        crop_loss = self.base_loss(c_logits, c_pseudo, c_guides, step)
        size = tuple(imgs.shape[-2:])
        cons = consistency_loss(
            torch.sigmoid(_upsample(logits, size)),
            torch.sigmoid(_upsample(c_logits, size)),
            crop_imgs,
            boxes,
            c.guided,
        )
        return loss + c.weight_crop_base * crop_loss + c.weight_consistency * cons

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities ``[B, 1, H, W]`` (no guided filter) for features
        ``[B, C, h, w]`` and their images ``[B, 3, H, W]`` (only their size is used)."""
        logits = self.fitted_net()(features.to(self.device, torch.float32))
        return torch.sigmoid(_upsample(logits, tuple(images.shape[-2:])))

    @property
    def in_dim(self) -> int:
        """Channels of the features the fitted 1x1 conv takes."""
        return int(self.fitted_net().weight.shape[1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The 1x1 conv's ``weight`` ``[1, C, 1, 1]`` and ``bias`` ``[1]``, and ``stride``."""
        state = self.net_state()
        state["stride"] = torch.tensor(self.stride)
        return state

    def empty_net(self, state: dict[str, torch.Tensor]) -> nn.Conv2d:
        """The 1x1 conv that ``state``'s ``weight`` ``[1, C, 1, 1]`` fits; sets ``stride`` from
        ``state`` (popped; 0 when absent)."""
        weight = state.get("weight")
        if weight is None or weight.ndim != 4 or tuple(weight.shape[::2]) != (1, 1):
            raise UnsegError("FOUND-head state lacks a 1x1 conv weight [1, C, 1, 1]")
        self.stride = int(state.pop("stride", torch.tensor(0)))
        return nn.Conv2d(weight.shape[1], 1, 1)


@torch.no_grad()
def mean_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """The 1x1 conv whose output is the mean of ``convs``' outputs (``[1, C, 1, 1]`` each): the
    mean of their weights and of their biases (the map is linear)."""
    out = nn.Conv2d(convs[0].in_channels, convs[0].out_channels, 1).to(convs[0].weight.device)
    out.weight.copy_(torch.stack([c.weight for c in convs]).mean(0))
    assert all(c.bias is not None for c in convs)
    out.bias.copy_(torch.stack([c.bias for c in convs]).mean(0))  # type: ignore[misc]
    return out


def _upsample(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
