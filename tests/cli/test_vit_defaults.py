"""The defaults a user gets once the DINO weights are in the cache (README, "With DINO weights"):
an official-format ``dino_vits8`` file made here, put where the download would go
(``$UNSEG_HOME/weights``), turns every command's default backbone to ``dino_vits8`` and, through
it, the tap, the PriMaPs-EM classifier and centring; the sizes and batches stay as they are.
Nothing here depends on the device: ``--device`` defaults to CUDA when present and changes none
of these values (features are computed in float32 there too)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from vit_reference import ARCHS, official_state_dict

import unseg.pipelines.semantic as semantic
from unseg.backbones import create_backbone, default_backbone_name, get_spec
from unseg.cli.common import run_settings
from unseg.cli.main import build_parser
from unseg.features import extract_features
from unseg.methods.found import FoundConfig
from unseg.methods.saliency import SaliencyHeadConfig
from unseg.pipelines.backbone import choose_backbone
from unseg.registry import get_method
from unseg.utils.hashing import file_sha256


@pytest.fixture(scope="module")
def dino_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding random official-format ``dino_vits8`` weights (full depth)."""
    home = tmp_path_factory.mktemp("home")
    path = home / "weights" / get_spec("dino_vits8").weights.filename
    path.parent.mkdir()
    torch.save(official_state_dict(ARCHS["dino_vits8"]), path)
    return home


@pytest.fixture
def dino_cache(dino_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``UNSEG_HOME`` set to :func:`dino_home`; returns the weights file."""
    monkeypatch.setenv("UNSEG_HOME", str(tmp_path / "empty"))
    assert default_backbone_name() == "efficientnet_lite2"  # without them: the packaged fallback
    monkeypatch.setenv("UNSEG_HOME", str(dino_home))
    return dino_home / "weights" / get_spec("dino_vits8").weights.filename


def test_cached_weights_make_dino_vits8_the_default_and_load_strictly(dino_cache):
    name, why = choose_backbone(None)
    assert name == default_backbone_name() == "dino_vits8"
    assert why == f"default backbone: dino_vits8 (weights cached in {dino_cache.parent})"
    model = create_backbone(name, device="cpu")
    assert model.weights_sha256 == file_sha256(dino_cache)
    assert dino_cache.with_name(dino_cache.name + ".sha256").is_file()  # recorded on first use
    assert (model.tap, model.stride, model.dim) == ("last", 8, 384)
    assert model.spec.layer_normed and not model.spec.default_center


def test_segment_defaults_with_dino_weights(dino_cache):
    args = build_parser().parse_args(["segment", "images", "--out", "out"])
    assert (args.method, args.num_classes, args.discover, args.device) == (
        "primaps-em", 5, "auto", None)
    settings = run_settings(args, "segment")
    assert settings.backbone == "dino_vits8" and settings.tap is None
    assert (settings.size, settings.max_side, settings.label_factor) == (None, None, 2)
    spec, config, resolved = semantic._method(args.method, args.num_classes, None, settings)
    assert (resolved.size, resolved.max_side) == (320, 1280)  # 4 x the 320 short side
    # the ViT's LayerNorm-ed tokens: the reference classifier, no centring
    assert (config.classifier, config.center) == ("reference", False)
    assert (config.epochs, config.batch_size, config.flip, config.crf) == (50, 32, True, True)
    assert spec.feature_kind == "tokens"
    _, kmeans, _ = semantic._method("kmeans", 5, None, settings)
    assert kmeans.center is False
    params = inspect.signature(extract_features).parameters  # what the pipeline leaves as is
    assert params["batch_size"].default == 8 and params["dtype"].default == torch.float32


def test_discover_defaults_with_dino_weights(dino_cache):
    args = build_parser().parse_args(["discover", "images", "--out", "out"])
    assert (args.method, args.backbone, args.tap, args.device) == ("auto", None, None, None)
    assert choose_backbone(args.backbone)[0] == "dino_vits8"
    head = SaliencyHeadConfig()
    assert (head.image_size, head.batch_size) == (320, 8)  # spectral predicts at image_size
    assert get_method("saliency-head").feature_kind == get_method("found").feature_kind == "keys"
    # FOUND standardises its input only on CNN features (resolved in saliency_config)
    assert FoundConfig().standardize is None and get_spec("dino_vits8").layer_normed
