"""DINO (v1) and DINOv2 Vision Transformers with the official parameter names.

Official checkpoints load with ``strict=True``: ``patch_embed.proj``, ``cls_token``,
``pos_embed [1, 1 + N, D]``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``norm``; DINOv2 adds ``blocks.{i}.ls1.gamma`` / ``ls2.gamma``, ``mask_token`` and (``_reg4``)
``register_tokens``. Dense maps exclude the CLS and register tokens.

Position embeddings are interpolated bicubically from the native grid to the input grid the way
the official code does it: DINO v1 and DINOv2 without registers pass a scale factor
``(grid + 0.1) / native`` (the "+0.1" offset of facebookresearch/dino issue 8), DINOv2 with
registers passes the output size and uses antialiasing. At the native grid the table is used as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unseg.backbones.base import Backbone, BackboneSpec, FeatureKind, WeightsSpec, register_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT variant (defaults: DINO v1 ViT-S/16)."""

    patch: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    native_grid: int = 14  # 224 / 16 for DINO v1; 518 / 14 = 37 for DINOv2
    layerscale: bool = False
    mask_token: bool = False
    registers: int = 0
    interp_offset: float = 0.1
    interp_antialias: bool = False


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool
) -> torch.Tensor:
    """``[1, 1 + M*M, D]`` → ``[1, 1 + h*w, D]`` for the token grid ``grid = (h, w)``.

    Identity at the native grid; otherwise the patch part is resized bicubically (CLS kept).
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    dtype = pos_embed.dtype
    cls_pos = pos_embed[:, :1].float()
    d = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    if offset:
        scale = ((h + offset) / m, (w + offset) / m)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias
        )
    else:
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=antialias)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d)
    return torch.cat([cls_pos, patch_pos], dim=1).to(dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens ``[B, h*w, D]`` via a strided conv ``proj``."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, D]`` → q, k, v each ``[B, heads, N, D / heads]``."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv_heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linear layers with GELU in between (hidden = 4 * dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (DINOv2)."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; optional LayerScale (``ls1``, ``ls2``)."""

    def __init__(self, dim: int, heads: int, layerscale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """A DINO / DINOv2 ViT returning dense ``[B, D, H/p, W/p]`` tokens or last-block keys."""

    def __init__(self, spec: BackboneSpec, cfg: ViTConfig) -> None:
        super().__init__(spec)
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.native_grid**2, d))
        if cfg.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, d))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.layerscale) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02): the official trunc_normal_(std=0.02) truncates at +-2 (absolute), i.e. ~never
        for p in (self.cls_token, self.pos_embed, getattr(self, "register_tokens", None)):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` → tokens ``[B, 1 + R + h*w, D]`` (CLS, registers)."""
        b = x.shape[0]
        grid = (x.shape[-2] // self.cfg.patch, x.shape[-1] // self.cfg.patch)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        pos = interpolate_pos_embed(
            self.pos_embed, grid, self.cfg.interp_offset, self.cfg.interp_antialias
        )
        tokens = tokens + pos
        if self.cfg.registers:
            regs = self.register_tokens.expand(b, -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    def _features(self, x: torch.Tensor, kind: FeatureKind) -> torch.Tensor:
        b, _, hh, ww = x.shape
        h, w = hh // self.cfg.patch, ww // self.cfg.patch
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        last = self.blocks[-1]
        if kind == "keys":
            _, k, _ = last.attn.qkv_heads(last.norm1(t))
            out = k.transpose(1, 2).reshape(b, t.shape[1], self.cfg.dim)
        else:
            out = self.norm(last(t))
        out = out[:, 1 + self.cfg.registers :]
        return out.transpose(1, 2).reshape(b, self.cfg.dim, h, w)


_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{1}_pretrain.pth"

_SMALL = {"dim": 384, "heads": 6}
_BASE = {"dim": 768, "heads": 12}


def _register() -> None:
    dino = {
        "dino_vits16": ("dino_deitsmall16_pretrain", 16, _SMALL),
        "dino_vits8": ("dino_deitsmall8_pretrain", 8, _SMALL),
        "dino_vitb16": ("dino_vitbase16_pretrain", 16, _BASE),
        "dino_vitb8": ("dino_vitbase8_pretrain", 8, _BASE),
    }
    for name, (ckpt, patch, size) in dino.items():
        cfg = ViTConfig(patch=patch, native_grid=224 // patch, **size)
        url = _DINO_URL.format(ckpt)
        _add(name, "dino", cfg, WeightsSpec(url=url, filename=f"{ckpt}.pth"))
    for arch, size in (("dinov2_vits14", _SMALL), ("dinov2_vitb14", _BASE)):
        for reg in (0, 4):
            name = f"{arch}_reg4" if reg else arch
            cfg = ViTConfig(
                patch=14,
                native_grid=37,
                layerscale=True,
                mask_token=True,
                registers=reg,
                interp_offset=0.0 if reg else 0.1,
                interp_antialias=bool(reg),
                **size,
            )
            url = _DINOV2_URL.format(arch, name)
            _add(name, "dinov2", cfg, WeightsSpec(url=url, filename=f"{name}_pretrain.pth"))


def _add(name: str, family: str, cfg: ViTConfig, weights: WeightsSpec) -> None:
    spec = BackboneSpec(
        name=name,
        family=family,
        stride=cfg.patch,
        dim=cfg.dim,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=weights,
        keys_note="last block's attention keys (k of qkv), heads concatenated",
        layer_normed=True,
    )
    register_backbone(spec, lambda s, c=cfg: VisionTransformer(s, c))


_register()
