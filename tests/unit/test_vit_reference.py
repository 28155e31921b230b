"""unseg's DINO / DINOv2 ViTs against Hugging Face ``transformers`` (an independent
implementation), with random weights in the official checkpoint format.

For every listed ViT: the official key layout loads strictly at full depth; a random official
state dict (2 blocks, full width) loaded into unseg and, through the documented name mapping
(``vit_reference``), into ``transformers``' ViTModel / Dinov2Model / Dinov2WithRegistersModel
gives the same final-normed patch tokens and the same last-block attention keys (the last
layer's ``k_proj`` output, heads concatenated) at the native size and two others, one of them
non-square, within ``TOL`` (float32 round-off: the largest difference seen is about 2e-6 on
values up to about 6).

Position-embedding interpolation is where the implementations legitimately differ: the
official code (DINO v1, DINOv2 without registers) passes ``scale_factor = (grid + 0.1) / M``,
``transformers`` passes ``size = grid``. unseg follows the official code; off the native size it
is compared with ``transformers`` using the official recipe restated (``official_pos_embed``).
For the ``_reg4`` models the official recipe (``size = grid``, antialiased) is also
``transformers``' own, so those are compared with ``transformers`` unmodified at every size.
"""

from __future__ import annotations

import pytest
import torch
from vit_reference import (
    ARCHS,
    FULL_DEPTH,
    Arch,
    hf_model,
    hf_outputs,
    official_pos_embed,
    official_recipe,
    official_shapes,
    official_state_dict,
    official_to_hf,
    shallow,
    use_official_interpolation,
)

from unseg.backbones.base import build_backbone, list_backbones
from unseg.backbones.vit import VisionTransformer, interpolate_pos_embed
from unseg.backbones.weights import load_strict
from unseg.errors import UnsegError

TOL = {"rtol": 1e-5, "atol": 1e-5}
DEPTH = 2  # blocks in the compared models: one before the last, and the last (keys, norm)


def _sizes(arch: Arch) -> list[tuple[int, int]]:
    """Native, a smaller square, and a non-square size (fewer rows, more columns than native)."""
    native = (arch.image, arch.image)
    if arch.family == "dino":
        return [native, (160, 160), (112, 288)]
    return [native, (168, 168), (126, 588)]


def test_every_listed_vit_is_covered():
    listed = {s.name for s in list_backbones() if s.family in ("dino", "dinov2")}
    assert listed == set(ARCHS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_official_layout_loads_strictly_at_full_depth(name):
    arch = ARCHS[name]
    with torch.device("meta"):
        model = build_backbone(name)
        state = {k: torch.empty(s) for k, s in official_shapes(arch, FULL_DEPTH).items()}
    load_strict(model, state, name)  # the loader create_backbone uses: names and shapes exact
    bad = dict(state)
    bad["blocks.0.attn.qkv.weight"] = torch.empty(arch.dim, arch.dim, device="meta")
    with pytest.raises(UnsegError, match="shape mismatches"):
        load_strict(model, bad, name)


def _pair(name: str) -> tuple[VisionTransformer, torch.nn.Module]:
    """unseg's ViT ``name`` and its ``transformers`` counterpart, ``DEPTH`` blocks, loaded with
    the same random official-format weights (strictly on both sides)."""
    arch = ARCHS[name]
    state = official_state_dict(arch, DEPTH, seed=1)
    with torch.device("meta"):
        registered = build_backbone(name)
    ours = shallow(registered, DEPTH)
    load_strict(ours, state, name)
    ref = hf_model(arch, DEPTH)
    ref.load_state_dict(official_to_hf(state, arch), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", list(ARCHS))
def test_tokens_and_keys_match_transformers(name):
    arch = ARCHS[name]
    ours, ref = _pair(name)
    gen = torch.Generator().manual_seed(2)
    for i, (h, w) in enumerate(_sizes(arch)):
        if i == 1 and not arch.registers:
            use_official_interpolation(ref, arch)  # transformers' own recipe differs off-native
        images = torch.rand(2 if i == 1 else 1, 3, h, w, generator=gen)  # a batch once
        with torch.no_grad():
            tokens = ours.forward_features(images, "tokens")
            keys = ours.forward_features(images, "keys")
        ref_tokens, ref_keys = hf_outputs(ref, arch, ours.normalize(images))
        assert tokens.shape == (images.shape[0], arch.dim, h // arch.patch, w // arch.patch)
        torch.testing.assert_close(tokens, ref_tokens, **TOL, msg=f"tokens at {h}x{w}")
        torch.testing.assert_close(keys, ref_keys, **TOL, msg=f"keys at {h}x{w}")


def _grids(m: int) -> list[tuple[int, int]]:
    return [(m, m), (m // 2, m // 2), (m - 3, m + 5), (m, m + 3), (4, 2 * m + 1), (2 * m, 3)]


@pytest.mark.parametrize("name", ["dino_vits16", "dino_vits8", "dinov2_vits14",
                                  "dinov2_vits14_reg4"])
def test_pos_embed_follows_the_official_recipe(name):
    arch = ARCHS[name]
    offset, antialias = official_recipe(arch)
    with torch.device("meta"):
        cfg = build_backbone(name).cfg
    assert (cfg.interp_offset, cfg.interp_antialias) == (offset, antialias)
    m = arch.native_grid
    table = 0.5 * torch.randn(1, 1 + m * m, 16, generator=torch.Generator().manual_seed(3))
    for gh, gw in _grids(m):
        hh, ww = gh * arch.patch, gw * arch.patch
        expected = official_pos_embed(table, gh * gw, hh, ww, arch.patch, offset, antialias)
        ours = interpolate_pos_embed(table, (gh, gw), cfg.interp_offset, cfg.interp_antialias)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6, msg=f"grid {gh}x{gw}")


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14", "dinov2_vits14_reg4"])
def test_transformers_recipe_is_official_only_with_registers(name):
    """What the comparisons above rely on: transformers interpolates as the official code does
    for the ``_reg`` models only; for the others it differs by far more than round-off."""
    arch = ARCHS[name]
    small = Arch(arch.family, arch.patch, 48, 3, arch.image, arch.registers)
    ref = hf_model(small, 1)
    table = ref.embeddings.position_embeddings
    with torch.no_grad():
        table.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    table = table.detach()
    offset, antialias = official_recipe(arch)
    m = arch.native_grid
    for gh, gw in _grids(m)[1:]:
        hh, ww = gh * arch.patch, gw * arch.patch
        tokens = torch.zeros(1, 1 + gh * gw, small.dim)
        with torch.no_grad():
            theirs = ref.embeddings.interpolate_pos_encoding(tokens, hh, ww)
        official = official_pos_embed(table, gh * gw, hh, ww, arch.patch, offset, antialias)
        gap = (theirs - official).abs().max().item()
        if arch.registers:
            assert gap <= 1e-6, (gh, gw, gap)
        else:
            assert gap > 1e-2, (gh, gw, gap)


def test_a_wrong_layernorm_epsilon_would_be_seen():
    """The random weights keep the residual stream's variance near the epsilon
    (``official_state_dict``), so 1e-5 instead of the official 1e-6 is far outside ``TOL``."""
    arch = ARCHS["dino_vits16"]
    ours, ref = _pair("dino_vits16")
    images = torch.rand(1, 3, arch.image, arch.image, generator=torch.Generator().manual_seed(2))
    ref_tokens, _ = hf_outputs(ref, arch, ours.normalize(images))
    for m in ours.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-5
    with torch.no_grad():
        tokens = ours.forward_features(images, "tokens")
    assert (tokens - ref_tokens).abs().max() > 100 * TOL["atol"]
