"""Core helpers: atomic writes, the run format, the image loader's basics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from unseg import __version__
from unseg.errors import ManyFilesError, UnsegError, a_or_an
from unseg.runs import load_run, save_run
from unseg.utils.io import atomic_write, save_png_atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"

    def boom(p):
        p.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_png_palette_roundtrip(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_png_atomic(tmp_path / "m.png", arr, palette=[i for c in range(256) for i in (c, 0, 0)])
    from PIL import Image

    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P"
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_run_roundtrip_and_errors(tmp_path):
    w = {"proto": torch.randn(3, 4)}
    save_run(tmp_path / "r", "kmeans", {"k": 3}, w, extra={"backbone": "x"})
    meta, t = load_run(tmp_path / "r", "kmeans")
    assert meta["config"] == {"k": 3} and meta["backbone"] == "x"
    assert torch.equal(t["proto"], w["proto"])
    with pytest.raises(UnsegError, match="'kmeans' model, expected primaps-em"):
        load_run(tmp_path / "r", "primaps-em")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsegError, match="format version 99"):
        load_run(tmp_path / "r")
    with pytest.raises(UnsegError, match="not an unseg run folder"):
        load_run(tmp_path)


def test_many_files_error_lists_ten_and_count():
    err = ManyFilesError("missing predictions", [f"f{i}.png" for i in range(13)])
    assert "13 file(s)" in str(err) and "f9.png" in str(err) and "f10.png" not in str(err)
    assert "(and 3 more)" in str(err)


def test_messages_take_the_article_their_word_needs():
    assert [a_or_an(w) for w in ("embedding", "saliency", "object detection", "Image", "x")] == [
        "an embedding", "a saliency", "an object detection", "an Image", "a x"]


def test_package_version_is_the_one_pyproject_declares():
    """The version is written in two places (pyproject.toml for pip, unseg._version for runs,
    --resume and --version); they must agree."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared is not None and declared.group(1) == __version__
