"""Crop cache: cached crops give the same loss as the backbone on the crop; RoI-align; files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unseg.errors import InputFileError, UnsegError
from unseg.methods.crop_cache import (
    CropCache,
    CropSource,
    build_crop_cache,
    crop_images,
    roi_crop_features,
)
from unseg.methods.found import FoundConfig, FoundHead, pseudo_masks
from unseg.methods.multiscale import sample_crops
from unseg.methods.saliency import SaliencyHead, SaliencyHeadConfig
from unseg.methods.saliency_head import SaliencyHeadNet
from unseg.refine.guided_filter import luminance


def _backbone(images: torch.Tensor) -> torch.Tensor:
    """A frozen stand-in backbone at stride 8: a fixed 3x3 conv, ReLU, 8x8 average pooling."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 3, 3, 3, generator=gen)
    return F.avg_pool2d(F.relu(F.conv2d(images - 0.5, weight, padding=1)), 8) - 0.1


def _images(n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return (torch.rand(n, 3, 48, 48, generator=gen) * 255).round().to(torch.uint8)


class _Direct:
    """The reference path: the same boxes, but the backbone run on each crop when asked."""

    def __init__(self, boxes: torch.Tensor) -> None:
        self.boxes = boxes

    def crops(self, index, features, images, generator):
        crops = crop_images(images, self.boxes)
        return self.boxes, crops, _backbone(crops)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_cached_crop_gives_the_same_loss_as_the_backbone_on_the_crop(dtype, tol):
    images = _images()
    feats = _backbone(images.float() / 255)
    cache = build_crop_cache(images, _backbone, pool=3, generator=torch.Generator().manual_seed(0),
                             scale_range=(0.4, 0.7), batch_size=4, dtype=dtype)
    index = torch.tensor([4, 1, 2])
    boxes, cached = cache.draw(index, torch.Generator().manual_seed(5))
    imgs = images[index].float() / 255
    direct = _backbone(crop_images(images[index], boxes))
    torch.testing.assert_close(cached, direct, atol=tol, rtol=tol)

    head = FoundHead(FoundConfig(multiscale=True, refine_targets=False))
    head.net = torch.nn.Conv2d(6, 1, 1)
    torch.nn.init.normal_(head.net.weight, generator=torch.Generator().manual_seed(1))
    source = CropSource("roi", images, None, 1, (0.5, 0.5), False, torch.Generator())
    source.cache = cache
    pseudo = pseudo_masks(feats[index], head.config)
    losses = []
    for crops in (source, _Direct(boxes)):
        losses.append(head.step_loss(index, feats[index], luminance(imgs), pseudo, 0,
                                     torch.Generator().manual_seed(5), crops, imgs))
    torch.testing.assert_close(losses[0], losses[1], atol=tol, rtol=tol)
    assert losses[0] > 0


def test_saliency_head_cached_crop_loss_matches_the_backbone_on_the_crop():
    images = _images()
    feats = _backbone(images.float() / 255)
    cache = build_crop_cache(images, _backbone, pool=2, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float32)
    index = torch.tensor([0, 5, 3])
    boxes, _ = cache.draw(index, torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    head = SaliencyHead(SaliencyHeadConfig(multiscale=True, dim=8, layers=1, heads=2))
    head.net = SaliencyHeadNet(6, 8, 8, 1, 2)
    source = CropSource("roi", images, None, 1, (0.5, 0.5), False, torch.Generator())
    source.cache = cache
    imgs = images[index].float() / 255
    losses = [
        head.step_loss(index, feats[index], imgs, torch.Generator().manual_seed(9), crops)
        for crops in (source, _Direct(boxes))
    ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    base = head.step_loss(index, feats[index], imgs, torch.Generator(), None)
    assert not torch.allclose(base, losses[0])  # the crop terms are there


def test_cache_boxes_are_seeded_and_fixed_crop_is_top_left():
    images = _images(4)
    a = build_crop_cache(images, _backbone, 2, (0.5, 0.8), torch.Generator().manual_seed(0))
    b = build_crop_cache(images, _backbone, 2, (0.5, 0.8), torch.Generator().manual_seed(0))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.features, b.features)
    assert a.boxes.shape == (4, 2, 3) and a.features.shape == (4, 2, 6, 6, 6)
    assert a.features.dtype == torch.float16
    fixed = build_crop_cache(images, _backbone, 2, generator=torch.Generator(), fixed_crop=True)
    assert torch.all(fixed.boxes[..., :2] == 0) and torch.all(fixed.boxes[..., 2] == 0.5)
    with pytest.raises(UnsegError, match="at least one crop"):
        build_crop_cache(images, _backbone, 0)


def test_draw_covers_the_pool_uniformly():
    cache = CropCache(torch.arange(2 * 4 * 3.0).view(2, 4, 3), torch.zeros(2, 4, 1, 1, 1))
    boxes, _ = cache.draw(torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    counts = torch.bincount((boxes[:, 0] / 3).long(), minlength=4)
    assert counts.min() > 900 and counts.max() < 1100  # 1000 each expected, sd ~27


def test_roi_features_of_the_whole_box_and_of_a_quarter_by_hand():
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 5, 8, 8, generator=gen)
    whole = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    torch.testing.assert_close(roi_crop_features(fmap, whole), fmap, atol=1e-5, rtol=0)
    quarter = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.5, 0.5]])
    got = roi_crop_features(fmap, quarter)
    # the map upsampled x2 as a whole, then cut: inside the crop, samples near its edge see the
    # cells beyond it, as RoI-align does
    up = F.interpolate(fmap, scale_factor=2, mode="bilinear", align_corners=False)
    expected = torch.cat([up[:1, :, :8, :8], up[1:, :, 8:, 8:]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["roi", "backbone"])
def test_uncached_modes_give_fresh_boxes_and_matching_features(mode):
    images = _images(3)
    imgs = images.float() / 255
    feats = _backbone(imgs)
    source = CropSource(mode, images, _backbone, 1, (0.5, 0.5), False, torch.Generator())
    boxes, crops, crop_feats = source.crops(torch.arange(3), feats, imgs,
                                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(boxes, sample_crops(3, (0.5, 0.5), torch.Generator().manual_seed(0)))
    torch.testing.assert_close(crops, crop_images(images, boxes))
    expected = roi_crop_features(feats, boxes) if mode == "roi" else _backbone(crops)
    torch.testing.assert_close(crop_feats, expected)
    with pytest.raises(UnsegError, match="backbone"):
        CropSource("cache", images, None, 1, (0.5, 0.5), False, torch.Generator())
    with pytest.raises(UnsegError, match="unknown crop mode"):
        CropSource("nope", images, None, 1, (0.5, 0.5), False, torch.Generator())  # type: ignore[arg-type]


def test_save_load_roundtrip_and_bad_files(tmp_path):
    cache = build_crop_cache(_images(3), _backbone, 2, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "crops.safetensors"
    cache.save(path)
    again = CropCache.load(path)
    assert torch.equal(again.boxes, cache.boxes) and torch.equal(again.features, cache.features)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError, match=r"bad\.safetensors"):
        CropCache.load(bad)
    with pytest.raises(InputFileError, match=r"missing\.safetensors"):
        CropCache.load(tmp_path / "missing.safetensors")
