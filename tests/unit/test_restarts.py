"""Short restarts of the saliency head's cut and the label-free choice among them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.methods.restarts import (
    RestartScore,
    choose,
    holdout_split,
    mask_agreement,
    orient_sign,
)
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig
from unseg.methods.saliency_head import SaliencyHeadNet


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def test_mask_agreement_is_the_mean_pairwise_iou_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 3, 5, 6, generator=gen) > 0.5
    masks[1, 2] = False
    masks[3, 2] = False  # two empty masks agree fully
    got = mask_agreement(masks)
    for r in range(4):
        want = sum(
            _iou(masks[r, m], masks[o, m]) for o in range(4) if o != r for m in range(3)
        ) / (3 * 3)
        assert got[r].item() == pytest.approx(want, rel=1e-6)
    assert mask_agreement(masks[:1]).tolist() == [1.0]
    with pytest.raises(UnsegError, match="expected masks"):
        mask_agreement(masks[0])


def test_agreement_keeps_the_partition_most_restarts_find():
    square = torch.zeros(1, 8, 8, dtype=torch.bool)
    square[:, 2:6, 2:6] = True
    masks = torch.stack([square, square, ~square, square.roll(1, -1)])
    agree = mask_agreement(masks)
    assert int(agree.argmax()) in (0, 1) and int(agree.argmin()) == 2


def test_choose_by_rule_and_passes_over_oversized():
    scores = [
        RestartScore(cut=0.30, foreground=0.8, agreement=0.9),  # oversized
        RestartScore(cut=0.40, foreground=0.3, agreement=0.7),
        RestartScore(cut=0.35, foreground=0.2, agreement=0.6),
    ]
    assert choose(scores, "agreement", 0.6) == 1
    assert choose(scores, "cut", 0.6) == 2
    assert choose(scores, "cut", 0.9) == 0
    everything_big = [RestartScore(0.5, 0.9, 0.1), RestartScore(0.4, 0.95, 0.2)]
    assert choose(everything_big, "agreement", 0.6) == 1  # all oversized: the rule decides
    with pytest.raises(UnsegError, match="unknown restart rule"):
        choose(scores, "best", 0.6)  # type: ignore[arg-type]
    with pytest.raises(UnsegError, match="no restart"):
        choose([], "cut", 0.6)


def test_holdout_split_partitions_or_falls_back_to_all():
    gen = torch.Generator().manual_seed(0)
    train, held = holdout_split(100, 0.1, gen)
    assert len(held) == 10 and len(train) == 90
    assert sorted(torch.cat([train, held]).tolist()) == list(range(100))
    train, held = holdout_split(40, 0.1, gen)  # at least 8 held back
    assert len(held) == 8 and not set(train.tolist()) & set(held.tolist())
    train, held = holdout_split(20, 0.1, gen)  # too few to hold any back: all in both
    assert sorted(train.tolist()) == sorted(held.tolist()) == list(range(20))
    with pytest.raises(UnsegError, match="held-back share"):
        holdout_split(10, 1.0, gen)


def test_orient_sign():
    assert orient_sign(0.1) == -1.0 and orient_sign(-0.1) == 1.0 and orient_sign(0.0) == 1.0


def test_coarse_logits_equal_the_forward_coarse_output():
    net = SaliencyHeadNet(12, 8, dim=16, layers=1, heads=2)
    feats, images = torch.randn(2, 12, 5, 6), torch.rand(2, 3, 40, 48)
    net.polarity.neg_()
    torch.testing.assert_close(net.coarse_logits(feats), net(feats, images)[0])


def _restart_cfg(**kw) -> SaliencyHeadConfig:
    base = dict(epochs=2, lr=3e-3, batch_size=8, dim=16, layers=1, heads=2, restarts=3,
                restart_steps=20, restart_holdout=0.25)
    return SaliencyHeadConfig(**{**base, **kw})


def test_restarts_keep_one_and_the_fit_is_deterministic(planted_squares, stand_in):
    colours = stand_in(8, std=1.0).forward_features
    gen = torch.Generator().manual_seed(0)
    images, truth = planted_squares(40, gen)
    feats = colours(images)
    inputs = FitInputs(list(feats), list(images))
    head = SaliencyHead(_restart_cfg()).fit(inputs)
    assert len(head.restarts_) == 3 and sum(s.chosen for s in head.restarts_) == 1
    chosen = next(s for s in head.restarts_ if s.chosen)
    assert all(chosen.agreement >= s.agreement for s in head.restarts_ if s.foreground <= 0.6)
    pred = head.predict_proba(feats, images) > 0.5
    iou = ((pred & (truth > 0)).sum() / (pred | (truth > 0)).sum()).item()
    assert iou > 0.4
    again = SaliencyHead(_restart_cfg()).fit(inputs)
    probs = head.predict_proba(feats, images)
    torch.testing.assert_close(again.predict_proba(feats, images), probs)
    assert [s.as_dict() for s in again.restarts_] == [s.as_dict() for s in head.restarts_]


def test_restarts_without_further_epochs_predict_the_upsampled_coarse_cut(
    planted_squares, stand_in
):
    colours = stand_in(8, std=1.0).forward_features
    gen = torch.Generator().manual_seed(1)
    images, _ = planted_squares(24, gen)
    feats = colours(images)
    head = SaliencyHead(_restart_cfg(epochs=0)).fit(FitInputs(list(feats), list(images)))
    assert all(float(st.to_logit.weight.detach().abs().sum()) == 0 for st in head.net.stages)
    coarse, fine = head.net(feats, images)
    # the stages' logit corrections start at zero: the fine logit is the coarse one upsampled
    # (bilinearly, stage by stage), so it lies between the coarse logits' extremes
    assert fine.min() >= coarse.min() - 1e-5 and fine.max() <= coarse.max() + 1e-5
    upsampled = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear")
    assert (fine - upsampled).abs().mean() < 0.1 * coarse.abs().mean()
    assert head.history_ == [] and head.collapse_ is not None


def test_restarts_must_be_positive():
    with pytest.raises(UnsegError, match="restarts must be"):
        SaliencyHead(_restart_cfg(restarts=0)).fit(
            FitInputs([torch.zeros(2, 4, 4)] * 2, [torch.zeros(3, 32, 32)] * 2)
        )
