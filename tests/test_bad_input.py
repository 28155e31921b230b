"""Bad options and inputs end in one clear line and exit status 2 (or a listed failure), never a
traceback: out-of-range --size / --max-side, an unavailable --device, a file that is not weights,
animated GIFs, and the output folder's own settings honoured by report and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.utils.device import resolve_device


def _one_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(folder / "a.png")
    return folder


def test_cuda_on_a_cpu_only_build_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UnsegError, match="CUDA is not available in this torch build"):
        resolve_device("cuda")


def test_missing_gpu_index_and_unknown_device_are_clear_errors(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UnsegError, match=r"1 CUDA device\(s\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UnsegError, match="'foo' is not a torch device"):
        resolve_device("foo")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_device_cuda_without_cuda_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    images = _one_image(tmp_path / "images")
    code = main(["features", str(images), "--out", str(tmp_path / "f"), "--backbone",
                 "efficientnet_lite0", "--size", "64", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CUDA is not available in this torch build" in err
    assert "Traceback" not in err
