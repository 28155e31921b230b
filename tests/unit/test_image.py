"""The image loader: every mode to RGB, EXIF orientation, and clear errors for broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unseg.data.image import list_images, load_image, load_label
from unseg.errors import InputFileError, UnsegError


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_mode_l_repeats_grey(tmp_path, rng):
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], grey) for c in range(3))


def test_mode_rgba_and_la_composite_on_white(tmp_path, rng):
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    alpha = np.array([0, 255, 128, 64, 200, 10], dtype=np.uint8)[None, :].repeat(4, 0)
    rgba = np.dstack([rgb, alpha])
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    expected = rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    assert np.abs(out.astype(float) - expected).max() <= 1.0
    assert np.array_equal(out[:, 0], np.full((4, 3), 255))  # fully transparent → white
    assert np.array_equal(out[:, 1], rgb[:, 1])  # opaque → unchanged

    la = np.dstack([rgb[..., 0], alpha])
    out = load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    expected = rgb[..., 0] * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0)
    assert np.abs(out[..., 1].astype(float) - expected).max() <= 1.0


def test_mode_p_uses_palette(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    out = load_image(_save(img, tmp_path / "p.png"))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [200, 100, 0]
    assert out[1, 0].tolist() == [0, 0, 255]


def test_mode_p_with_transparency(tmp_path):
    idx = np.array([[0, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([10, 20, 30, 200, 100, 0] + [0] * (254 * 3))
    img.info["transparency"] = 0
    out = load_image(_save(img, tmp_path / "pt.png", transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 100, 0]


def test_mode_cmyk(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    out = load_image(_save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tif"))
    assert out[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]


def test_mode_i16_scales_to_8_bits(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = load_image(_save(img, tmp_path / "d.png"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1]),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation(tmp_path, rng, orientation, expected):
    arr = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = load_image(_save(img, tmp_path / "e.png", exif=exif.tobytes()))
    assert np.array_equal(out, expected(arr))


def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["empty", "truncated-jpeg", "truncated-png", "text", "missing"])
def test_broken_files_name_the_file(tmp_path, rng, kind):
    path = tmp_path / f"bad-{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-jpeg":
        data = _jpeg_bytes(rng)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-png":
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        path = tmp_path / "bad.png"
        path.write_bytes(buf.getvalue()[:200])
    elif kind == "text":
        path.write_text("this is not an image\n")
    with pytest.raises(InputFileError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_load_label_keeps_palette_indices(tmp_path):
    idx = np.array([[0, 5, 255]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(list(range(256)) * 3)
    assert load_label(_save(img, tmp_path / "l.png")).tolist() == [[0, 5, 255]]


def test_list_images_recursive_skips_hidden(tmp_path, rng):
    arr = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    for rel in ["a.jpg", "sub/b.PNG", ".hidden/c.png", "sub/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("x")
        else:
            Image.fromarray(arr).save(tmp_path / rel)
    assert list_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "sub" / "b.PNG"]
    assert list_images(tmp_path, recursive=False) == [tmp_path / "a.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsegError, match="no images"):
        list_images(tmp_path / "empty")


def test_real_ecssd_image_loads(shared_data):
    path = shared_data("ECSSD") / "images" / "0001.jpg"
    out = load_image(path)
    with Image.open(path) as img:
        assert out.shape == (img.height, img.width, 3)
