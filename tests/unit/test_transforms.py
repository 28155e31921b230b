"""Transforms: labels follow the image's geometry exactly; references from PIL, kornia, colorsys."""

from __future__ import annotations

import colorsys

import cv2
import kornia
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from unseg.data.transforms import (
    center_crop,
    color_jitter,
    gaussian_blur,
    hflip,
    hsv_to_rgb,
    random_resized_crop,
    resize_short_side,
    rgb_to_hsv,
    student_view,
)

BLOCK = 12


def blocks(h_blocks: int = 5, w_blocks: int = 7, seed: int = 0):
    """An image of constant-colour ``BLOCK``-pixel squares and its block-id label."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(h_blocks * w_blocks, 3, generator=g)
    ids = torch.arange(h_blocks * w_blocks).view(h_blocks, w_blocks)
    label = ids.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    image = palette[label].permute(2, 0, 1).contiguous()
    return image, label, palette


def assert_aligned(image: torch.Tensor, label: torch.Tensor, palette: torch.Tensor) -> None:
    """Inside each label region (away from its border) the image has that region's colour."""
    lab = label[None, None].float()
    same = torch.ones_like(label, dtype=torch.bool)
    r = 2
    padded = torch.nn.functional.pad(lab, (r, r, r, r), mode="replicate")[0, 0]
    h, w = label.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            same &= padded[r + dy : r + dy + h, r + dx : r + dx + w] == label
    assert same.sum() > 0.05 * same.numel(), "too few interior pixels to test"
    expected = palette[label].permute(2, 0, 1)
    err = (image - expected).abs().amax(0)[same]
    assert err.max() < 1e-4


@pytest.mark.parametrize("size", [17, 30, 60, 97])
def test_resize_short_side_keeps_alignment(size):
    image, label, palette = blocks()
    out, lab = resize_short_side(image, label, size)
    assert min(out.shape[1:]) == size and lab.shape == out.shape[1:]
    assert out.shape[2] == round(7 * BLOCK * size / (5 * BLOCK))
    assert lab.dtype == label.dtype
    if size >= 30:  # enough interior pixels to check
        assert_aligned(out, lab, palette)


def test_label_resize_matches_pil_nearest():
    lab = torch.randint(0, 21, (37, 53), generator=torch.Generator().manual_seed(1))
    image = torch.rand(3, 37, 53)
    _, out = resize_short_side(image, lab, 23)
    ref = Image.fromarray(lab.numpy().astype(np.uint8)).resize(
        (out.shape[1], out.shape[0]), Image.NEAREST
    )
    assert np.array_equal(out.numpy(), np.asarray(ref))


def test_image_resize_close_to_pil_bilinear():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    out, _ = resize_short_side(image, None, 20)
    ref = np.asarray(Image.fromarray(arr).resize((out.shape[2], out.shape[1]), Image.BILINEAR))
    diff = np.abs(out.permute(1, 2, 0).numpy() * 255 - ref.astype(float))
    assert diff.mean() < 1.0 and diff.max() < 4.0


def test_center_crop_is_central_slice():
    image, label, _ = blocks()
    out, lab = center_crop(image, label, (30, 40))
    top, left = (60 - 30) // 2, (84 - 40) // 2
    assert torch.equal(out, image[:, top : top + 30, left : left + 40])
    assert torch.equal(lab, label[top : top + 30, left : left + 40])
    with pytest.raises(ValueError, match="larger"):
        center_crop(image, label, 61)


def test_hflip_probability_and_alignment():
    image, label, palette = blocks()
    out, lab = hflip(image, label, p=1.0)
    assert torch.equal(out, image.flip(-1)) and torch.equal(lab, label.flip(-1))
    assert_aligned(out, lab, palette)
    same, _ = hflip(image, label, p=0.0)
    assert torch.equal(same, image)
    g = torch.Generator().manual_seed(0)
    flips = [not torch.equal(hflip(image, None, g)[0], image) for _ in range(200)]
    assert 60 < sum(flips) < 140


def test_random_resized_crop_alignment_and_determinism():
    image, label, palette = blocks()
    for seed in range(5):
        out, lab = random_resized_crop(
            image, label, torch.Generator().manual_seed(seed), 64, scale=(0.3, 1.0)
        )
        assert out.shape == (3, 64, 64) and lab.shape == (64, 64)
        assert_aligned(out, lab, palette)
        again, lab2 = random_resized_crop(
            image, label, torch.Generator().manual_seed(seed), 64, scale=(0.3, 1.0)
        )
        assert torch.equal(out, again) and torch.equal(lab, lab2)


def test_random_resized_crop_full_area_is_a_resize():
    image, label, _ = blocks()
    ratio = (84 / 60, 84 / 60)
    out, lab = random_resized_crop(image, label, None, (30, 42), scale=(1.0, 1.0), ratio=ratio)
    ref, ref_lab = resize_short_side(image, label, 30)
    assert torch.allclose(out, ref) and torch.equal(lab, ref_lab)


def test_rgb_hsv_against_colorsys_and_kornia():
    x = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(2))
    x[:, 0, 0] = 0.5  # grey: hue and saturation 0
    hsv = rgb_to_hsv(x)
    for i, j in [(0, 0), (3, 4), (8, 10)]:
        ref = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
        assert np.allclose(hsv[:, i, j].tolist(), ref, atol=1e-6)
    k = kornia.color.rgb_to_hsv(x[None])[0]
    assert torch.allclose(hsv[0] * 2 * torch.pi, k[0], atol=1e-5)
    assert torch.allclose(hsv[1:], k[1:], atol=1e-6)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-6)


def test_color_jitter_keeps_label_and_range():
    image, label, _ = blocks()
    g = torch.Generator().manual_seed(0)
    out, lab = color_jitter(image, label, g)
    assert lab is label and out.shape == image.shape
    assert 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, image)
    a, _ = color_jitter(image, None, torch.Generator().manual_seed(5))
    b, _ = color_jitter(image, None, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_color_jitter_brightness_only_scales():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    out, _ = color_jitter(image, None, torch.Generator().manual_seed(0), 0.4, 0.0, 0.0, 0.0)
    ratio = out / image
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
    assert 0.6 <= ratio.flatten()[0] <= 1.4


def test_hue_shift_matches_colorsys():
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(9)
    shift = -0.2 + 0.4 * torch.rand((), generator=torch.Generator().manual_seed(9)).item()
    out, _ = color_jitter(image, None, g, 0.0, 0.0, 0.0, 0.2)
    h, s, v = colorsys.rgb_to_hsv(*image[:, 1, 2].tolist())
    ref = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    assert np.allclose(out[:, 1, 2].tolist(), ref, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_opencv(sigma: float):
    image = torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(1))
    out = gaussian_blur(image, sigma, 21)
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    ref = cv2.GaussianBlur(hwc, (21, 21), sigmaX=sigma, sigmaY=sigma,
                           borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_gaussian_blur_on_images_smaller_than_the_kernel_matches_scipy():
    image = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = gaussian_blur(image, 1.5, 21)
    # truncate = radius / sigma gives scipy's kernel radius 10; "mirror" is reflect-101
    ref = gaussian_filter(image.numpy(), sigma=(0, 1.5, 1.5), mode="mirror", truncate=10 / 1.5)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)
    flat = gaussian_blur(torch.full((3, 1, 5), 0.3), 2.0)
    torch.testing.assert_close(flat, torch.full((3, 1, 5), 0.3))


def test_student_view_is_seeded_and_leaves_geometry_unchanged():
    image, _, _ = blocks()
    views = [student_view(image, torch.Generator().manual_seed(s)) for s in range(8)]
    again = [student_view(image, torch.Generator().manual_seed(s)) for s in range(8)]
    for a, b in zip(views, again, strict=True):
        assert torch.equal(a, b)
        assert a.shape == image.shape and a.dtype == image.dtype
        assert 0 <= a.min() and a.max() <= 1
    assert not torch.equal(views[0], views[1])
    for s in range(8):  # photometric only: it commutes with mirroring and transposing
        flipped = student_view(image.flip(-1), torch.Generator().manual_seed(s))
        torch.testing.assert_close(flipped, views[s].flip(-1), atol=1e-6, rtol=0)
        turned = student_view(image.transpose(1, 2), torch.Generator().manual_seed(s))
        torch.testing.assert_close(turned, views[s].transpose(1, 2), atol=1e-6, rtol=0)


def test_student_view_branch_frequencies():
    """Blur always; jitter with probability ½·0.3, greyscale with ½·0.1, else the blur alone."""
    image = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(6))
    n = 600
    counts = {"blur": 0, "jitter": 0, "grey": 0}
    for s in range(n):
        sigma = 0.1 + 1.9 * torch.rand((), generator=torch.Generator().manual_seed(s)).item()
        blurred = gaussian_blur(image, sigma)
        out = student_view(image, torch.Generator().manual_seed(s))
        if torch.equal(out, blurred):
            counts["blur"] += 1
        elif torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]):
            counts["grey"] += 1
        else:
            counts["jitter"] += 1
    assert abs(counts["jitter"] / n - 0.15) < 0.06
    assert abs(counts["grey"] / n - 0.05) < 0.035
    assert counts["blur"] + counts["jitter"] + counts["grey"] == n
