"""Potsdam-3 as STEGO released it: listing a root's split, reading its .mat tiles and labels, and
the error of each malformed file (tests/cli/test_potsdam_cli.py runs the commands on it)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

import unseg
from unseg.data.datasets import Potsdam3, dataset_images, image_files, resolve_inputs
from unseg.data.image import image_size, load_image, load_label
from unseg.errors import InputFileError, UnsegError
from unseg.metrics.in_memory import score_semantic
from unseg.utils.batch import BatchReport

# STEGO's src/data.py (class Potsdam): root/imgs/<id>.mat "img" uint8 [H, W, 4] (RGB + IR,
# channels last; it keeps [:3]), root/gt/<id>.mat "gt" int32 [H, W] (fine classes 0..5), split
# files of ids without suffix; "val" is labelled_test.txt.
TEST_IDS = ("3_1_2", "0_0_1")  # not sorted: the split file's order is kept
TRAIN_IDS = ("0_0_0",)
UNLABELLED_IDS = ("7_3_3",)  # a tile without ground truth, as in unlabelled_train.txt
SIDE = 64


def tile_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One tile: ``img`` uint8 [64, 64, 4] with an IR channel unlike its RGB, ``gt`` int32."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
    img[..., 3] = 255 - img[..., 0]
    gt = rng.integers(0, 6, (SIDE, SIDE)).astype(np.int32)
    gt[:2, :2] = 255
    return img, gt


def write_potsdam(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A STEGO-format Potsdam root in ``root``; returns each id's (img, gt) as saved."""
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    saved = {}
    for k, stem in enumerate((*TEST_IDS, *TRAIN_IDS, *UNLABELLED_IDS)):
        img, gt = tile_arrays(k)
        savemat(root / "imgs" / f"{stem}.mat", {"img": img})
        if stem not in UNLABELLED_IDS:
            savemat(root / "gt" / f"{stem}.mat", {"gt": gt})
        saved[stem] = (img, gt)
    (root / "labelled_test.txt").write_text("".join(f"{s}\n" for s in TEST_IDS))
    (root / "labelled_train.txt").write_text("".join(f"{s}\n" for s in TRAIN_IDS))
    (root / "unlabelled_train.txt").write_text("".join(f"{s}\n" for s in UNLABELLED_IDS))
    return saved


@pytest.fixture
def potsdam(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    root = tmp_path / "potsdam"
    return root, write_potsdam(root)


# ---------------------------------------------------------------- listing


def test_a_root_lists_its_test_split_in_the_split_files_order(potsdam) -> None:
    root, _ = potsdam
    expected = [root / "imgs" / f"{s}.mat" for s in TEST_IDS]
    assert dataset_images(root) == expected
    assert resolve_inputs(root, BatchReport()) == expected
    assert unseg.list_images(root) == expected  # the Segmenter's order


def test_its_imgs_folder_lists_every_tile_and_without_a_split_file_the_root_does(potsdam):
    root, _ = potsdam
    every = sorted(root / "imgs" / f"{s}.mat" for s in (*TEST_IDS, *TRAIN_IDS, *UNLABELLED_IDS))
    assert dataset_images(root / "imgs") == every  # as VOC's JPEGImages gives every photo
    assert image_files(root / "imgs") == every
    (root / "labelled_test.txt").unlink()
    (root / "gt" / "7_3_3.mat").touch()  # no split file: the images folder, not the labels
    assert dataset_images(root) == every


def test_mat_files_outside_a_potsdam_root_stay_ignored(potsdam, tmp_path: Path) -> None:
    root, _ = potsdam
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.mat").write_bytes((root / "imgs" / "0_0_1.mat").read_bytes())
    with pytest.raises(UnsegError, match="no images found"):
        dataset_images(plain)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(plain / "b.png")
    assert dataset_images(plain) == [plain / "b.png"]
    # a photo folder named imgs beside a gt folder keeps its photos, its .mat files ignored
    photos = tmp_path / "project"
    (photos / "gt").mkdir(parents=True)
    (photos / "imgs").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photos / "imgs" / "x.jpg")
    (photos / "imgs" / "y.mat").write_bytes(b"not read")
    assert dataset_images(photos / "imgs") == [photos / "imgs" / "x.jpg"]


def test_a_split_naming_a_missing_tile_stops_with_its_path(potsdam) -> None:
    root, _ = potsdam
    (root / "imgs" / "0_0_1.mat").unlink()
    with pytest.raises(UnsegError, match=r"Potsdam-3: missing images: 1 file\(s\): .*0_0_1\.mat"):
        dataset_images(root)


# ---------------------------------------------------------------- loading


def test_a_tile_loads_as_its_first_three_channels_and_its_labels_as_saved(potsdam) -> None:
    root, saved = potsdam
    for stem, (img, gt) in saved.items():
        path = root / "imgs" / f"{stem}.mat"
        assert image_size(path) == (SIDE, SIDE)
        rgb = load_image(path)
        assert rgb.dtype == np.uint8 and rgb.shape == (SIDE, SIDE, 3)
        assert np.array_equal(rgb, img[..., :3])  # the IR channel dropped, RGB unchanged
        if stem not in UNLABELLED_IDS:
            assert np.array_equal(load_label(root / "gt" / f"{stem}.mat"), gt)


def test_the_dataset_class_maps_the_fine_classes_to_three(potsdam) -> None:
    root, saved = potsdam
    ds = Potsdam3(root)
    assert [s for s, _, _ in ds.pairs] == list(TEST_IDS)
    sample = ds[0]
    img, gt = saved[TEST_IDS[0]]
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), img[..., :3])
    # STEGO's fine_to_coarse: roads 0 and cars 4 → 0, buildings 1 and clutter 5 → 1,
    # low vegetation 2 and trees 3 → 2, 255 → ignore
    coarse = np.array([0, 1, 2, 2, 0, 1])[np.minimum(gt, 5)]
    coarse[gt == 255] = 255
    assert np.array_equal(sample["label"].numpy(), coarse)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (np.full((8, 8, 4), 0.5), np.full((8, 8, 3), 128)),  # floats in [0, 1]: x 255
        (np.full((8, 8, 3), 200.0), np.full((8, 8, 3), 200)),  # floats in 0..255
        (np.full((8, 8, 4), 17, np.uint16), np.full((8, 8, 3), 17)),  # integers within 8 bits
    ],
)
def test_other_pixel_types_within_8_bits_are_read(tmp_path: Path, img, expected) -> None:
    path = tmp_path / "t.mat"
    savemat(path, {"img": img})
    assert np.array_equal(load_image(path), expected.astype(np.uint8))


# ---------------------------------------------------------------- malformed files


def _v73_header() -> bytes:
    """The 128-byte header of a MATLAB v7.3 (HDF5) file: version 0x0200."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM" + b"\0" * 512


def _cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each malformed tile and the start of its message."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = tmp_path / "good.mat"
    savemat(good, {"img": np.zeros((32, 32, 4), np.uint8)})
    cases: dict[str, tuple[bytes | dict, str]] = {
        "empty": (b"", "empty file (0 bytes)"),
        "text": (b"this is not a .mat file, it is text " * 8,
                 "not a readable .mat file, corrupt or truncated"),
        "cut": (good.read_bytes()[:100], "not a readable .mat file, corrupt or truncated"),
        "v73": (_v73_header(), "MATLAB v7.3 (HDF5) .mat file: only v4/v5 .mat files are read"),
        "nokey": ({"image": np.zeros((8, 8, 4), np.uint8)},
                  "no 'img' array in the .mat file (it holds 'image')"),
        "first": ({"img": np.zeros((4, 32, 32), np.uint8)},
                  "'img' has shape (4, 32, 32) (it looks channels-first), expected [H, W, C]"),
        "grey": ({"img": np.zeros((32, 32), np.uint8)}, "'img' has shape (32, 32), expected"),
        "deep": ({"img": np.full((8, 8, 3), 1023, np.uint16)},
                 "'img' values 1023..1023 (uint16) do not fit 0..255"),
    }
    out = {}
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.mat"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            savemat(path, content)
        out[name] = (path, message)
    return out


def test_each_malformed_tile_is_an_error_naming_the_file(tmp_path: Path) -> None:
    for name, (path, message) in _cases(tmp_path).items():
        # the header is enough for some (image_size, what the listing reads); decoding finds
        # the rest (a tile whose data is cut off after an intact header)
        with pytest.raises(InputFileError) as err:
            image_size(path)
            load_image(path)
        assert err.value.path == path, name
        assert str(err.value).startswith(f"{path}: {message}"), (name, str(err.value))


def test_a_cut_off_tile_fails_when_its_data_is_read(tmp_path: Path) -> None:
    path = tmp_path / "t.mat"
    savemat(path, {"img": np.arange(64 * 64 * 4).reshape(64, 64, 4).astype(np.uint8)})
    path.write_bytes(path.read_bytes()[:-200])
    assert image_size(path) == (64, 64)  # the header is intact
    with pytest.raises(InputFileError, match=r"not a readable \.mat file, corrupt or truncated"):
        load_image(path)


def test_malformed_labels_are_errors_naming_the_file(tmp_path: Path) -> None:
    cases = {
        "nogt": ({"img": np.zeros((8, 8, 4), np.uint8)}, "no 'gt' array in the .mat file"),
        "rgb": ({"gt": np.zeros((8, 8, 3), np.int32)}, "'gt' has shape (8, 8, 3), expected"),
        "frac": ({"gt": np.full((8, 8), 0.5)}, "'gt' holds float64 values that are not class"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.mat"
        savemat(path, content)
        with pytest.raises(InputFileError, match=re.escape(message)):
            load_label(path)


def test_the_pixel_limit_applies_to_tiles(potsdam) -> None:
    root, _ = potsdam
    path = root / "imgs" / "0_0_1.mat"
    with pytest.raises(InputFileError, match="image too large: 64x64 = 4096 pixels"):
        load_image(path, max_pixels=4000)
    with pytest.raises(InputFileError, match="image too large"):
        image_size(path, max_pixels=4000)


def test_the_in_memory_scorer_refuses_a_fine_label_file(potsdam) -> None:
    """A .mat label holds the 6 fine classes: scored as they are it would leave the protocol."""
    root, _ = potsdam
    with pytest.raises(UnsegError, match=r"Potsdam \.mat label \(6 fine classes\)"):
        score_semantic([np.zeros((SIDE, SIDE), np.uint8)], [root / "gt" / "0_0_1.mat"])
    label = Potsdam3(root)[1]["label"].numpy()  # what the message points to
    assert score_semantic([label], [label]).miou == 1.0
