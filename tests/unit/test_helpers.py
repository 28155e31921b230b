"""The one-job helpers: luma, hashes, the label table, the backbone choice."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from unseg.data.color import luma
from unseg.data.labels import CLASS_NAMES, label_lut, map_labels
from unseg.pipelines.backbone import choose_backbone
from unseg.utils.hashing import file_sha256, settings_key


def test_luma_matches_pillow_greyscale(rng):
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    ours = luma(torch.from_numpy(rgb).permute(2, 0, 1).double())[0].numpy()
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    assert np.abs(ours - pil).max() <= 1.0  # Pillow rounds in fixed point
    batch = torch.from_numpy(rgb).permute(2, 0, 1).float()[None].repeat(2, 1, 1, 1)
    assert luma(batch).shape == (2, 1, 7, 9)


def test_file_sha256_streams_the_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # more than one 1 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_settings_key_ignores_key_order_and_sees_values():
    a = settings_key({"size": 320, "tap": None})
    assert a == settings_key({"tap": None, "size": 320}) and len(a) == 16
    assert a != settings_key({"size": 320, "tap": "head"})


def test_label_table_maps_cityscapes_and_coco():
    city = map_labels(np.array([[0, 7, 33, 34]]), label_lut("Cityscapes-27")).tolist()
    assert city == [[255, 0, 26, 255]]
    assert map_labels(np.array([[0, 255]]), label_lut("COCO-Stuff-27")).tolist() == [[9, 255]]
    assert label_lut("VOC2012") is None and len(CLASS_NAMES["VOC2012"]) == 21


def test_backbone_choice_says_why():
    assert choose_backbone("vit_small_patch16_dino") == (
        "vit_small_patch16_dino", "backbone vit_small_patch16_dino (from --backbone)")
    name, why = choose_backbone(None)
    assert name in why
