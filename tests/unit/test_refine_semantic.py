"""Semantic refinement choices: none, CRF, guided filter, guided + CRF, against their parts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from unseg.errors import UnsegError
from unseg.refine.crf import dense_crf
from unseg.refine.semantic import (
    REFINES,
    RefineConfig,
    check_refine,
    guided_probs,
    refine_logits,
)

R, EPS = 9, 1e-3


def _scene(rng, h=40, w=56, k=4):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 60, 40)
    image[:, w // 2 :] = (30, 90, 210)
    image = np.clip(image + rng.integers(-15, 15, image.shape), 0, 255).astype(np.uint8)
    logits = torch.from_numpy(rng.normal(size=(k, h, w))).float()
    logits[0, :, : w // 2] += 2.0
    logits[1, :, w // 2 :] += 2.0
    return image, logits


def test_none_is_the_softmax_and_crf_is_the_dense_crf(rng):
    image, logits = _scene(rng)
    none = refine_logits(logits, image, RefineConfig("none"))
    torch.testing.assert_close(none, logits.softmax(0))
    crf = refine_logits(logits, image, RefineConfig("crf"))
    np.testing.assert_allclose(crf.numpy(), dense_crf(image, logits), atol=1e-6)


def test_guided_matches_opencv_guided_filter_per_channel(rng):
    """OpenCV's guided filter on each softmax channel with the BT.601 luma guide, clipped and
    renormalised. OpenCV mirrors the borders where we cut the window: mirroring the inputs by
    3r first makes the two conventions agree everywhere (see test_guided_filter)."""
    image, logits = _scene(rng)
    pad = 3 * R
    big = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    probs = logits.softmax(0)
    big_p = torch.from_numpy(np.pad(probs.numpy(), ((0, 0), (pad, pad), (pad, pad)), "symmetric"))
    ours = guided_probs(big_p, big, R, EPS)[:, pad:-pad, pad:-pad].numpy()
    guide = (big.astype(np.float32) / 255.0) @ np.array([0.299, 0.587, 0.114], np.float32)
    ref = np.stack([cv2.ximgproc.guidedFilter(guide, c, R, EPS) for c in big_p.numpy()])
    ref = np.clip(ref, 0, None)
    ref = (ref / ref.sum(0, keepdims=True))[:, pad:-pad, pad:-pad]
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    out = refine_logits(logits, image, RefineConfig("guided"))
    assert (out >= 0).all() and torch.allclose(out.sum(0), torch.ones(out.shape[1:]), atol=1e-5)


def test_guided_then_crf_feeds_the_filtered_probabilities_as_unary(rng):
    image, logits = _scene(rng)
    filtered = guided_probs(logits.softmax(0), image, R, EPS)
    expected = dense_crf(image, filtered.clamp_min(1e-8).log())
    got = refine_logits(logits, image, RefineConfig("guided+crf", subsample=1))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_bad_choices_and_shapes_are_clear_errors(rng):
    image, logits = _scene(rng)
    assert check_refine("guided") == "guided" and len(REFINES) == 4
    with pytest.raises(UnsegError, match="unknown refinement 'bilateral'"):
        check_refine("bilateral")
    with pytest.raises(UnsegError, match="at the image's size"):
        refine_logits(logits[:, :-1], image, RefineConfig("none"))


def test_fast_guided_refinement_is_close_to_the_exact_one():
    """``subsample=2`` (the fast guided filter) gives nearly the labels of the exact filter on a
    two-region image whose logits are blurred across the edge."""
    h, w = 64, 96
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2 :] = 200
    x = torch.linspace(-3, 3, w)
    logits = torch.stack([-x, x])[:, None, :].expand(2, h, w).contiguous()
    exact = refine_logits(logits, image, RefineConfig(mode="guided", subsample=1))
    fast = refine_logits(logits, image, RefineConfig(mode="guided", subsample=2))
    assert torch.equal(fast, refine_logits(logits, image, RefineConfig(mode="guided")))
    assert torch.allclose(fast.sum(dim=0), torch.ones(h, w), atol=1e-5)
    agree = (fast.argmax(0) == exact.argmax(0)).float().mean()
    assert agree > 0.98
