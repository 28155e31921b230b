"""Dense CRF: the specified parameters, edge sharpening, parallel == serial, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from unseg.errors import UnsegError
from unseg.refine import crf as crf_mod
from unseg.refine.crf import CRFConfig, dense_crf, dense_crf_batch


def two_region_case(width: int = 64, edge: int = 37) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Image with a colour edge at column ``edge``; a blurred unary whose boundary is off by 7."""
    image = np.full((48, width, 3), 40, dtype=np.uint8)
    image[:, edge:] = (220, 200, 60)
    truth = np.zeros((48, width), dtype=np.int64)
    truth[:, edge:] = 1
    cols = torch.arange(width, dtype=torch.float32)
    ramp = torch.tanh((cols - (edge - 7)) / 12.0)  # soft, and centred at the wrong place
    logits = torch.stack([-ramp, ramp])[:, None, :].expand(2, 48, width).contiguous()
    return np.ascontiguousarray(image), logits, truth


def test_defaults_are_the_specified_values() -> None:
    cfg = CRFConfig()
    assert cfg.iterations == 10
    assert (cfg.gaussian_sxy, cfg.gaussian_compat) == (1.0, 3.0)
    assert (cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat) == (67.0, 3.0, 4.0)


def test_parameters_reach_pydensecrf(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydensecrf.densecrf as dcrf

    calls: dict[str, object] = {}

    class Recorder:
        def __init__(self, w: int, h: int, k: int) -> None:
            calls["shape"] = (w, h, k)

        def setUnaryEnergy(self, u: np.ndarray) -> None:
            calls["unary"] = u

        def addPairwiseGaussian(self, **kw: object) -> None:
            calls["gaussian"] = kw

        def addPairwiseBilateral(self, **kw: object) -> None:
            calls["bilateral"] = kw

        def inference(self, n: int) -> np.ndarray:
            calls["iterations"] = n
            k = calls["shape"][2]  # type: ignore[index]
            return np.full((k, 48 * 64), 1.0 / k, dtype=np.float32)

    monkeypatch.setattr(dcrf, "DenseCRF2D", Recorder)
    image, logits, _ = two_region_case()
    dense_crf(image, logits[:, ::4, ::4])
    assert calls["shape"] == (64, 48, 2)
    assert calls["gaussian"] == {"sxy": 1.0, "compat": 3.0}
    bil = calls["bilateral"]
    assert {k: bil[k] for k in ("sxy", "srgb", "compat")} == {  # type: ignore[index]
        "sxy": 67.0,
        "srgb": 3.0,
        "compat": 4.0,
    }
    assert bil["rgbim"] is not None and bil["rgbim"].flags["C_CONTIGUOUS"]  # type: ignore[index]
    assert calls["iterations"] == 10
    # unary = -log softmax of the logits upsampled bilinearly to the image size
    up = torch.nn.functional.interpolate(
        logits[None, :, ::4, ::4], size=(48, 64), mode="bilinear", align_corners=False
    )[0]
    expect = (-torch.log_softmax(up, dim=0)).reshape(2, -1).numpy()
    np.testing.assert_allclose(calls["unary"], expect, rtol=1e-6, atol=1e-6)


def test_crf_sharpens_a_blurred_unary_along_the_colour_edge() -> None:
    image, logits, truth = two_region_case()
    before = (logits.argmax(0).numpy() == truth).mean()
    q = dense_crf(image, logits)
    assert q.shape == (2, 48, 64) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    after = (q.argmax(0) == truth).mean()
    assert before < 0.91
    assert after > 0.98
    # and the marginals are more confident than the unary
    p = torch.softmax(logits, 0).numpy()
    assert np.abs(q - 0.5).mean() > np.abs(p - 0.5).mean()


def test_two_processes_give_the_same_result_as_one() -> None:
    image, logits, _ = two_region_case()
    images = [image, image[:, ::-1].copy()]
    logit_maps = [logits, logits.flip(-1)]
    serial = dense_crf_batch(images, logit_maps, num_workers=1)
    parallel = dense_crf_batch(images, logit_maps, num_workers=2)
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


_NO_SHARED_FDS = """
import torch
from multiprocessing import resource_sharer
from unseg.refine.crf import CRFPool

with CRFPool(2) as pool:
    out = pool.map_fn(torch.neg, [torch.arange(6.0).reshape(2, 3)] * 3)
assert all(torch.equal(o, -torch.arange(6.0).reshape(2, 3)) for o in out)
print(resource_sharer._resource_sharer._listener is None)
"""


def test_tensors_cross_the_pool_by_value_not_as_shared_file_descriptors() -> None:
    """torch's multiprocessing pickler would hand tensors over as file descriptors served by a
    background thread, which prints a traceback when the peer is killed mid-hand-over (a rank
    under torchrun killed with its CRF workers): the pool must never start that thread."""
    done = subprocess.run([sys.executable, "-c", _NO_SHARED_FDS], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_bad_inputs_are_clear_errors() -> None:
    image, logits, _ = two_region_case()
    with pytest.raises(UnsegError, match="uint8"):
        dense_crf(image.astype(np.float32), logits)
    with pytest.raises(UnsegError, match=r"\[K, h, w\]"):
        dense_crf(image, logits[0])
    with pytest.raises(UnsegError, match="2 images but 1"):
        crf_mod.dense_crf_batch([image, image], [logits])
