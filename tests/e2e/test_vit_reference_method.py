"""PriMaPs-EM end to end on the reference ViT's features: the same random ``dino_vits8`` weights
(official format, full depth) run once through unseg's ViT and once through ``transformers``'
ViTModel behind unseg's backbone contract; ``segment`` (features with their mirror and student
view, PriMaPs pseudo-labels with the CRF, the EM, flip-averaged prediction with the CRF) gives
the same features, proposals, pseudo-labels, fitted prototypes and masks on real images.

The images are resized to a 160 short side (not the native 224 x 224), so the reference uses the
official position-embedding recipe restated (``test_vit_reference.py`` shows unseg follows it and
that ``transformers``' own recipe differs off the native grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from vit_reference import (
    ARCHS,
    ReferenceBackbone,
    hf_model,
    official_state_dict,
    official_to_hf,
    use_official_interpolation,
)

import unseg.pipelines.semantic as semantic
from unseg.feature_store import load_cache
from unseg.pipelines.folder import segment
from unseg.pipelines.kind import Settings
from unseg.proposals.primaps import principal_masks
from unseg.runs import load_fitted

NAME = "dino_vits8"
IMAGES = ("2007_000033.jpg", "2007_000042.jpg", "2007_000061.jpg")
K = 4
FEATURE_TOL = {"rtol": 3e-5, "atol": 3e-5}  # 12 blocks of float32 round-off (seen: 3e-6)
pytestmark = [pytest.mark.slow, pytest.mark.realdata]  # two full-depth S/8 runs on VOC images


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    jpegs = shared_data("VOC2012") / "VOCdevkit" / "VOC2012" / "JPEGImages"
    root = tmp_path_factory.mktemp("vitref")
    images = root / "images"
    images.mkdir()
    for name in IMAGES:
        (images / name).symlink_to(jpegs / name)
    arch = ARCHS[NAME]
    state = official_state_dict(arch, seed=5)
    weights = root / "dino_deitsmall8_pretrain.pth"
    torch.save(state, weights)
    reference = hf_model(arch, 12)
    reference.load_state_dict(official_to_hf(state, arch), strict=True)
    use_official_interpolation(reference, arch)
    ref_backbone = ReferenceBackbone(NAME, reference).requires_grad_(False).eval()
    settings = Settings(backbone=NAME, weights=str(weights), size=160, num_workers=1)
    options = {"epochs": 4, "batch_size": 2}
    out = {}
    for which in ("unseg", "reference"):
        if which == "reference":
            mp = pytest.MonkeyPatch()
            mp.setattr(semantic, "open_backbone", lambda *a, **k: ref_backbone)
        try:
            report = segment(images, root / which, "primaps-em", K, options=options,
                             settings=settings)
        finally:
            if which == "reference":
                mp.undo()
        assert report.ok and len(report.written) == len(IMAGES)
        out[which] = root / which
    return out


def _features(run: Path):
    (index,) = (run / "run" / "cache" / "features").glob("*/index.json")
    return load_cache(index.parent)


def test_features_match(runs):
    ours, ref = _features(runs["unseg"]), _features(runs["reference"])
    assert sorted(p.name for p in ours.paths) == sorted(IMAGES)
    for p in ours.paths:
        assert ours[p].shape[0] == 384 and min(ours[p].shape[1:]) == 160 // 8
        torch.testing.assert_close(ours[p], ref[p], **FEATURE_TOL)
        for extra in ("flipped", "student"):
            torch.testing.assert_close(ours.extra(p, extra), ref.extra(p, extra), **FEATURE_TOL)


def test_primaps_proposals_match(runs):
    ours, ref = _features(runs["unseg"]), _features(runs["reference"])
    for p in ours.paths:
        a, b = principal_masks(ours[p]), principal_masks(ref[p])
        assert a.masks.shape[0] >= 2 and a.masks.shape == b.masks.shape
        assert (a.stop, a.iterations) == (b.stop, b.iterations)
        torch.testing.assert_close(a.masks, b.masks, rtol=1e-5, atol=1e-5)  # seen: 9e-7
    labels = [sorted((run / "run" / "cache" / "primaps").glob("*/*.safetensors"))
              for run in (runs["unseg"], runs["reference"])]
    assert len(labels[0]) == len(IMAGES)
    assert [f.name for f in labels[0]] == [f.name for f in labels[1]]
    for fa, fb in zip(*labels, strict=True):
        la, lb = load_file(fa), load_file(fb)
        assert la.keys() == lb.keys()
        for key in la:
            assert torch.equal(la[key], lb[key]), fa.name


def test_fitted_model_and_masks_match(runs):
    _, ours, meta = load_fitted(runs["unseg"] / "run", "semantic", "cpu")
    _, ref, ref_meta = load_fitted(runs["reference"] / "run", "semantic", "cpu")
    assert meta["backbone"] == ref_meta["backbone"] == NAME
    assert meta["weights_sha256"] != ref_meta["weights_sha256"]  # the reference really ran
    assert meta["config"]["classifier"] == "reference"  # the ViT's LayerNorm-ed tokens
    torch.testing.assert_close(ours.prototypes_, ref.prototypes_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.gain_, ref.gain_, rtol=1e-5, atol=1e-6)
    masks = sorted((runs["unseg"] / "masks").glob("*.png"))
    assert len(masks) == len(IMAGES)
    used = set()
    for m in masks:
        a = np.asarray(Image.open(m))
        b = np.asarray(Image.open(runs["reference"] / "masks" / m.name))
        assert a.shape == b.shape and np.array_equal(a, b), m.name
        used |= set(np.unique(a).tolist())
    assert len(used) >= 2  # not a degenerate one-class output
    config = json.loads((runs["unseg"] / "run" / "config.json").read_text())
    assert config["feature_size"] == 160
