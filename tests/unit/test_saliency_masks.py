"""Saliency-map mask proposals: thresholding, small components, pairing and every bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from unseg.errors import UnsegError
from unseg.proposals.saliency_masks import COLOUR_MAP, binarise, load_mask_proposals


def _reference(sal: np.ndarray, min_area: float) -> np.ndarray:
    """OpenCV's 8-connected components, kept when at least ``min_area`` of the image."""
    fg = (sal.astype(np.float64) / 255.0 > 0.5).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area * fg.size
    return keep[labels]


def test_binarise_matches_opencv_components(rng: np.random.Generator):
    for _ in range(5):
        sal = (rng.random((40, 50)) ** 3 * 255).astype(np.uint8)
        sal = cv2.GaussianBlur(sal, (5, 5), 0) * 2
        got = binarise(sal, min_area=0.01)
        np.testing.assert_array_equal(got, _reference(sal, 0.01))
        assert got.sum() < (sal > 127).sum() or (sal > 127).sum() == 0  # something was removed


def test_binarise_threshold_and_value_ranges():
    sal = np.zeros((20, 20), np.uint8)
    sal[:10, :10] = 128  # 128/255 > 0.5
    sal[10:, 10:] = 127  # 127/255 < 0.5
    assert binarise(sal).sum() == 100 and binarise(sal)[:10, :10].all()
    ones = (sal > 0).astype(np.uint8)  # a 0/1 mask is taken as is
    assert binarise(ones).sum() == 200
    assert binarise(ones.astype(bool)).sum() == 200
    assert binarise(sal.astype(np.float32) / 255).sum() == 100
    assert binarise(sal.astype(np.uint16) * 257).sum() == 100
    # a single pixel (< 1 % of 400) goes; a diagonal 8-connected line of 5 (>= 4 pixels) stays
    dots = np.zeros((20, 20), np.uint8)
    dots[0, 0] = 255
    for i in range(5):
        dots[10 + i, 5 + i] = 255
    out = binarise(dots)
    assert not out[0, 0] and out.sum() == 5


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(folder: Path, name: str, h: int = 30, w: int = 40) -> Path:
    return _save(folder / f"{name}.jpg", np.full((h, w, 3), 120, np.uint8))


def _mask(folder: Path, name: str, h: int = 30, w: int = 40, box: int = 12) -> Path:
    m = np.zeros((h, w), np.uint8)
    m[5 : 5 + box, 5 : 5 + box] = 255
    return _save(folder / f"{name}.png", m)


def test_pairs_by_stem_and_reports_every_bad_file(tmp_path: Path):
    ims, ms = tmp_path / "images", tmp_path / "masks"
    good = _image(ims, "good")
    _mask(ms, "good")
    orphan = _image(ims, "orphan")  # no mask
    wrong = _image(ims, "wrong")
    wrong_mask = _mask(ms, "wrong", h=20, w=40)  # another size
    tiny = _image(ims, "tiny")
    _mask(ms, "tiny", box=3)  # 9 px < 1 % of 1200: removed, image dropped
    colour = _image(ims, "colour")
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 30  # a jet-like colour map
    colour_mask = _save(ms / "colour.png", rgb)
    broken = _image(ims, "broken")
    broken_mask = ms / "broken.png"
    broken_mask.write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    props, report = load_mask_proposals([good, orphan, wrong, tiny, colour, broken], ms)
    assert props.paths == [good] and report.kept == 1
    assert props.masks[0].dtype.is_floating_point is False and props.masks[0].sum() == 144
    assert props.areas == [pytest.approx(144 / 1200)]
    assert report.dropped == [(tiny, 0.0)]
    failed = dict(report.failed)
    assert set(failed) == {orphan, wrong_mask, colour_mask, broken_mask}
    assert "no saliency mask named orphan.png" in failed[orphan]
    assert "20x40" in failed[wrong_mask] and "30x40" in failed[wrong_mask]
    assert failed[colour_mask] == COLOUR_MAP
    assert "not an image" in failed[broken_mask] or "corrupt" in failed[broken_mask]
    assert "1 image(s) with a mask proposal, 1 dropped" in report.summary()
    assert not report.ok


def test_exif_rotated_image_pairs_with_a_mask_of_its_displayed_size(tmp_path: Path):
    img = Image.fromarray(np.full((30, 40, 3), 90, np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed 40x30
    img.save(tmp_path / "rot.jpg", exif=exif)
    _mask(tmp_path / "m", "rot", h=40, w=30)
    props, report = load_mask_proposals([tmp_path / "rot.jpg"], tmp_path / "m")
    assert report.ok and props.masks[0].shape == (40, 30)


def test_nothing_left_raises_with_the_reason(tmp_path: Path):
    ims, ms = tmp_path / "images", tmp_path / "masks"
    paths = [_image(ims, f"im{i}") for i in range(3)]
    for i in range(3):
        _save(ms / f"im{i}.png", np.zeros((30, 40), np.uint8))
    with pytest.raises(UnsegError, match=r"all 3 masks are empty"):
        load_mask_proposals(paths, ms)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 1] = 200
    for i in range(3):
        _save(ms / f"im{i}.png", rgb)
    with pytest.raises(UnsegError, match=r"masks are RGB colour maps \(3 file"):
        load_mask_proposals(paths, ms)
    mixed = tmp_path / "mixed"
    _save(mixed / "im0.png", np.zeros((30, 40), np.uint8))  # empty; im1, im2 have no mask
    with pytest.raises(UnsegError, match="no usable mask for any of the 3"):
        load_mask_proposals(paths, mixed)
    with pytest.raises(UnsegError, match="does not exist"):
        load_mask_proposals(paths, tmp_path / "absent")


@pytest.mark.realdata
def test_ecssd_ground_truth_masks_are_kept(shared_data):
    root = shared_data("ECSSD")
    images = [root / "images" / f"000{i}.jpg" for i in range(1, 4)]
    props, report = load_mask_proposals(images, root / "ground_truth_mask")
    assert report.ok and props.paths == images
    for path, mask in zip(images, props.masks, strict=True):
        gt = np.asarray(Image.open(root / "ground_truth_mask" / f"{path.stem}.png")) > 127
        assert mask.shape == gt.shape
        assert (mask.numpy() == gt).mean() > 0.99  # only specks under 1 % removed
