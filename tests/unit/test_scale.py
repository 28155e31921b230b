"""Bounded memory for any image size: the working resolution (max_side), reduced JPEG decoding,
tiled upsampling of the class probabilities, the per-file pixel limit, fast label writing (the
commands at these sizes: tests/cli/test_scale_cli.py)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.data.image import image_size, load_image
from unseg.data.resize import (
    decode_size,
    resize_image,
    resolve_max_side,
    target_size,
    upsample_argmax,
)
from unseg.errors import InputFileError
from unseg.features import extract_features
from unseg.pipelines.folder import MaskWriter
from unseg.pipelines.kind import Prediction
from unseg.pipelines.label_maps import overlay_image
from unseg.utils.batch import BatchReport
from unseg.utils.io import save_png_atomic
from unseg.utils.overlays import overlay
from unseg.utils.palette import png_palette


def _one_piece(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(0).numpy()


@pytest.mark.parametrize("k", [2, 5, 21])
@pytest.mark.parametrize(
    "shape", [(40, 56, 150, 201), (24, 32, 99, 151), (40, 40, 123, 77), (7, 5, 1, 3)]
)
@pytest.mark.parametrize("tile", [1, 5000, None])
def test_tiled_upsampling_equals_the_one_piece_argmax(k, shape, tile) -> None:
    h, w, big_h, big_w = shape
    g = torch.Generator().manual_seed(k * 1000 + h)
    kw = {} if tile is None else {"tile": tile}
    probs = torch.rand(k, h, w, generator=g).softmax(0)
    got = upsample_argmax(probs, (big_h, big_w), **kw)
    assert got.dtype == np.uint8 and got.shape == (big_h, big_w)
    assert np.array_equal(got, _one_piece(probs, (big_h, big_w)))
    # exact ties (quantised probabilities): the first class wins, as in argmax
    tied = (torch.rand(k, h, w, generator=g) * 4).round() / 4
    assert np.array_equal(upsample_argmax(tied, (big_h, big_w), **kw),
                          _one_piece(tied, (big_h, big_w)))


def test_tiled_upsampling_keeps_classes_above_255_and_identity_size() -> None:
    probs = torch.rand(300, 6, 9, generator=torch.Generator().manual_seed(1))
    got = upsample_argmax(probs, (6, 9), tile=50)
    assert got.dtype == np.int64
    assert np.array_equal(got, probs.argmax(0).numpy())  # same size: no interpolation at all


def test_max_side_caps_the_long_side_and_leaves_normal_images_alone() -> None:
    # hand-computed: 480x48 at short side 32 would be 320 long; capped to 128, the short
    # side follows (48 * 128 / 480 = 12.8 → 16 at stride 8)
    assert target_size(48, 480, 32, 8) == (32, 320)
    assert target_size(48, 480, 32, 8, max_side=128) == (16, 128)
    assert target_size(480, 48, 32, 8, max_side=128) == (128, 16)
    for h, w in [(300, 400), (375, 500), (500, 333), (320, 1280), (100, 100)]:
        assert target_size(h, w, 320, 32, max_side=1280) == target_size(h, w, 320, 32)
    assert target_size(2000, 100000, 320, 32, max_side=1280) == (32, 1280)
    assert resolve_max_side(320, None) == 1280
    assert resolve_max_side(320, 0) is None and resolve_max_side(320, 500) == 500


def test_feature_map_follows_max_side_and_the_cache_key_tells_them_apart(
    stand_in, smooth_photo, tmp_path
) -> None:
    path = smooth_photo(tmp_path / "pano.png", 48, 480)
    model = stand_in(8)
    capped = extract_features([path], model, size=32, max_side=128, cache_dir=tmp_path / "c")
    free = extract_features([path], model, size=32, cache_dir=tmp_path / "c")
    assert capped.image_size(path) == (16, 128) and capped.shape_of(path) == (6, 2, 16)
    assert free.image_size(path) == (32, 320) and free.shape_of(path) == (6, 4, 40)
    assert capped.original_size(path) == free.original_size(path) == (48, 480)
    assert capped.cache_dir != free.cache_dir
    index = json.loads((capped.cache_dir / "index.json").read_text())
    assert index["max_side"] == 128


def test_big_jpegs_are_decoded_at_a_reduced_scale_at_least_the_working_size(
    stand_in, smooth_photo, tmp_path
) -> None:
    path = smooth_photo(tmp_path / "big.jpg", 1200, 1600)
    need = decode_size(1200, 1600, 96, 32)
    small = load_image(path, min_size=need)
    assert small.shape == (150, 200, 3)  # DCT scale 1/8, still >= the need
    assert small.shape[0] >= need[0] and small.shape[1] >= need[1]
    full = load_image(path)
    assert full.shape == (1200, 1600, 3)
    a = resize_image(small, 96, 32, source_size=(1200, 1600))
    b = resize_image(full, 96, 32)
    assert a.shape == b.shape == (3, 96, 128)
    assert (a.float() - b.float()).abs().mean() < 2.0  # the same picture, resampled otherwise
    feats = extract_features([path], stand_in(8), size=96, extras=("image",))
    assert feats.original_size(path) == (1200, 1600)
    assert feats.image_size(path) == (96, 128)
    assert torch.equal(feats.extra(path, "image"), a)


def test_pillow_default_bomb_is_refused_by_name_without_warnings(tmp_path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 9000)).save(path)  # 108 MP: over Pillow's limit, a small file
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputFileError, match=r"huge.png: image too large: 12000x9000"):
            image_size(path)
        with pytest.raises(InputFileError, match=r"pass --max-pixels 108000000 or more"):
            load_image(path)
        assert image_size(path, max_pixels=0) == (9000, 12000)
        assert image_size(path, max_pixels=108_000_000) == (9000, 12000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_said_so(stand_in, smooth_photo, tmp_path) -> None:
    path = smooth_photo(tmp_path / "locked.png", 20, 30)
    path.chmod(0)
    try:
        for read in (load_image, image_size):
            with pytest.raises(InputFileError, match="permission denied"):
                read(path)
        feats = extract_features([path], stand_in(8), size=32)
        assert "permission denied" in feats.report.failed[0][1]
    finally:
        path.chmod(0o644)


def test_label_png_has_the_same_pixels_and_palette_and_the_overlay_its_size(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 7, (90, 130), generator=g).numpy().astype(np.uint8)
    image = (torch.rand(3, 30, 44, generator=g) * 255).byte()
    writer = MaskWriter(tmp_path / "out", tmp_path, True, True, BatchReport())
    writer.write(Prediction(tmp_path / "x.jpg", labels, image))
    save_png_atomic(tmp_path / "ref.png", labels, palette=png_palette())
    with Image.open(tmp_path / "out" / "masks" / "x.png") as a, \
            Image.open(tmp_path / "ref.png") as b:
        assert a.mode == b.mode == "P"
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert a.getpalette() == b.getpalette()
    with Image.open(tmp_path / "out" / "overlays" / "x.jpg") as jpg:
        assert jpg.size == (130, 90) and jpg.format == "JPEG"
    # the blend, before JPEG: the image upscaled bilinearly and mixed half and half with the
    # label colours, as the float reference does it to within rounding
    big = F.interpolate(image[None].float(), size=labels.shape, mode="bilinear",
                        align_corners=False)[0].round().clamp(0, 255).byte()
    want = overlay(big.permute(1, 2, 0).numpy(), labels).astype(int)
    mask = Image.fromarray(labels).convert("P")
    mask.putpalette(png_palette())
    got = np.asarray(overlay_image(image, mask)).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 2


def test_discover_masks_respect_the_pixel_limit(smooth_photo, tmp_path) -> None:
    from unseg.pipelines.saliency import saliency_maps

    path = smooth_photo(tmp_path / "a.png", 80, 100)

    def prob(image: np.ndarray) -> torch.Tensor:
        return torch.full(image.shape[:2], 0.75)

    def predict_masks(paths, out, prob_fn, guided, size, stride, max_pixels):
        report = BatchReport()
        writer = MaskWriter(out, tmp_path, False, False, report)
        for p, mask, box in saliency_maps(paths, prob_fn, guided, size, stride, report,
                                          max_pixels=max_pixels):
            writer.write(Prediction(p, mask, None, box))
        writer.close()
        return report

    refused = predict_masks([path], tmp_path / "r", prob, None, 64, 8, max_pixels=5000)
    assert refused.failed == [(path, refused.failed[0][1])]
    assert "100x80 = 8000 pixels" in refused.failed[0][1] and "--max-pixels" in refused.failed[0][1]
    accepted = predict_masks([path], tmp_path / "a", prob, None, 64, 8, max_pixels=8000)
    assert accepted.ok and len(accepted.written) == 1
    with Image.open(accepted.written[0]) as mask:
        assert mask.size == (100, 80) and np.asarray(mask).max() == round(0.75 * 255)


def test_a_reduced_decode_must_match_the_header_at_some_dct_scale() -> None:
    from unseg.features import _scaled_from

    assert _scaled_from((1200, 1600), (1200, 1600))
    assert _scaled_from((150, 200), (1200, 1600))  # 1/8
    assert _scaled_from((375, 500), (750, 999))  # 1/2, rounded up
    assert not _scaled_from((376, 500), (750, 1000))
    assert not _scaled_from((1600, 1200), (1200, 1600))  # a header that lies


def test_freed_heap_memory_goes_back_to_the_system() -> None:
    from unseg.utils.allocator import glibc, release_freed_memory

    if glibc() is None:
        pytest.skip("no glibc malloc_trim here: release_freed_memory does nothing")

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [np.ones(12_000) for _ in range(2000)]  # 96 KB each: heap blocks, not mmap-ed
    keep = blocks[-1]  # the top of the heap stays in use, so free() alone returns nothing
    del blocks
    held = rss()
    release_freed_memory()
    assert held - rss() > 100 * 2**20  # ~180 MB of the freed 190 MB go back
    assert keep.sum() == 12_000
