"""ViT backbones: shapes, position-embedding interpolation, keys vs tokens, size policies
(the `unseg backbones` command: tests/cli/test_backbones_cli.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unseg.backbones import (
    BackboneSpec,
    build_backbone,
    create_backbone,
    get_spec,
    list_backbones,
)
from unseg.backbones.base import Tap
from unseg.backbones.vit import interpolate_pos_embed
from unseg.errors import UnsegError

ALL = [
    "dino_vits16",
    "dino_vits8",
    "dino_vitb16",
    "dino_vitb8",
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vits14_reg4",
    "dinov2_vitb14_reg4",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return create_backbone("dino_vits16", pretrained=False)


@pytest.fixture(scope="module")
def reg4():
    torch.manual_seed(1)
    return create_backbone("dinov2_vits14_reg4", pretrained=False)


def test_registry_has_every_backbone_with_documented_facts():
    assert sorted(s.name for s in list_backbones()) == sorted(ALL)
    facts = {
        "dino_vits8": (8, 384),
        "dino_vitb16": (16, 768),
        "dinov2_vitb14_reg4": (14, 768),
    }
    for name, (stride, dim) in facts.items():
        spec = get_spec(name)
        assert (spec.stride, spec.dim) == (stride, dim)
        assert spec.tap_table == {"last": Tap(dim, stride)} and spec.default_tap == "last"
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        spec = get_spec(name)
        default = spec.tap_info(spec.default_tap)
        assert (spec.stride, spec.dim) == (default.stride, default.dim)
        assert {"s16", "s32", "head", "s16+s32"} <= set(spec.tap_table)
    # the measured defaults of docs/feature-taps.md
    defaults = {
        name: (get_spec(name).default_tap, get_spec(name).default_center)
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    }
    assert defaults == {
        "efficientnet_lite0": ("s32", False),
        "efficientnet_lite1": ("b19+s32", True),
        "efficientnet_lite2": ("head", True),
    }
    assert not get_spec("dino_vits8").default_center
    assert [s.name for s in list_backbones("dinov2*reg4")] == [
        "dinov2_vitb14_reg4",
        "dinov2_vits14_reg4",
    ]


def test_spec_default_tap_must_match_its_stride_and_dim():
    taps = (("a", Tap(4, 8)), ("b", Tap(6, 16)))
    spec = BackboneSpec("t", "test", 16, 6, (0.5,) * 3, (0.5,) * 3, taps=taps, default_tap="b")
    assert list(spec.tap_table) == ["b", "a"]
    assert spec.tap_info("a+b") == spec.tap_info("b+a") == Tap(10, 8)
    with pytest.raises(ValueError, match="default tap 'a'"):
        BackboneSpec("t", "test", 16, 6, (0.5,) * 3, (0.5,) * 3, taps=taps, default_tap="a")


def test_vit_has_one_tap_whose_maps_are_forward_features(vits16):
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        maps = vits16.forward_taps(x, ["last"])
        tokens = vits16.forward_features(x)
    assert vits16.tap == "last" and list(maps) == ["last"]
    torch.testing.assert_close(maps["last"], tokens)
    with pytest.raises(UnsegError, match="dino_vits16: unknown tap 's16'; taps: last"):
        create_backbone("dino_vits16", pretrained=False, tap="s16")


def test_create_backbone_is_frozen_eval_and_random_without_pretrained(vits16):
    assert vits16.weights_sha256 is None
    assert not vits16.training
    assert all(not p.requires_grad for p in vits16.parameters())
    with pytest.raises(UnsegError, match="size policy"):
        create_backbone("dino_vits16", pretrained=False, size_policy="crop")
    with pytest.raises(UnsegError, match="unknown backbone 'dino_vitz'"):
        create_backbone("dino_vitz", pretrained=False)


@pytest.mark.parametrize(
    ("name", "hw"),
    [
        ("dino_vits16", (64, 96)),
        ("dino_vits8", (40, 24)),
        ("dinov2_vits14", (56, 28)),
        ("dinov2_vits14_reg4", (42, 70)),
        ("dino_vitb16", (48, 32)),
    ],
)
def test_feature_shapes_for_several_sizes(name, hw):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    p, d = model.stride, model.dim
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        tok = model.forward_features(x, "tokens")
        key = model.forward_features(x, "keys")
    assert tok.shape == key.shape == (2, d, hw[0] // p, hw[1] // p)
    assert not torch.allclose(tok, key)
    assert torch.isfinite(tok).all() and torch.isfinite(key).all()


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    return np.where(
        t <= 1,
        (a + 2) * t**3 - (a + 3) * t**2 + 1,
        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0),
    )


def _resample_matrix(n_in: int, n_out: int, scale: float, antialias: bool) -> np.ndarray:
    """[n_out, n_in] bicubic weights, written from the textbook definitions.

    Plain (a = -0.75, half-pixel centres, borders replicated) uses the given ``scale`` = out/in;
    antialias (PIL-style, a = -0.5) widens the kernel by in/out when shrinking and renormalises.
    """
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        if antialias:
            inv = n_in / n_out
            support = 2 * max(inv, 1.0)
            centre = (i + 0.5) * inv
            lo = max(int(centre - support + 0.5), 0)
            hi = min(int(centre + support + 0.5), n_in)
            js = np.arange(lo, hi)
            w = _cubic((js - centre + 0.5) / max(inv, 1.0), -0.5)
            m[i, js] = w / w.sum()
        else:
            src = (i + 0.5) / scale - 0.5
            f = math.floor(src)
            for j in range(f - 1, f + 3):
                m[i, min(max(j, 0), n_in - 1)] += _cubic(np.array(src - j), -0.75)
    return m


@pytest.mark.parametrize(
    ("grid", "offset", "antialias"),
    [((5, 7), 0.1, False), ((20, 11), 0.1, False), ((3, 4), 0.0, True), ((9, 12), 0.0, True)],
)
def test_pos_embed_interpolation_matches_hand_computed_bicubic(grid, offset, antialias):
    torch.manual_seed(0)
    m, d = 6, 5
    pos = torch.randn(1, 1 + m * m, d, dtype=torch.float64)
    out = interpolate_pos_embed(pos, grid, offset, antialias)
    h, w = grid
    rows = _resample_matrix(m, h, (h + offset) / m, antialias)
    cols = _resample_matrix(m, w, (w + offset) / m, antialias)
    g = pos[0, 1:].numpy().reshape(m, m, d)
    ref = np.einsum("ia,abd,jb->ijd", rows, g, cols).reshape(h * w, d)
    assert out.shape == (1, 1 + h * w, d)
    np.testing.assert_allclose(out[0, 0].numpy(), pos[0, 0].numpy())
    np.testing.assert_allclose(out[0, 1:].numpy(), ref, rtol=1e-5, atol=1e-5)  # float32 inside


def _pos_used(model, hw):
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        t = model.prepare_tokens(x)
        plain = torch.cat([model.cls_token, model.patch_embed(x)], dim=1)
    r = model.cfg.registers
    if r:
        assert torch.equal(t[:, 1 : 1 + r], model.register_tokens)
        t = torch.cat([t[:, :1], t[:, 1 + r :]], dim=1)
    return t - plain


def test_native_size_uses_pos_embed_unchanged(vits16, reg4):
    torch.testing.assert_close(_pos_used(vits16, (224, 224)), vits16.pos_embed.detach())
    torch.testing.assert_close(_pos_used(reg4, (518, 518)), reg4.pos_embed.detach())


def test_model_interpolates_like_the_official_recipe(vits16, reg4):
    m = vits16.pos_embed.detach()
    grid = m[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(5.1 / 14, 3.1 / 14), mode="bicubic")
    ref = torch.cat([m[:, :1], ref.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(_pos_used(vits16, (80, 48)), ref, rtol=1e-5, atol=1e-5)
    m = reg4.pos_embed.detach()
    grid = m[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 6), mode="bicubic", antialias=True)
    ref = torch.cat([m[:, :1], ref.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(_pos_used(reg4, (56, 84)), ref, rtol=1e-5, atol=1e-5)


def _naive_forward(model, images):
    """Independent ViT forward: explicit softmax attention, returns (tokens, keys) [B, N, D]."""
    x = model.normalize(images)
    t = model.prepare_tokens(x)
    heads, d = model.cfg.heads, model.cfg.dim
    keys = None
    for blk in model.blocks:
        y = F.layer_norm(t, (d,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        keys = k
        b, n, _ = t.shape
        split = [z.reshape(b, n, heads, d // heads).transpose(1, 2) for z in (q, k, v)]
        att = (split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
        a = (att @ split[2]).transpose(1, 2).reshape(b, n, d)
        a = a @ blk.attn.proj.weight.T + blk.attn.proj.bias
        t = t + (a * blk.ls1.gamma if model.cfg.layerscale else a)
        y = F.layer_norm(t, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T
        y = y + blk.mlp.fc2.bias
        t = t + (y * blk.ls2.gamma if model.cfg.layerscale else y)
    t = F.layer_norm(t, (d,), model.norm.weight, model.norm.bias, 1e-6)
    return t, keys


@pytest.mark.parametrize("which", ["vits16", "reg4"])
def test_tokens_and_keys_match_a_naive_forward(which, request):
    model = request.getfixturevalue(which)
    p, r = model.stride, model.cfg.registers
    torch.manual_seed(2)
    images = torch.rand(2, 3, 3 * p, 4 * p)
    with torch.no_grad():
        tok = model.forward_features(images, "tokens")
        key = model.forward_features(images, "keys")
        ref_t, ref_k = _naive_forward(model, images)
    for got, ref in ((tok, ref_t), (key, ref_k)):
        dense = ref[:, 1 + r :].transpose(1, 2).reshape(2, model.dim, 3, 4)
        torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)


def test_size_policies():
    torch.manual_seed(0)
    model = create_backbone("dino_vits8", pretrained=False)
    x = torch.rand(1, 3, 30, 43)
    with pytest.raises(UnsegError, match=r"30x43.*stride 8"):
        model.forward_features(x)
    model.size_policy = "pad"
    with torch.no_grad():
        padded = model.forward_features(x)
        manual = model.forward_features(_replicate_pad(x, 32, 48))
    assert padded.shape == (1, 384, 4, 6)
    torch.testing.assert_close(padded, manual)
    model.size_policy = "resize"
    with torch.no_grad():
        resized = model.forward_features(x)
    assert resized.shape == (1, 384, 4, 5)  # 30 -> 32, 43 -> 40


def _replicate_pad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h).clamp(max=x.shape[-2] - 1)
    cols = torch.arange(w).clamp(max=x.shape[-1] - 1)
    return x[..., rows, :][..., cols]
