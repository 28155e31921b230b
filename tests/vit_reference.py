"""The independent side of the ViT checks: official-format state dicts, their mapping onto Hugging
Face ``transformers`` models, and the official position-embedding recipe restated.

Official checkpoint keys (facebookresearch/dino ``vision_transformer.py``; facebookresearch/dinov2
``dinov2/models/vision_transformer.py`` and ``dinov2/layers``, built with ``block_chunks=0`` by
``dinov2/hub/backbones.py``, so blocks are ``blocks.{i}`` and the head is an Identity)::

    cls_token [1, 1, D]            pos_embed [1, 1 + M*M, D]     patch_embed.proj.{weight, bias}
    blocks.{i}.norm1.{weight, bias}     blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]}
    blocks.{i}.attn.proj.{weight, bias} blocks.{i}.norm2.{weight, bias}
    blocks.{i}.mlp.fc1.{weight [4D, D], bias}  blocks.{i}.mlp.fc2.{weight [D, 4D], bias}
    norm.{weight, bias}
    DINOv2 adds: mask_token [1, D], blocks.{i}.ls1.gamma [D], blocks.{i}.ls2.gamma [D];
    with registers: register_tokens [1, R, D].

The name mapping official → ``transformers`` 5.x (:func:`official_to_hf`):

    ==============================  =====================================================
    official                        ViTModel (v1) / Dinov2Model, Dinov2WithRegistersModel
    ==============================  =====================================================
    cls_token                       embeddings.cls_token
    pos_embed                       embeddings.position_embeddings
    mask_token (v2)                 embeddings.mask_token
    register_tokens (v2 reg)        embeddings.register_tokens
    patch_embed.proj.*              embeddings.patch_embeddings.projection.*
    blocks.{i}.norm1.*              layers.{i}.layernorm_before.* / encoder.layer.{i}.norm1.*
    blocks.{i}.attn.qkv.* rows      ...attention.q_proj.*, k_proj.*, v_proj.*: rows [0, D),
                                    [D, 2D), [2D, 3D) (the official forward reshapes the
                                    qkv output to [B, N, 3, heads, D / heads])
    blocks.{i}.attn.proj.*          ...attention.o_proj.*
    blocks.{i}.ls1.gamma (v2)       encoder.layer.{i}.layer_scale1.lambda1
    blocks.{i}.norm2.*              layers.{i}.layernorm_after.* / encoder.layer.{i}.norm2.*
    blocks.{i}.mlp.fc1.*, fc2.*     ...mlp.fc1.*, ...mlp.fc2.*
    blocks.{i}.ls2.gamma (v2)       encoder.layer.{i}.layer_scale2.lambda1
    norm.*                          layernorm.*
    ==============================  =====================================================

Position-embedding interpolation (:func:`official_pos_embed`), as the official code does it:
DINO v1 and the DINOv2 hub models without registers pass ``scale_factor = (grid + 0.1) / M``
(no antialiasing); the DINOv2 ``_reg`` hub models pass ``interpolate_offset=0.0`` and
``interpolate_antialias=True``, i.e. ``size = grid`` with antialiasing. Both return the table
unchanged when the token count and the pixel height and width agree (``npatch == N and w == h``).
``transformers`` resizes to ``size = grid``: without antialiasing in ViTModel and Dinov2Model,
with it in Dinov2WithRegistersModel, so only the latter follows the official recipe off the
native grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from unseg.backbones.base import Backbone, FeatureKind, build_backbone
from unseg.backbones.vit import VisionTransformer


@dataclass(frozen=True)
class Arch:
    """The published architecture of one listed backbone, from the official repositories."""

    family: str  # "dino" (v1) or "dinov2"
    patch: int
    dim: int
    heads: int
    image: int  # the pretraining size the position table is for (224; DINOv2 hub: 518)
    registers: int = 0

    @property
    def native_grid(self) -> int:
        return self.image // self.patch


_S = {"dim": 384, "heads": 6}
_B = {"dim": 768, "heads": 12}
ARCHS: dict[str, Arch] = {
    "dino_vits16": Arch("dino", 16, image=224, **_S),
    "dino_vits8": Arch("dino", 8, image=224, **_S),
    "dino_vitb16": Arch("dino", 16, image=224, **_B),
    "dino_vitb8": Arch("dino", 8, image=224, **_B),
    "dinov2_vits14": Arch("dinov2", 14, image=518, **_S),
    "dinov2_vitb14": Arch("dinov2", 14, image=518, **_B),
    "dinov2_vits14_reg4": Arch("dinov2", 14, image=518, registers=4, **_S),
    "dinov2_vitb14_reg4": Arch("dinov2", 14, image=518, registers=4, **_B),
}
FULL_DEPTH = 12


def official_shapes(arch: Arch, depth: int = FULL_DEPTH) -> dict[str, tuple[int, ...]]:
    """Key → shape of the official checkpoint of ``arch`` (module docstring)."""
    d, p, m = arch.dim, arch.patch, arch.native_grid
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + m * m, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
    }
    if arch.family == "dinov2":
        shapes["mask_token"] = (1, d)
    if arch.registers:
        shapes["register_tokens"] = (1, arch.registers, d)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
        }
        if arch.family == "dinov2":
            shapes |= {b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)}
    shapes |= {"norm.weight": (d,), "norm.bias": (d,)}
    return shapes


def official_state_dict(
    arch: Arch, depth: int = FULL_DEPTH, seed: int = 0, stream: float = 0.01
) -> dict[str, torch.Tensor]:
    """A random state dict in the official format, scaled so that every part matters: weights
    ``N(0, 1/fan_in)``, biases ``N(0, 0.1²)``, LayerNorm gains ``1 + N(0, 0.1²)``, layer scales
    ``U(0.2, 1)``, tokens and position table ``N(0, 0.5²)`` (so that a wrong interpolation shows);
    then what writes into the residual stream (tokens, position table, patch embedding, the
    attention and MLP output layers) is multiplied by ``stream``, so that the stream's variance
    (about ``stream²``) is near the LayerNorm epsilon and a wrong epsilon shows too.
    """
    gen = torch.Generator().manual_seed(seed)
    writers = ("cls_token", "pos_embed", "register_tokens", "patch_embed.", "attn.proj.",
               "mlp.fc2.")
    out = {}
    for key, shape in official_shapes(arch, depth).items():
        module = key.split(".")[-2] if "." in key else ""
        if key.endswith("gamma"):
            t = 0.2 + 0.8 * torch.rand(shape, generator=gen)
        elif module.startswith("norm") and key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("weight"):
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.5 * torch.randn(shape, generator=gen)
        if any(w in key for w in writers):
            t = t * stream
        out[key] = t
    return out


def shallow(model: VisionTransformer, depth: int) -> VisionTransformer:
    """A new unseg ViT with ``model``'s registered spec and config but ``depth`` blocks."""
    return VisionTransformer(model.spec, replace(model.cfg, depth=depth)).eval()


def hf_model(arch: Arch, depth: int) -> nn.Module:
    """The ``transformers`` model of ``arch`` with ``depth`` layers (random init, eval mode).

    Eager attention (unseg uses ``scaled_dot_product_attention``), LayerNorm eps 1e-6, qkv
    bias, exact GELU; DINOv2 adds layer scale and the mask token, ``_reg4`` four registers.
    """
    common = {
        "hidden_size": arch.dim,
        "num_hidden_layers": depth,
        "num_attention_heads": arch.heads,
        "image_size": arch.image,
        "patch_size": arch.patch,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "attn_implementation": "eager",
    }
    if arch.family == "dino":
        cfg = transformers.ViTConfig(intermediate_size=4 * arch.dim, **common)
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    elif arch.registers:
        cfg = transformers.Dinov2WithRegistersConfig(
            mlp_ratio=4, layerscale_value=1.0, num_register_tokens=arch.registers, **common
        )
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        cfg = transformers.Dinov2Config(mlp_ratio=4, layerscale_value=1.0, **common)
        model = transformers.Dinov2Model(cfg)
    return model.eval()


def _layer_prefix(arch: Arch) -> str:
    return "layers." if arch.family == "dino" else "encoder.layer."


def official_to_hf(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """Rename an official state dict to ``transformers``' names (module docstring's table)."""
    dino = arch.family == "dino"
    top = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "mask_token": "embeddings.mask_token",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    sub = {
        "norm1": "layernorm_before" if dino else "norm1",
        "norm2": "layernorm_after" if dino else "norm2",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        _, i, rest = key.split(".", 2)
        layer = f"{_layer_prefix(arch)}{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = value.chunk(3, dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{layer}attention.{proj}.{kind}"] = part
            continue
        module, kind = (rest, "") if rest.endswith("gamma") else rest.rsplit(".", 1)
        name = sub[module] if not kind else f"{sub[module]}.{kind}"
        out[layer + name] = value
    return out


def official_pos_embed(
    pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int, offset: float,
    antialias: bool,
) -> torch.Tensor:
    """The official ``interpolate_pos_encoding`` restated: ``pos_embed [1, 1 + N, D]`` for
    ``npatch`` patch tokens of an image whose ``x.shape`` is ``(B, C, w, h)`` — the official
    code names the height ``w`` and the width ``h``."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim = pos.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n))
    assert n == m * m
    if offset:
        kwargs = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)}
    else:
        kwargs = {"size": (w0, h0)}
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
        antialias=antialias, **kwargs,
    )
    assert (w0, h0) == patch_pos.shape[-2:]
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1).to(pos_embed.dtype)


def official_recipe(arch: Arch) -> tuple[float, bool]:
    """``(interpolate_offset, interpolate_antialias)`` of the official hub model of ``arch``."""
    return (0.0, True) if arch.registers else (0.1, False)


def use_official_interpolation(model: nn.Module, arch: Arch) -> None:
    """Make ``model`` (a ``transformers`` model of ``arch``) interpolate its position table with
    :func:`official_pos_embed` instead of its own recipe."""
    emb = model.embeddings
    offset, antialias = official_recipe(arch)

    def interpolate(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return official_pos_embed(
            emb.position_embeddings, embeddings.shape[1] - 1, height, width, arch.patch, offset,
            antialias,
        )

    emb.interpolate_pos_encoding = interpolate


@torch.no_grad()
def hf_outputs(
    model: nn.Module, arch: Arch, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transformers``' final-normed patch tokens and last-layer keys for normalised
    ``pixels [B, 3, H, W]``, both ``[B, D, H / p, W / p]`` (CLS and registers dropped; the keys
    are the last layer's ``k_proj`` output, captured by a forward hook)."""
    depth = model.config.num_hidden_layers
    k_proj = dict(model.named_modules())[f"{_layer_prefix(arch)}{depth - 1}.attention.k_proj"]
    seen: list[torch.Tensor] = []
    handle = k_proj.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        kwargs = {"interpolate_pos_encoding": True} if arch.family == "dino" else {}
        tokens = model(pixel_values=pixels, **kwargs).last_hidden_state
    finally:
        handle.remove()
    (keys,) = seen
    b, _, hh, ww = pixels.shape
    h, w = hh // arch.patch, ww // arch.patch
    skip = 1 + arch.registers

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, skip:].transpose(1, 2).reshape(b, arch.dim, h, w)

    return grid(tokens), grid(keys)


class ReferenceBackbone(Backbone):
    """A ``transformers`` model behind unseg's backbone contract, so that unseg's feature
    extraction and methods can run on the reference's features; ``spec`` is the unseg spec of
    the same backbone (mean / std, stride, dim)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__(build_backbone(name).spec)
        self.arch = ARCHS[name]
        self.model = model

    def _features(self, x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
        tokens, keys = hf_outputs(self.model, self.arch, x)
        return keys if kind == "keys" else tokens
