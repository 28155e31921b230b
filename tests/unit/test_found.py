"""FOUND-style head: background seed and pseudo-mask by brute force, training on planted data."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.errors import UnsegError
from unseg.methods.base import FitInputs, feature_moments
from unseg.methods.found import (
    FoundConfig,
    FoundHead,
    Standardized,
    background_seed,
    background_similarity,
    border_ring,
    mean_conv,
    pseudo_masks,
    refine_binary,
)
from unseg.refine.guided_filter import GuidedFilterConfig, luminance, refine_masks


def _planted_features(
    h: int, w: int, box: tuple[int, int, int, int], noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[1, 8, h, w]``: background ≈ e0, the object box (top, left, bottom, right) ≈ e1,
    plus Gaussian noise; and the object's truth ``[h, w]`` (bool)."""
    gen = torch.Generator().manual_seed(seed)
    f = noise * torch.randn(1, 8, h, w, generator=gen)
    truth = torch.zeros(h, w, dtype=torch.bool)
    t, lft, b, r = box
    truth[t:b, lft:r] = True
    f[0, 0] += (~truth).float()
    f[0, 1] += truth.float()
    return f, truth


def _brute_seed(f: np.ndarray, ring_only: bool) -> int:
    """Index of the patch of largest mean cosine similarity, by explicit loops."""
    _, h, w = f.shape
    vecs = [f[:, i, j] / np.linalg.norm(f[:, i, j]) for i in range(h) for j in range(w)]
    best, best_score = -1, -np.inf
    for k, v in enumerate(vecs):
        i, j = divmod(k, w)
        if ring_only and 0 < i < h - 1 and 0 < j < w - 1:
            continue
        score = sum(float(v @ u) for u in vecs) / len(vecs)
        if score > best_score:
            best, best_score = k, score
    return best


@pytest.mark.parametrize("rule", ["border", "degree"])
def test_seed_matches_brute_force_and_lies_in_the_background(rule):
    f, truth = _planted_features(8, 10, (2, 3, 6, 7))
    seed = background_seed(f, rule)
    assert seed.shape == (1,)
    assert int(seed) == _brute_seed(f[0].numpy().astype(np.float64), rule == "border")
    assert not truth.flatten()[seed].item()


def test_border_rule_survives_an_object_larger_than_the_background():
    # the object covers 6x6 of 8x8 cells: the most typical patch is in the object
    f, truth = _planted_features(8, 8, (1, 1, 7, 7))
    assert truth.flatten()[background_seed(f, "degree")].item()
    assert not truth.flatten()[background_seed(f, "border")].item()


def test_pseudo_mask_is_the_planted_object():
    f, truth = _planted_features(8, 10, (2, 3, 6, 7))
    cfg = FoundConfig(refine_targets=False)
    mask = pseudo_masks(f, cfg)
    assert mask.shape == (1, 1, 8, 10)
    assert torch.equal(mask[0, 0].bool(), truth)
    # threshold semantics by hand: background = cosine to the seed above the threshold;
    # unresolved (no backbone to decide), the threshold is the reference's 0.3
    sim = background_similarity(f, background_seed(f, "border"))[0]
    assert torch.equal(mask[0, 0].bool(), sim <= 0.3)
    for t in (-0.5, 0.0, 0.5, 0.99):
        mask = pseudo_masks(f, replace(cfg, bkg_threshold=t))
        assert torch.equal(mask[0, 0].bool(), sim <= t)


def test_seed_expansion_is_the_mean_over_the_nearest_patches():
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(2, 5, 4, 6, generator=gen)
    seeds = torch.tensor([3, 17])
    got = background_similarity(f, seeds, n_seeds=4)
    x = F.normalize(f.flatten(2), dim=1).double()
    for b in range(2):
        sim = x[b].T @ x[b]
        row = sim[seeds[b]]
        group = np.argsort(-row.numpy(), kind="stable")[:4]
        expected = sim[torch.from_numpy(group.copy())].mean(dim=0).view(4, 6)
        torch.testing.assert_close(got[b].double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        background_similarity(f, seeds, 1)[1].flatten(), (x[1].T @ x[1])[17].float(),
        atol=1e-5, rtol=0,
    )


def test_refine_binary_is_the_standardised_refinement_of_the_upsampled_mask():
    """Against the general path (``refine_masks``: the upsampled 0/1 mask standardised, filtered
    with the images' luminance, restored, clipped; then averaged per patch and > 0.5): the same
    targets wherever the reference's patch average is not within rounding of 0.5, and the
    refinement moves the object's edge off the patch grid it came on."""
    gen = torch.Generator().manual_seed(4)
    stride, h, w = 8, 12, 14
    images = torch.full((3, 3, h * stride, w * stride), 0.2)
    for i in range(3):  # a bright disc off the patch grid, on noise
        yy, xx = torch.meshgrid(torch.arange(h * stride), torch.arange(w * stride), indexing="ij")
        disc = (yy - 40 - 5 * i) ** 2 + (xx - 50 + 3 * i) ** 2 < (25 + 3 * i) ** 2
        images[i, :, disc] = 0.8
    images = (images + 0.05 * torch.rand(images.shape, generator=gen)).clamp(0, 1)
    masks = F.adaptive_avg_pool2d(images[:, :1], (h, w)).gt(0.5).float()
    masks[:, :, 2:4, 1:3] = 1 - masks[:, :, 2:4, 1:3]  # wrong patches the image contradicts
    cfg = GuidedFilterConfig()
    up = F.interpolate(masks, size=images.shape[-2:], mode="nearest")
    ref_avg = F.adaptive_avg_pool2d(refine_masks(up, images, cfg), (h, w))
    ours = refine_binary(masks, luminance(images, cfg.guide), cfg)
    decided = (ref_avg - 0.5).abs() > 1e-4
    assert decided.float().mean() > 0.99
    assert torch.equal(ours[decided], (ref_avg > 0.5).float()[decided])
    assert ours.shape == masks.shape and not torch.equal(ours, masks)


def test_border_ring():
    ring = border_ring(4, 5).view(4, 5)
    assert ring.sum() == 4 * 5 - 2 * 3 and not ring[1:3, 1:4].any()
    assert border_ring(2, 7).all()


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return ((pred & truth).sum() / (pred | truth).sum()).item()


@pytest.mark.parametrize("multiscale", [False, True])
def test_head_learns_the_planted_object_and_roundtrips(planted_squares, stand_in, multiscale):
    colours = stand_in(8, std=1.0).forward_features
    gen = torch.Generator().manual_seed(0)
    images, truth = planted_squares(16, gen)
    feats = colours(images)
    cfg = FoundConfig(
        steps=60, batch_size=8, stop_bkg_loss=30, lr_step=20, multiscale=multiscale,
        crop_scale=(0.5, 0.8), crop_pool=2,
    )
    head = FoundHead(cfg)
    head.feature_fn = colours
    head.fit(FitInputs(list(feats), list((images * 255).round().to(torch.uint8))))
    assert len(head.history_) == 60
    probs = head.predict_proba(feats, images)
    assert probs.shape == (16, 1, 64, 64)
    # patch-level targets cap the pixel IoU (ideal patch masks: 0.71); all-foreground: 0.14
    assert _iou(probs > 0.5, truth > 0) > 0.5
    patch_truth = F.adaptive_avg_pool2d(truth, (8, 8)) > 0.5
    patch_pred = F.adaptive_avg_pool2d(probs, (8, 8)) > 0.5
    assert (patch_pred == patch_truth).float().mean() > 0.95
    assert head.collapse_ is not None and not head.collapse_.failed
    again = FoundHead.from_state(cfg, head.state_dict())
    torch.testing.assert_close(again.predict_proba(feats, images), probs)


def test_fit_is_deterministic_given_the_seed(planted_squares, stand_in):
    colours = stand_in(8, std=1.0).forward_features
    images, _ = planted_squares(8, torch.Generator().manual_seed(2))
    inputs = FitInputs(list(colours(images)), list(images))
    cfg = FoundConfig(steps=6, batch_size=4, stop_bkg_loss=3, multiscale=True, crop_pool=2)
    runs = []
    for seed in (0, 0, 1):
        head = FoundHead(replace(cfg, seed=seed))
        head.feature_fn = colours
        runs.append(head.fit(inputs).history_)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_ensemble_is_the_mean_of_the_heads_of_consecutive_seeds(planted_squares, stand_in):
    """``ensemble=3`` at seed 2 gives the conv whose logits are the mean of the three single heads
    trained with seeds 6, 7, 8 (each one as ``ensemble=1`` trains it); its loss history is
    theirs averaged per step."""
    colours = stand_in(8, std=1.0).forward_features
    images, _ = planted_squares(8, torch.Generator().manual_seed(3))
    feats = colours(images)
    inputs = FitInputs(list(feats), list((images * 255).round().to(torch.uint8)))
    cfg = FoundConfig(steps=8, batch_size=4, stop_bkg_loss=4, lr_step=4, ensemble=1)
    singles = [FoundHead(replace(cfg, seed=s)).fit(inputs) for s in (6, 7, 8)]
    both = FoundHead(replace(cfg, seed=2, ensemble=3)).fit(inputs)
    logits = torch.stack([h.fitted_net()(feats) for h in singles]).mean(0)
    torch.testing.assert_close(both.fitted_net()(feats), logits, atol=1e-6, rtol=1e-5)
    expected = [sum(v) / 3 for v in zip(*(h.history_ for h in singles), strict=True)]
    np.testing.assert_allclose(both.history_, expected, rtol=1e-6)
    assert singles[0].history_ != singles[1].history_  # the members differ
    assert isinstance(both.net, torch.nn.Conv2d) and both.collapse_ is not None
    with pytest.raises(UnsegError, match="ensemble"):
        FoundHead(replace(cfg, ensemble=0)).fit(inputs)


def test_mean_conv_averages_the_outputs():
    gen = torch.Generator().manual_seed(1)
    convs = [torch.nn.Conv2d(5, 1, 1) for _ in range(4)]
    x = torch.randn(2, 5, 3, 4, generator=gen)
    expected = sum(c(x) for c in convs) / 4
    torch.testing.assert_close(mean_conv(convs)(x), expected, atol=1e-6, rtol=1e-5)


def test_fit_rejects_bad_inputs():
    with pytest.raises(UnsegError, match="images"):
        FoundHead().fit(FitInputs([torch.zeros(4, 2, 2)]))
    with pytest.raises(UnsegError, match="multiple"):
        FoundHead().fit(FitInputs([torch.zeros(4, 2, 2)], [torch.zeros(3, 32, 30)]))
    with pytest.raises(UnsegError, match="backbone"):
        FoundHead(FoundConfig(multiscale=True)).fit(
            FitInputs([torch.zeros(4, 2, 2)] * 2, [torch.zeros(3, 32, 32)] * 2)
        )
    with pytest.raises(UnsegError, match="not fitted"):
        FoundHead().predict_proba(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 32, 32))
    with pytest.raises(UnsegError, match="1x1 conv"):
        FoundHead.from_state(FoundConfig(), {"bias": torch.zeros(1)})
    with pytest.raises(UnsegError, match="FOUND-head state: tensor 'weight' holds NaN"):
        FoundHead.from_state(FoundConfig(), {"weight": torch.full((1, 4, 1, 1), float("nan")),
                                             "bias": torch.zeros(1)})


def test_standardized_conv_folds_into_the_same_plain_conv():
    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 1, 1)
    mean, std = torch.randn(6, generator=gen), 0.1 + torch.rand(6, generator=gen)
    x = torch.randn(3, 6, 5, 7, generator=gen)
    wrapped = Standardized(conv, mean, std)
    expected = conv((x - mean.view(1, 6, 1, 1)) / std.view(1, 6, 1, 1))
    torch.testing.assert_close(wrapped(x), expected)
    folded = wrapped.folded()
    assert isinstance(folded, torch.nn.Conv2d)
    torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)


def test_channel_stats_match_numpy():
    x = torch.randn(7, 4, 3, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 5
    mean, std = feature_moments(x)
    flat = x.permute(1, 0, 2, 3).reshape(4, -1).double().numpy()
    np.testing.assert_allclose(mean.numpy(), flat.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), flat.std(axis=1), rtol=1e-5)


def test_standardized_training_ignores_the_features_scale(planted_squares, stand_in):
    """With ``standardize`` the head's maps do not depend on the features' scale (the pseudo-
    masks are cosine-based, the conv sees standardised input); without it they do."""
    colours = stand_in(8, std=1.0).forward_features
    images, _ = planted_squares(8, torch.Generator().manual_seed(5))
    feats = colours(images)
    u8 = list((images * 255).round().to(torch.uint8))
    cfg = FoundConfig(steps=12, batch_size=4, stop_bkg_loss=6, lr_step=5)
    probs = {}
    for std in (True, False):
        for scale in (1.0, 30.0):
            head = FoundHead(replace(cfg, standardize=std))
            head.fit(FitInputs(list(feats * scale), u8))
            assert isinstance(head.net, torch.nn.Conv2d)  # the saved head is a plain conv
            probs[std, scale] = head.predict_proba(feats * scale, images)
    torch.testing.assert_close(probs[True, 1.0], probs[True, 30.0], atol=1e-3, rtol=0)
    assert (probs[False, 1.0] - probs[False, 30.0]).abs().max() > 0.05


def test_pipeline_standardizes_cnn_features_only(tmp_path, monkeypatch):
    """``standardize=None`` and ``bkg_threshold=None`` are decided by the backbone: on and 0.2
    without a final LayerNorm, off and the reference's 0.3 with one; a given threshold stays."""
    import unseg.pipelines.saliency as pipeline
    from unseg.pipelines.folder import fit

    seen = []

    def fake_fit(spec, cfg, inputs, model, dev, timings):
        seen.append((cfg.standardize, cfg.bkg_threshold))
        raise UnsegError("stop here")

    monkeypatch.setattr(pipeline, "fit_estimator", fake_fit)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(d / "a.png")
    for name, layer_normed in (("cnn", False), ("vit", True)):
        model = SimpleNamespace(spec=SimpleNamespace(name=name, layer_normed=layer_normed),
                                stride=16)
        monkeypatch.setattr(pipeline, "open_backbone", lambda *a, m=model: m)
        monkeypatch.setattr(
            pipeline, "_training_inputs", lambda *a: (FitInputs([torch.zeros(2, 4, 4)]), [d])
        )
        for given in (None, 0.45):
            with pytest.raises(UnsegError, match="stop here"):
                fit(d, tmp_path / name, "found", options={"bkg_threshold": given})
    assert seen == [(True, 0.2), (True, 0.45), (False, 0.3), (False, 0.45)]
