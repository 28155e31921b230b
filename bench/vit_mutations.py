"""How sensitive the ViT reference comparison is: plausible mistakes in unseg's ViT, each
applied to a copy of the model, must move its tokens or keys far outside the tolerance of
``tests/unit/test_vit_reference.py`` (rtol = atol = 1e-5).

Uses the test helpers (``tests/vit_reference.py``: random official-format weights, 2 blocks,
the ``transformers`` reference with the official interpolation restated off the native grid)
at the test's three sizes per backbone. Prints one JSON document: a row per mistake and backbone
with the largest difference over tokens and keys (or the error raised, or the wrong shape), the
unmutated baseline last, and the machine; a line per row goes to stderr as it is measured.

    PYTHONPATH=src .venv/bin/python bench/vit_mutations.py [--mutation LABEL ...]
        [--backbone NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _machine import machine
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # vit_reference.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

import test_vit_reference as T
from vit_reference import ARCHS, hf_outputs, use_official_interpolation

from unseg.backbones import vit
from unseg.backbones.vit import VisionTransformer

Mutation = Callable[[VisionTransformer], None]


def compare(name: str, mutate: Mutation) -> dict[str, Any]:
    """The largest token / key difference to the reference after ``mutate`` (``max_diff``),
    or the ``error`` it raised, or the token ``shape`` it gave instead of the reference's."""
    arch = ARCHS[name]
    ours, ref = T._pair(name)
    mutate(ours)
    worst = 0.0
    for i, (h, w) in enumerate(T._sizes(arch)):
        if i == 1 and not arch.registers:
            use_official_interpolation(ref, arch)
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(2))
        try:
            with torch.no_grad():
                tokens, keys = ours.forward_features(x, "tokens"), ours.forward_features(x, "keys")
        except Exception as exc:  # a mistake that breaks the shapes is caught too
            return {"error": f"{type(exc).__name__}: {exc}"}
        ref_tokens, ref_keys = hf_outputs(ref, arch, ours.normalize(x))
        if tokens.shape != ref_tokens.shape:
            return {"shape": list(tokens.shape), "reference_shape": list(ref_tokens.shape)}
        worst = max(worst, (tokens - ref_tokens).abs().max().item(),
                    (keys - ref_keys).abs().max().item())
    return {"max_diff": float(f"{worst:.3g}")}


def _eps(m: VisionTransformer) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = 1e-5


def _gelu_tanh(m: VisionTransformer) -> None:
    for b in m.blocks:
        b.mlp.act = nn.GELU(approximate="tanh")


def _ls_swapped(m: VisionTransformer) -> None:
    for b in m.blocks:
        b.ls1, b.ls2 = b.ls2, b.ls1


def _cfg(**changes: object) -> Mutation:
    def mutate(m: VisionTransformer) -> None:
        m.cfg = dataclasses.replace(m.cfg, **changes)

    return mutate


def _qkv(order: tuple[int, int, int]) -> Mutation:
    def mutate(m: VisionTransformer) -> None:
        for b in m.blocks:
            orig = b.attn.qkv_heads
            b.attn.qkv_heads = lambda x, orig=orig: tuple(orig(x)[i] for i in order)

    return mutate


def _heads_split(m: VisionTransformer) -> None:
    """Channels split as ``[head_dim, heads]`` instead of ``[heads, head_dim]``."""
    for blk in m.blocks:
        attn = blk.attn

        def split(x: torch.Tensor, attn: vit.Attention = attn) -> tuple[torch.Tensor, ...]:
            b, n, d = x.shape
            qkv = attn.qkv(x).reshape(b, n, 3, d // attn.heads, attn.heads).permute(2, 0, 4, 1, 3)
            return qkv[0], qkv[1], qkv[2]

        attn.qkv_heads = split


def _key_heads_reversed(m: VisionTransformer) -> None:
    orig = m._features

    def features(x: torch.Tensor, kind: str) -> torch.Tensor:
        out = orig(x, kind)
        if kind != "keys":
            return out
        b, d, h, w = out.shape
        return out.reshape(b, m.cfg.heads, d // m.cfg.heads, h, w).flip(1).reshape(b, d, h, w)

    m._features = features


def _keys_before_norm1(m: VisionTransformer) -> None:
    orig = m._features

    def features(x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind != "keys":
            return orig(x, kind)
        b, _, hh, ww = x.shape
        t = m.prepare_tokens(x)
        for blk in m.blocks[:-1]:
            t = blk(t)
        _, k, _ = m.blocks[-1].attn.qkv_heads(t)
        out = k.transpose(1, 2).reshape(b, t.shape[1], m.cfg.dim)[:, 1 + m.cfg.registers :]
        return out.transpose(1, 2).reshape(b, m.cfg.dim, hh // m.cfg.patch, ww // m.cfg.patch)

    m._features = features


def _tokens(m: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    grid = (x.shape[-2] // m.cfg.patch, x.shape[-1] // m.cfg.patch)
    pos = vit.interpolate_pos_embed(m.pos_embed, grid, m.cfg.interp_offset,
                                    m.cfg.interp_antialias)
    return torch.cat([m.cls_token.expand(b, -1, -1), m.patch_embed(x)], dim=1) + pos, pos


def _registers_last(m: VisionTransformer) -> None:
    def prepare(x: torch.Tensor) -> torch.Tensor:
        t, _ = _tokens(m, x)
        return torch.cat([t, m.register_tokens.expand(x.shape[0], -1, -1)], dim=1)

    m.prepare_tokens = prepare


def _registers_with_cls_pos(m: VisionTransformer) -> None:
    def prepare(x: torch.Tensor) -> torch.Tensor:
        t, pos = _tokens(m, x)
        regs = m.register_tokens.expand(x.shape[0], -1, -1) + pos[:, :1]
        return torch.cat([t[:, :1], regs, t[:, 1:]], dim=1)

    m.prepare_tokens = prepare


def _no_final_norm(m: VisionTransformer) -> None:
    m.norm = nn.Identity()


V1, V2, REG = "dino_vits16", "dinov2_vits14", "dinov2_vits14_reg4"
CASES: list[tuple[str, Mutation, list[str]]] = [
    ("LayerNorm eps 1e-5", _eps, [V1, REG]),
    ("tanh GELU", _gelu_tanh, [V1]),
    ("ls1 / ls2 swapped", _ls_swapped, [V2]),
    ("q / k swapped", _qkv((1, 0, 2)), [V1, REG]),
    ("k / v swapped", _qkv((0, 2, 1)), [V1]),
    ("heads split [head_dim, heads]", _heads_split, [V1]),
    ("key heads reversed", _key_heads_reversed, [V1]),
    ("keys before norm1", _keys_before_norm1, [V1]),
    ("no final norm", _no_final_norm, [V1]),
    ("no +0.1 offset", _cfg(interp_offset=0.0), [V1, "dino_vits8", V2]),
    ("no antialiasing", _cfg(interp_antialias=False), [REG]),
    ("+0.1 offset, no antialiasing", _cfg(interp_offset=0.1, interp_antialias=False), [REG]),
    ("registers after the patches", _registers_last, [REG]),
    ("registers with the CLS position", _registers_with_cls_pos, [REG]),
    ("none (baseline)", lambda m: None, [V1, V2, REG]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    labels = [label for label, _, _ in CASES]
    parser.add_argument("--mutation", action="append", choices=labels, metavar="LABEL",
                        help="only this mistake (repeatable; default all): " + "; ".join(labels))
    parser.add_argument("--backbone", action="append", choices=sorted(ARCHS), metavar="NAME",
                        help="only this backbone (repeatable; default each mistake's own)")
    args = parser.parse_args()
    rows = []
    for label, mutate, names in CASES:
        if args.mutation and label not in args.mutation:
            continue
        for name in names:
            if args.backbone and name not in args.backbone:
                continue
            result = compare(name, mutate)
            print(f"{label:32s} {name:20s} {json.dumps(result)}", file=sys.stderr, flush=True)
            rows.append({"mutation": label, "backbone": name, **result})
    json.dump({
        "benchmark": "ViT reference comparison: how far plausible mistakes move tokens and keys",
        "tolerance": "rtol = atol = 1e-5 (tests/unit/test_vit_reference.py)",
        "rows": rows,
        "machine": machine(),
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
