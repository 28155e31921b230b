"""Saliency head: the soft NCut loss by hand, multi-scale consistency, training on planted data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs
from unseg.methods.multiscale import consistency_loss, crop_resize, sample_crops
from unseg.methods.ncut import key_affinity, soft_ncut_loss
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig, border_prior
from unseg.methods.saliency_head import SaliencyHeadNet

W3 = [[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]]


def test_ncut_loss_hard_partition_by_hand():
    w = torch.tensor([W3], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    # cut = 0.5 + 0.1; assoc(A) = d0 = 1.6; assoc(B) = d1 + d2 = 1.7 + 1.3
    expected = 0.6 / 1.6 + 0.6 / 3.0
    assert soft_ncut_loss(s, w).item() == pytest.approx(expected, rel=1e-7)


def test_ncut_loss_soft_by_explicit_sums():
    s = [0.8, 0.3, 0.1]
    cut = sum(s[i] * W3[i][j] * (1 - s[j]) for i in range(3) for j in range(3))
    deg = [sum(row) for row in W3]
    a = sum(s[i] * deg[i] for i in range(3))
    b = sum((1 - s[i]) * deg[i] for i in range(3))
    got = soft_ncut_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([W3]).double())
    assert got.item() == pytest.approx(cut / a + cut / b, rel=1e-7)


def test_ncut_loss_half_is_one_and_symmetric(rng):
    w = torch.from_numpy(rng.random((2, 6, 6)))
    w = (w + w.transpose(1, 2)) / 2
    half = torch.full((2, 6), 0.5, dtype=torch.float64)
    assert soft_ncut_loss(half, w).item() == pytest.approx(1.0)
    s = torch.from_numpy(rng.random((2, 6)))
    torch.testing.assert_close(soft_ncut_loss(s, w), soft_ncut_loss(1 - s, w))


def test_key_affinity_threshold():
    f = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.1, 1.0]]).view(1, 2, 1, 3)
    w = key_affinity(f, tau=0.4, eps=1e-6)[0]
    expected = torch.tensor([[1, 1, 1e-6], [1, 1, 1e-6], [1e-6, 1e-6, 1]])
    torch.testing.assert_close(w, expected)


def test_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(0)
    student_logits = torch.randn(2, 1, 16, 16, generator=gen, requires_grad=True)
    teacher_logits = torch.randn(2, 1, 16, 16, generator=gen, requires_grad=True)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    boxes = sample_crops(2, generator=gen)
    loss = consistency_loss(
        torch.sigmoid(student_logits), torch.sigmoid(teacher_logits), images, boxes
    )
    loss.backward()
    assert teacher_logits.grad is None
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0


def test_crops_are_uniformly_spread():
    gen = torch.Generator().manual_seed(1)
    boxes = sample_crops(20000, (0.3, 0.7), gen).double().numpy()
    top, left, side = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 1 + 1e-6).all() and (left + side <= 1 + 1e-6).all()
    assert stats.kstest((side - 0.3) / 0.4, "uniform").pvalue > 1e-3
    assert stats.kstest(top / (1 - side), "uniform").pvalue > 1e-3
    assert stats.kstest(left / (1 - side), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(top / (1 - side), left / (1 - side))[0, 1]) < 0.03
    # default half-side crops cover the whole range of positions
    half = sample_crops(5000, generator=gen).numpy()
    assert np.allclose(half[:, 2], 0.5)
    assert half[:, 0].min() < 0.01 and half[:, 0].max() > 0.49


def test_fixed_crop_reproduces_the_top_left_anchor():
    boxes = sample_crops(100, (0.5, 0.5), torch.Generator().manual_seed(0), fixed_crop=True)
    assert (boxes[:, :2] == 0).all() and torch.allclose(boxes[:, 2], torch.tensor(0.5))
    with pytest.raises(UnsegError):
        sample_crops(2, (0.0, 0.5))


def test_crop_resize_matches_slicing_and_interpolate():
    x = torch.arange(64.0).view(1, 1, 8, 8) ** 1.5
    boxes = torch.tensor([[0.25, 0.5, 0.5]])  # rows 2..5, cols 4..7
    got = crop_resize(x, boxes, (8, 8))
    ref = F.interpolate(x[..., 2:6, 4:8], size=(8, 8), mode="bilinear", align_corners=False)
    # the outermost output pixels sample half a pixel beyond the crop (neighbour vs clamp)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])


@pytest.mark.parametrize(("stride", "size"), [(16, (64, 80)), (14, (56, 70)), (8, (40, 48))])
def test_head_output_shapes(stride, size):
    net = SaliencyHeadNet(12, stride, dim=16, layers=1, heads=2)
    h, w = size[0] // stride, size[1] // stride
    coarse, fine = net(torch.randn(2, 12, h, w), torch.rand(2, 3, *size))
    assert coarse.shape == (2, 1, h, w) and fine.shape == (2, 1, *size)


def test_border_prior():
    p = torch.zeros(1, 1, 4, 4)
    p[..., 1:3, 1:3] = 1.0
    assert border_prior(p).item() == pytest.approx(-0.25)
    assert border_prior(1 - p).item() == pytest.approx(0.25)
    assert border_prior(torch.full((2, 1, 5, 5), 0.3)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("multiscale", [False, True])
def test_training_finds_planted_squares_and_roundtrips(planted_squares, stand_in, multiscale):
    colours = stand_in(8, std=1.0).forward_features
    gen = torch.Generator().manual_seed(0)
    images, truth = planted_squares(16, gen)
    feats = colours(images)
    # 20 epochs: at 12 the loss was still falling fast and the IoU sat 0.02 above the bound,
    # so float rounding alone (channels-last convolutions) moved it across
    cfg = SaliencyHeadConfig(
        epochs=20,
        lr=3e-3,
        batch_size=8,
        dim=16,
        layers=1,
        heads=2,
        multiscale=multiscale,
        crop_scale=(0.5, 0.8),
    )
    head = SaliencyHead(cfg)
    head.feature_fn = colours
    head.fit(FitInputs(list(feats), list(images)))
    assert head.history_[-1] < head.history_[0]
    probs = head.predict_proba(feats, images)
    pred = probs > 0.5
    iou = ((pred & (truth > 0)).sum() / (pred | (truth > 0)).sum()).item()
    assert iou > 0.4  # all-foreground scores 0.14, the flipped (background) mask 0
    again = SaliencyHead.from_state(cfg, head.state_dict())
    torch.testing.assert_close(again.predict_proba(feats, images), probs)


def test_fit_needs_the_backbone_for_multiscale():
    with pytest.raises(UnsegError, match="backbone"):
        SaliencyHead(SaliencyHeadConfig(multiscale=True)).fit(
            FitInputs([torch.zeros(4, 2, 2)] * 2, [torch.zeros(3, 32, 32)] * 2)
        )


def test_orient_undoes_an_inverted_cut(planted_squares, stand_in):
    colours = stand_in(8, std=1.0).forward_features
    gen = torch.Generator().manual_seed(0)
    images, _ = planted_squares(16, gen)
    feats = colours(images)
    cfg = SaliencyHeadConfig(epochs=12, lr=3e-3, batch_size=8, dim=16, layers=1, heads=2)
    head = SaliencyHead(cfg).fit(FitInputs(list(feats), list(images)))
    good = head.predict_proba(feats, images)
    assert not head.orient(feats, images)  # already the right way round
    head.net.polarity.neg_()  # simulate training that settled on the other side
    torch.testing.assert_close(head.predict_proba(feats, images), 1 - good, atol=1e-5, rtol=0)
    assert head.orient(feats, images)
    torch.testing.assert_close(head.predict_proba(feats, images), good)
    again = SaliencyHead.from_state(cfg, head.state_dict())
    torch.testing.assert_close(again.predict_proba(feats, images), good)
    state = head.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    with pytest.raises(UnsegError, match=f"saliency-head state: tensor '{name}' holds NaN"):
        SaliencyHead.from_state(cfg, state)
