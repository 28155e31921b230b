"""Weight files: strict loading of official-format checkpoints, safe formats, cache, download."""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unseg.backbones import (
    BackboneSpec,
    WeightsSpec,
    create_backbone,
    default_backbone_name,
    get_spec,
    weights_status,
)
from unseg.backbones import weights as weights_module
from unseg.backbones.weights import download, resolve_weights
from unseg.errors import InputFileError, UnsegError


def official_dino_state(dim: int, patch: int, grid: int, depth: int = 12, v2_regs: int = -1):
    """A state dict written from the official DINO / DINOv2 naming scheme (random values).

    ``v2_regs`` >= 0 adds the DINOv2 extras (LayerScale, mask token, that many registers).
    """
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(dim),
            b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim),
            b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim),
            b + "attn.proj.bias": r(dim),
            b + "norm2.weight": r(dim),
            b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim),
            b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim),
            b + "mlp.fc2.bias": r(dim),
        }
        if v2_regs >= 0:
            sd |= {b + "ls1.gamma": r(dim), b + "ls2.gamma": r(dim)}
    if v2_regs >= 0:
        sd["mask_token"] = r(1, dim)
        if v2_regs:
            sd["register_tokens"] = r(1, v2_regs, dim)
    sd |= {"norm.weight": r(dim), "norm.bias": r(dim)}
    return sd


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNSEG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_official_dino_state_dict_loads_strictly(tmp_path):
    sd = official_dino_state(384, 16, 14)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    model = create_backbone("dino_vits16", weights=path)
    assert model.weights_sha256 == _sha(path)
    torch.testing.assert_close(model.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"])


@pytest.mark.parametrize(("name", "regs"), [("dinov2_vits14", 0), ("dinov2_vits14_reg4", 4)])
def test_official_dinov2_state_dict_loads_strictly_from_safetensors(tmp_path, name, regs):
    sd = official_dino_state(384, 14, 37, v2_regs=regs)
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    model = create_backbone(name, weights=path)
    torch.testing.assert_close(model.blocks[3].ls2.gamma, sd["blocks.3.ls2.gamma"])
    assert model.weights_sha256 == _sha(path)


@pytest.mark.parametrize("name", ["dinov2_vits14.bin", "dinov2_vits14"])
def test_a_safetensors_file_is_read_whatever_its_suffix(tmp_path, name):
    """A safetensors file named e.g. x.bin was taken for a torch file, "not a weights file"."""
    sd = official_dino_state(384, 14, 37, v2_regs=0)
    path = tmp_path / name
    save_file(sd, str(path))
    model = create_backbone("dinov2_vits14", weights=path)
    torch.testing.assert_close(model.blocks[3].ls2.gamma, sd["blocks.3.ls2.gamma"])


def _load_error(sd: dict, path: Path, name: str) -> str:
    """The message of the error that loading ``sd``, saved at ``path``, into ``name`` raises."""
    torch.save(sd, path)
    with pytest.raises(UnsegError) as err:
        create_backbone(name, weights=path)
    return str(err.value)


def test_renamed_key_fails_naming_it(tmp_path):
    sd = official_dino_state(384, 16, 14)
    sd["blocks.3.attn.qkv_renamed.weight"] = sd.pop("blocks.3.attn.qkv.weight")
    path = tmp_path / "bad.pth"
    msg = _load_error(sd, path, "dino_vits16")
    assert "1 missing keys: blocks.3.attn.qkv.weight" in msg
    assert "1 unexpected keys: blocks.3.attn.qkv_renamed.weight" in msg
    assert str(path) in msg


def test_wrong_shapes_are_listed_with_counts(tmp_path):
    sd = official_dino_state(384, 16, 14)  # a ViT-S/16 checkpoint into a ViT-S/8 model
    msg = _load_error(sd, tmp_path / "s16.pth", "dino_vits8")
    assert "2 shape mismatches" in msg
    assert "pos_embed (1, 197, 384) vs (1, 785, 384)" in msg
    assert "patch_embed.proj.weight (384, 3, 16, 16) vs (384, 3, 8, 8)" in msg


def test_many_mismatches_show_ten_and_a_count(tmp_path):
    sd = official_dino_state(384, 16, 14)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    msg = _load_error(sd, tmp_path / "noblocks.pth", "dino_vits16")
    assert re.search(r"144 missing keys: .*\(\+134 more\)", msg)


def test_wrapped_training_checkpoint_is_unwrapped_explicitly(tmp_path):
    sd = official_dino_state(384, 16, 14)
    wrapped = {
        "teacher": {f"module.backbone.{k}": v for k, v in sd.items()}
        | {"module.head.last_layer.weight": torch.zeros(3, 2)},
        "epoch": torch.tensor(100),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(wrapped, path)
    model = create_backbone("dino_vits16", weights=path)
    torch.testing.assert_close(model.norm.weight, sd["norm.weight"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(InputFileError, match="cannot read weights"):
        create_backbone("dino_vits16", weights=path)
    with pytest.raises(InputFileError, match="weights file not found"):
        create_backbone("dino_vits16", weights=tmp_path / "absent.pth")
    with pytest.raises(InputFileError, match="a folder, not a weights file"):
        create_backbone("dino_vits16", weights=tmp_path)


def test_cache_is_used_and_its_hash_recorded_then_verified(home):
    spec = get_spec("dino_vits8")
    assert weights_status(spec).status == "download"
    assert default_backbone_name() == "efficientnet_lite2"
    dest = home / "weights" / "dino_deitsmall8_pretrain.pth"
    dest.parent.mkdir(parents=True)
    torch.save(official_dino_state(384, 8, 28), dest)
    st = weights_status(spec)
    assert (st.status, st.path) == ("cached", dest)
    assert default_backbone_name() == "dino_vits8"
    model = create_backbone("dino_vits8")
    assert model.weights_sha256 == _sha(dest)
    sidecar = dest.with_name(dest.name + ".sha256")
    assert sidecar.read_text().split()[0] == _sha(dest)
    torch.save(official_dino_state(384, 8, 28, depth=12) | {"extra": torch.zeros(1)}, dest)
    with pytest.raises(InputFileError, match="SHA-256 mismatch"):
        create_backbone("dino_vits8")


def _file_spec(src, sha=None) -> BackboneSpec:
    return BackboneSpec(
        name="toy",
        family="test",
        stride=1,
        dim=1,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        weights=WeightsSpec(url=src.resolve().as_uri(), filename="toy.pth", sha256=sha),
    )


def test_download_into_cache_records_hash(home, tmp_path):
    src = tmp_path / "served.pth"
    torch.save({"w": torch.arange(5.0)}, src)
    path, digest = resolve_weights(_file_spec(src))
    assert path == home / "weights" / "toy.pth"
    assert digest == _sha(src) == _sha(path)
    assert (home / "weights" / "toy.pth.sha256").read_text().split()[0] == digest
    assert resolve_weights(_file_spec(src)) == (path, digest)  # second time: from the cache


def test_download_with_wrong_hash_saves_nothing(home, tmp_path):
    src = tmp_path / "served.pth"
    src.write_bytes(b"not the official file")
    with pytest.raises(UnsegError, match="expected 0000"):
        download(src.as_uri(), home / "weights" / "toy.pth", "0000")
    assert not (home / "weights" / "toy.pth").exists()
    assert [p.name for p in (home / "weights").iterdir()] == []


def test_offline_error_names_url_and_destination(home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec = get_spec("dino_vitb8")
    with pytest.raises(UnsegError) as err:
        create_backbone("dino_vitb8")
    msg = str(err.value)
    assert spec.weights.url in msg
    assert str(home / "weights" / "dino_vitbase8_pretrain.pth") in msg
    assert not (home / "weights" / "dino_vitbase8_pretrain.pth").exists()


def test_unseg_home_naming_a_file_is_a_clear_error(home, monkeypatch):
    """UNSEG_HOME set to a file made the offline message ask for weights at <file>/weights/..."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_text("not a folder")
    with pytest.raises(UnsegError, match=f"UNSEG_HOME={home}: a file, not a folder"):
        create_backbone("dino_vitb8")


def test_damaged_cached_file_records_no_hash_so_its_replacement_loads(home):
    dest = home / "weights" / "dino_deitsmall8_pretrain.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"PK\x03\x04 an interrupted copy")
    with pytest.raises(InputFileError, match="cannot read weights"):
        create_backbone("dino_vits8")
    assert not dest.with_name(dest.name + ".sha256").exists()
    torch.save(official_dino_state(384, 8, 28) | {"extra": torch.zeros(1)}, dest)
    with pytest.raises(UnsegError, match="unexpected keys"):
        create_backbone("dino_vits8")
    assert not dest.with_name(dest.name + ".sha256").exists()
    torch.save(official_dino_state(384, 8, 28), dest)
    assert create_backbone("dino_vits8").weights_sha256 == _sha(dest)
    assert dest.with_name(dest.name + ".sha256").read_text().split()[0] == _sha(dest)


def test_a_read_only_cache_loads_and_warns_it_cannot_record_the_hash(home, monkeypatch, caplog):
    dest = home / "weights" / "dino_deitsmall8_pretrain.pth"
    dest.parent.mkdir(parents=True)
    torch.save(official_dino_state(384, 8, 28), dest)

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weights_module, "write_bytes_atomic", read_only)
    assert create_backbone("dino_vits8").weights_sha256 == _sha(dest)
    assert "cannot record" in caplog.text and "Permission denied" in caplog.text
