"""The 2-label dense CRF on foreground maps: against pydensecrf2 (the reference), shapes, and
properties checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crf_reference import needs_reference
from PIL import Image

from unseg.errors import UnsegError
from unseg.refine.crf import CRFConfig
from unseg.refine.saliency_crf import (
    SaliencyCRFConfig,
    crf_foreground,
    crf_foreground_reference,
    foreground_logits,
)


def object_case(edge: int = 20) -> tuple[np.ndarray, torch.Tensor]:
    """A bright square object (rows and columns ``edge``..``edge+24``) on a dark ground, and a
    blocky 0/1 mask on an 8-pixel grid that overshoots it by 4 pixels on every side."""
    image = np.full((64, 72, 3), 30, dtype=np.uint8)
    image[edge : edge + 24, edge : edge + 24] = (230, 190, 70)
    mask = torch.zeros(64, 72)
    mask[edge - 4 : edge + 28, edge - 4 : edge + 28] = 1.0
    return image, mask


def ecssd_case(shared_data, n: int = 2) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The first ``n`` ECSSD images (shrunk to 160 short side, a fast test) with a coarse
    mask: their ground truth on a 16-pixel grid, upsampled (nearest), as a patch grid gives."""
    root = shared_data("ECSSD")
    out = []
    for path in sorted((root / "images").glob("*.jpg"))[:n]:
        with Image.open(path) as img, Image.open(
            root / "ground_truth_mask" / f"{path.stem}.png"
        ) as gt:
            w, h = img.size
            size = (round(w * 160 / min(w, h)), round(h * 160 / min(w, h)))
            image = np.asarray(img.convert("RGB").resize(size))
            coarse = gt.convert("L").resize((size[0] // 16, size[1] // 16), Image.BILINEAR)
            mask = np.asarray(coarse.resize(size, Image.NEAREST)) >= 128
        out.append((image, torch.from_numpy(mask.astype(np.float32))))
    return out


def test_defaults_are_the_measured_setting() -> None:
    """eps 0.05, temperature 1, pydensecrf's example kernels (``pyd T1`` in
    bench/saliency_crf.py)."""
    config = SaliencyCRFConfig()
    assert config.crf == CRFConfig(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80,
                                   bilateral_srgb=13, bilateral_compat=10, label_floor=0.0)
    assert (config.eps, config.temperature) == (0.05, 1.0)


def test_logits_are_the_clipped_logit_over_the_temperature() -> None:
    prob = torch.tensor([[0.0, 0.5, 0.9, 1.0]])
    logits = foreground_logits(prob, eps=0.05, temperature=2.0)
    assert logits.shape == (2, 1, 4)
    assert torch.all(logits[0] == 0)
    expected = torch.tensor([np.log(0.05 / 0.95), 0.0, np.log(9.0), np.log(0.95 / 0.05)]) / 2
    assert torch.allclose(logits[1, 0], expected.float(), atol=1e-6)


@needs_reference
def test_matches_pydensecrf_on_a_blocky_mask() -> None:
    image, mask = object_case()
    semantic = SaliencyCRFConfig(temperature=2.0, gaussian_sxy=1, bilateral_sxy=67,
                                 bilateral_srgb=3, bilateral_compat=4)
    for config in (SaliencyCRFConfig(), semantic):
        ours = crf_foreground(mask, image, config).numpy()
        ref = crf_foreground_reference(mask, image, config)
        assert ours.shape == ref.shape == (64, 72)
        assert np.abs(ours - ref).mean() <= 1e-3
        assert ((ours > 0.5) == (ref > 0.5)).mean() >= 0.999


@needs_reference
def test_matches_pydensecrf_on_ecssd_images(shared_data) -> None:
    for image, mask in ecssd_case(shared_data):
        ours = crf_foreground(mask, image).numpy()
        ref = crf_foreground_reference(mask, image)
        assert np.abs(ours - ref).mean() <= 1e-3
        assert ((ours > 0.5) == (ref > 0.5)).mean() >= 0.999


def test_shape_range_and_device() -> None:
    image, mask = object_case()
    out = crf_foreground(mask * 0.7 + 0.1, image)
    assert out.shape == (64, 72) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert out.device == mask.device


def test_a_blocky_mask_snaps_to_the_object_edge() -> None:
    """The mask overshoots the object by 4 px on each side (a 28 % larger box's area): the CRF
    pulls it onto the colour edge, which the mask alone cannot see."""
    image, mask = object_case()
    truth = np.zeros((64, 72), dtype=bool)
    truth[20:44, 20:44] = True
    out = crf_foreground(mask, image).numpy() > 0.5
    iou = lambda m: (m & truth).sum() / (m | truth).sum()  # noqa: E731
    assert iou(mask.numpy() > 0.5) < 0.6
    assert iou(out) > 0.95


def test_a_confident_uniform_mask_stays_as_it_is() -> None:
    """Every pixel has the same unary, and the Potts terms only add agreement: all foreground
    stays all foreground (and grows surer than the clipped 0.95), all background stays empty."""
    image, _ = object_case()
    full = crf_foreground(torch.ones(64, 72), image)
    assert float(full.min()) >= 0.95
    empty = crf_foreground(torch.zeros(64, 72), image)
    assert float(empty.max()) <= 0.05


def test_swapping_foreground_and_background_mirrors_the_result(rng: np.random.Generator) -> None:
    """Potts compatibility treats the two labels alike: the CRF of ``1 − p`` is ``1 −`` the CRF
    of ``p``."""
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    prob = torch.from_numpy(rng.random((40, 48)).astype(np.float32))
    a = crf_foreground(prob, image)
    b = crf_foreground(1.0 - prob, image)
    assert torch.allclose(a, 1.0 - b, atol=1e-5)


def test_bad_input_is_a_clear_error() -> None:
    image, mask = object_case()
    with pytest.raises(UnsegError, match="differ in size"):
        crf_foreground(mask[:10], image)
    with pytest.raises(UnsegError, match=r"\[H, W\]"):
        foreground_logits(mask[None], 0.05, 1.0)
    with pytest.raises(UnsegError, match="eps"):
        crf_foreground(mask, image, SaliencyCRFConfig(eps=0.0))
    with pytest.raises(UnsegError, match="temperature"):
        crf_foreground(mask, image, SaliencyCRFConfig(temperature=0.0))
