"""The commands on images beyond the working size: `unseg segment` on a 3000x2000 photo at a
128-pixel working side writes full-size masks and overlays; `unseg features` refuses an image
over --max-pixels with one message per file and no Pillow warning."""

from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

import unseg.data.image as image_module
from unseg.cli.main import main
from unseg.data.image import DEFAULT_MAX_PIXELS

BACKBONE = "efficientnet_lite0"


def test_segment_a_large_image_at_a_small_working_resolution(smooth_photo, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    smooth_photo(images / "large.jpg", 2000, 3000)
    smooth_photo(images / "small.png", 64, 96, seed=1)
    out = tmp_path / "out"
    args = ["-q", "segment", str(images), "--out", str(out), "--backbone", BACKBONE,
            "--size", "96", "--max-side", "128", "--workers", "1", "-k", "2",
            "--method", "kmeans", "--refine", "none", "--n-init", "1", "--no-report"]
    assert main(args) == 0
    with Image.open(out / "masks" / "large.png") as mask:
        assert mask.size == (3000, 2000) and mask.mode == "P"
    with Image.open(out / "overlays" / "large.jpg") as ov:
        assert ov.size == (3000, 2000)
    with Image.open(out / "masks" / "small.png") as mask:
        assert mask.size == (96, 64)
    meta = json.loads((out / "run" / "config.json").read_text())
    assert meta["max_side"] == 128 and meta["max_pixels"] is None
    index = next((out / "run" / "cache" / "features").glob("*/index.json"))
    records = json.loads(index.read_text())["images"]
    large = next(r for p, r in records.items() if p.endswith("large.jpg"))
    assert large["original_size"] == [2000, 3000] and large["image_size"] == [96, 128]


def test_pixel_limit_is_a_per_file_message_and_no_pillow_warning(
    smooth_photo, tmp_path, monkeypatch, capfd
):
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # the default stays Pillow's
    images = tmp_path / "images"
    images.mkdir()
    path = smooth_photo(images / "wide.png", 80, 100)  # 8000 pixels
    monkeypatch.setattr(image_module, "DEFAULT_MAX_PIXELS", 5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow itself would warn now
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    base = ["features", str(images), "--backbone", BACKBONE, "--size", "64", "--workers", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*base, "--out", str(tmp_path / "refused")]) == 1  # an input failed
        err = capfd.readouterr().err
        assert f"{path}: image too large: 100x80 = 8000 pixels" in err
        assert "--max-pixels 8000" in err
        assert "DecompressionBomb" not in err and "Warning" not in err
        assert main([*base, "--out", str(tmp_path / "accepted"), "--max-pixels", "8000"]) == 0
        err = capfd.readouterr().err
        assert "failed" not in err and "Warning" not in err
        assert main([*base, "--out", str(tmp_path / "free"), "--max-pixels", "0"]) == 0
    assert Image.MAX_IMAGE_PIXELS == 5000  # Pillow's setting is restored after each open
