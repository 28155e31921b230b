"""EfficientNet-Lite0 with the real packaged ImageNet weights: real photos are classified right."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.backbones import create_backbone, get_spec, weights_status
from unseg.backbones.efficientnet import SameConv2d

skdata = pytest.importorskip("skimage.data")

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CUP = {967, 968}  # espresso, cup
ROCKET = {657, 744}  # missile, projectile


@pytest.fixture(scope="module")
def model():
    return create_backbone("efficientnet_lite0", device="cpu")


def _prepare(photo: np.ndarray) -> torch.Tensor:
    """Short side 256 (PIL bicubic), centre crop 224 → [1, 3, 224, 224] in [0, 1]."""
    img = Image.fromarray(photo)
    s = 256 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_weights_are_the_packaged_file(model):
    st = weights_status(get_spec("efficientnet_lite0"))
    assert st.status == "packaged"
    assert model.weights_sha256 == hashlib.sha256(st.path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("photo", "expected", "topk"),
    [("chelsea", CATS, 3), ("coffee", {967}, 1), ("rocket", ROCKET, 2)],
)
def test_classifies_real_photos(model, photo, expected, topk):
    x = _prepare(getattr(skdata, photo)())
    with torch.no_grad():
        probs = model.classify(x).softmax(-1)[0]
    top = set(probs.topk(topk).indices.tolist())
    assert top <= expected, top
    if photo == "coffee":
        assert probs[967] > 0.8


def test_dense_features_are_stage_outputs(model):
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        feats = model.forward_features(x)
        keys = model.forward_features(x, "keys")
        s16, s32 = model._trunk(model.normalize(x))
    assert feats.shape == (2, 432, 6, 10)
    assert s16.shape == (2, 112, 6, 10) and s32.shape == (2, 320, 3, 5)
    torch.testing.assert_close(feats[:, :112], s16)
    torch.testing.assert_close(
        feats[:, 112:].mean(dim=(2, 3)), s32.mean(dim=(2, 3)), atol=0.05, rtol=0.05
    )
    torch.testing.assert_close(keys, feats)
    assert "no attention" in model.spec.keys_note


@pytest.mark.parametrize(("size", "kernel", "stride"), [(7, 3, 2), (8, 3, 2), (9, 5, 2), (6, 5, 1)])
def test_same_padding_matches_tensorflow_rule(size, kernel, stride):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride, bias=False)
    x = torch.randn(1, 2, size, size)
    out_size = -(-size // stride)
    total = max((out_size - 1) * stride + kernel - size, 0)
    before = total // 2  # TensorFlow: the odd pixel goes after (bottom/right)
    ref = F.conv2d(
        F.pad(x, (before, total - before, before, total - before)), conv.weight, stride=stride
    )
    out = conv(x)
    assert out.shape[-1] == out_size
    torch.testing.assert_close(out, ref)
