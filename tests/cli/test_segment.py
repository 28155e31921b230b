"""Semantic pipeline end to end: segment, save → load → predict, seeds, CLI, bad input."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from unseg.backbones import get_spec
from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.pipelines.folder import fit as fit_semantic
from unseg.pipelines.folder import predict, segment
from unseg.pipelines.kind import Settings
from unseg.runs import save_run

BACKBONE = "efficientnet_lite0"
SETTINGS = Settings(backbone=BACKBONE, size=64, num_workers=1)
FAST = {"options": {"steps": 12, "student_augs": False}, "settings": SETTINGS}


def write_images(folder: Path, n: int = 3) -> list[Path]:
    """Photos-like synthetic images: coloured regions with texture, different sizes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 64 + 16 * i, 96
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = (40, 90, 200)  # sky
        img[h // 2 :] = (60, 140, 50)  # grass
        img[h // 3 : 2 * h // 3, w // 3 : w // 2] = (200, 40, 40)  # an object
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seg")
    images = root / "images"
    write_images(images)
    out = root / "out"
    report = segment(images, out, "primaps-em", 3, **FAST)
    assert report.ok and len(report.written) == 3
    return images, out


def test_segment_writes_masks_overlays_and_a_run(segmented: tuple[Path, Path]) -> None:
    images, out = segmented
    for src in sorted(images.glob("*.png")):
        mask = Image.open(out / "masks" / src.name)
        assert mask.mode == "P" and mask.getpalette() is not None
        arr = np.asarray(mask)
        assert arr.shape == np.asarray(Image.open(src)).shape[:2]
        assert arr.max() < 3
        overlay = Image.open((out / "overlays" / src.name).with_suffix(".jpg"))
        assert overlay.size == mask.size
    meta = json.loads((out / "run" / "config.json").read_text())
    assert meta["method"] == "primaps-em" and meta["backbone"] == BACKBONE
    tap = get_spec(BACKBONE).default_tap
    assert meta["num_classes"] == 3 and meta["tap"] == tap
    assert meta["feature_dim"] == get_spec(BACKBONE).tap_info(tap).dim
    assert len(meta["weights_sha256"]) == 64
    # the rate that ran is recorded: the paper's 5e-3 with the reference classifier, else 1e-3
    want_lr = 5e-3 if meta["config"]["classifier"] == "reference" else 1e-3
    assert meta["config"]["lr"] == want_lr and meta["config"]["ema_decay"] == 0.98
    assert meta["predict"] == {"flip": True, "refine": "crf", "label_factor": 2}
    stages = set(meta["timings"])
    assert {"decode", "backbone", "proposals", "fitting", "refinement", "writing"} <= stages
    assert any((out / "run" / "cache" / "primaps").rglob("*.safetensors"))


def test_save_load_predict_gives_identical_masks(segmented: tuple[Path, Path], tmp_path: Path):
    images, out = segmented
    report = predict(out / "run", images, tmp_path / "again", {}, None)
    assert report.ok
    for src in sorted(images.glob("*.png")):
        a = np.asarray(Image.open(out / "masks" / src.name))
        b = np.asarray(Image.open(tmp_path / "again" / "masks" / src.name))
        assert np.array_equal(a, b)


@pytest.mark.parametrize("refine", ["none", "guided", "guided+crf"])
def test_refine_override_changes_only_refinement(segmented, tmp_path: Path, refine: str):
    images, out = segmented
    assert predict(out / "run", images, tmp_path / refine, {"refine": refine}, None).ok
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / refine / "masks").glob("*.png"))]
    assert len(masks) == 3 and all(m.max() < 3 for m in masks)


def test_fixed_seed_gives_identical_runs(segmented: tuple[Path, Path], tmp_path: Path) -> None:
    images, out = segmented
    fit_semantic(images, tmp_path / "again", "primaps-em", 3, **FAST)
    wa = load_file(out / "run" / "weights.safetensors")
    wb = load_file(tmp_path / "again" / "weights.safetensors")
    assert wa.keys() == wb.keys() == {"prototypes", "gain", "running", "running_gain"}
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def test_broken_and_tiny_images_are_reported_and_the_rest_finished(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, n=2)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "tiny.png")
    report = segment(images, tmp_path / "out", "primaps-em", 3, **FAST)
    failed = {p.name: why for p, why in report.failed}
    assert set(failed) == {"broken.jpg", "tiny.png"}
    assert "patch" in failed["tiny.png"]
    assert sorted(p.name for p in report.written) == ["img0.png", "img1.png"]


def test_the_report_lists_the_inputs_that_failed(tmp_path: Path, capsys) -> None:
    """The command's report, and `unseg report` later, list the inputs that got no mask with
    their problems (escaped: a file name is not markup), from the folder's manifest."""
    import html

    from unseg.outdir import read_manifest

    images = tmp_path / "images"
    write_images(images, n=3)
    bad = "<b>broken&.jpg"
    (images / bad).write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    assert main(["-q", "segment", str(images), "--out", str(out), "--method", "kmeans", "-k",
                 "2", "--backbone", BACKBONE, "--size", "64", "--refine", "none"]) == 1
    entry = read_manifest(out)["commands"][-1]
    assert entry["failed_count"] == 1 and entry["failed"][0]["path"].endswith(bad)
    for page in (out / "report.html", tmp_path / "again.html"):
        if not page.exists():
            assert main(["report", str(out), "--out", str(page)]) == 0
        text = page.read_text(encoding="utf-8")
        assert "Inputs that failed" in text and "1 input(s) could not be used" in text
        assert html.escape(bad) in text and bad not in text
    capsys.readouterr()
    write_images(tmp_path / "fine", n=3)  # a clean run: no section
    assert main(["-q", "segment", str(tmp_path / "fine"), "--out", str(tmp_path / "o2"),
                 "--method", "kmeans", "-k", "2", "--backbone", BACKBONE, "--size", "64",
                 "--refine", "none"]) == 0
    assert "Inputs that failed" not in (tmp_path / "o2" / "report.html").read_text()


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, n=1)
    with pytest.raises(UnsegError, match="at least 2"):
        fit_semantic(images, tmp_path / "r", "kmeans", 1, **FAST)
    with pytest.raises(UnsegError, match="larger than the number of feature vectors"):
        fit_semantic(images, tmp_path / "r", "kmeans", 200, settings=SETTINGS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsegError, match="no images found"):
        fit_semantic(tmp_path / "empty", tmp_path / "r", "primaps-em", 3, **FAST)
    save_run(tmp_path / "other", "saliency-head", {"epochs": 1}, {})
    # one predict serves every kind of run: a broken saliency run is its own clear error
    with pytest.raises(UnsegError, match="saliency-head state lacks tensor"):
        predict(tmp_path / "other", images, tmp_path / "o")
    run = tmp_path / "oldrun"
    save_run(run, "kmeans", {"num_classes": 3}, {})
    cfg = json.loads((run / "config.json").read_text())
    cfg["format_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsegError, match="format version"):
        predict(run, images, tmp_path / "o")
    incomplete = tmp_path / "incomplete"
    save_run(incomplete, "kmeans", {"num_classes": 3}, {})
    with pytest.raises(UnsegError, match="k-means state lacks tensor 'prototypes'"):
        predict(incomplete, images, tmp_path / "o")
    unknown = tmp_path / "unknown"
    save_run(unknown, "kmeans", {"num_classes": 3, "colour": "red"}, {})
    with pytest.raises(UnsegError, match="unknown KMeansConfig settings: colour"):
        predict(unknown, images, tmp_path / "o")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("backbone", None, "lacks 'backbone'"),
    ("predict", None, "lacks 'predict'"),
    ("feature_size", "abc", "'feature_size' is 'abc', not an integer"),
    ("tap", "s16", "fitted on 320-channel features, but efficientnet_lite0 at tap 's16' gives 112"),
])
def test_a_hand_edited_run_config_is_a_clear_error(segmented, tmp_path: Path, key: str,
                                                   value: object, match: str) -> None:
    images, out = segmented
    run = tmp_path / "run"
    run.mkdir()
    (run / "weights.safetensors").write_bytes((out / "run" / "weights.safetensors").read_bytes())
    meta = json.loads((out / "run" / "config.json").read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UnsegError, match=match):
        predict(run, images, tmp_path / "o")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p[:, :100], "100-channel prototypes, but efficientnet_lite0 at tap 's32' gives "
     "320-channel features"),
    (lambda p: p.index_fill(1, torch.tensor([0]), float("nan")),
     r"run/weights.safetensors: PriMaPs-EM state: tensor .prototypes. holds NaN or infinite"),
])
def test_hand_edited_prototypes_are_a_clear_error(segmented, tmp_path: Path, edit,
                                                  match: str) -> None:
    """Prototypes of another width ended in an einsum traceback at predict, NaN ones in an
    IndexError: both are refused when the run is loaded."""
    images, out = segmented
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text((out / "run" / "config.json").read_text())
    state = load_file(out / "run" / "weights.safetensors")
    state["prototypes"] = edit(state["prototypes"]).contiguous()
    save_file(state, run / "weights.safetensors")
    with pytest.raises(UnsegError, match=match):
        predict(run, images, tmp_path / "o")


def test_cli_segment_kmeans_predict_and_exit_codes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, n=2)
    args = ["-q", "segment", str(images), "--backbone", BACKBONE, "--size", "64", "--workers", "1",
            "-k", "3", "--method", "kmeans", "--refine", "none", "--n-init", "2"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    meta = json.loads((tmp_path / "ok" / "run" / "config.json").read_text())
    assert meta["method"] == "kmeans" and meta["predict"]["refine"] == "none"
    assert meta["config"]["n_init"] == 2
    assert set(load_file(tmp_path / "ok" / "run" / "weights.safetensors")) == {"prototypes"}
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    # a broken image: reported, exit status 1, the others predicted
    assert main(["-q", "predict", str(tmp_path / "ok" / "run"), str(images), "--out",
                 str(tmp_path / "p")]) == 1
    assert sorted(p.name for p in (tmp_path / "p" / "masks").glob("*.png")) == [
        "img0.png", "img1.png"]
    assert main(["-q", "fit", "kmeans", str(images), "-k", "1", "--out", str(tmp_path / "x"),
                 "--backbone", BACKBONE]) == 2
    # an option of the other method is refused by name
    assert main([*args, "--out", str(tmp_path / "y"), "--classifier", "cosine"]) == 2


def test_student_augmentations_train_on_another_view(segmented: tuple[Path, Path], tmp_path: Path):
    images, out = segmented
    fit_semantic(images, tmp_path / "s", "primaps-em", 3, settings=SETTINGS,
                 options={"steps": 12, "student_augs": True})
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    assert meta["config"]["student_augs"] is True
    plain = load_file(out / "run" / "weights.safetensors")["running"]
    assert not np.array_equal(load_file(tmp_path / "s" / "weights.safetensors")["running"], plain)


def test_torchrun_two_processes_fit_like_one(segmented: tuple[Path, Path], tmp_path: Path):
    """Features, pseudo-labels and the EM training (DDP) split across 2 gloo processes give the
    prototypes of a single-process fit, and the masks predicted from both runs agree."""
    import os
    import subprocess
    import sys

    images, out = segmented
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "unseg.cli.main", "-q", "fit", "primaps-em", str(images), "-k", "3",
        "--out", str(tmp_path / "ddp"), "--backbone", BACKBONE, "--size", str(SETTINGS.size),
        "--steps", "12", "--no-student-augs", "--workers", "1", "--device", "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(out / "run" / "weights.safetensors")
    two = load_file(tmp_path / "ddp" / "weights.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(two[k].numpy(), one[k].numpy(), atol=1e-4)
    report = predict(tmp_path / "ddp", images, tmp_path / "pred", {"refine": "crf"}, "cpu")
    assert report.ok
    for p in sorted((out / "masks").glob("*.png")):
        a = np.asarray(Image.open(p))
        b = np.asarray(Image.open(tmp_path / "pred" / "masks" / p.name))
        assert (a == b).mean() > 0.99


def test_predict_reads_a_dataset_root_through_its_layout(segmented: tuple[Path, Path], tmp_path):
    """Predicting on a dataset root writes one mask per photo, named as the photo, and none for
    its ground-truth masks."""
    images, out = segmented
    root = tmp_path / "ECSSD"
    (root / "images").mkdir(parents=True)
    (root / "ground_truth_mask").mkdir()
    for src in sorted(images.glob("*.png")):
        Image.open(src).convert("RGB").save(root / "images" / f"{src.stem}.jpg")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "ground_truth_mask" / src.name)
    report = predict(out / "run", root, tmp_path / "p", {"refine": "none"}, None)
    assert report.ok
    masks = tmp_path / "p" / "masks"
    written = sorted(str(p.relative_to(masks)) for p in (tmp_path / "p").rglob("*.png"))
    assert written == ["img0.png", "img1.png", "img2.png"]


def test_more_classes_than_a_label_png_holds_are_refused(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, n=1)
    with pytest.raises(UnsegError, match="at most 256"):
        fit_semantic(images, tmp_path / "r", "kmeans", 300, **FAST)
    run = tmp_path / "big"
    save_run(run, "kmeans", {"num_classes": 300}, {"prototypes": torch.zeros(300, 432)}, extra={
        "backbone": BACKBONE, "weights_sha256": "0" * 64, "feature_size": 64,
        "num_classes": 300, "predict": {"flip": False, "refine": "none", "label_factor": 1}})
    with pytest.raises(UnsegError, match="at most 256"):
        predict(run, images, tmp_path / "o")


def test_the_tap_reaches_the_run_and_prediction_rebuilds_it(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_images(images, n=2)
    args = ["-q", "segment", str(images), "--backbone", BACKBONE, "--tap", "s16", "--size", "64",
            "--workers", "1", "-k", "3", "--method", "kmeans", "--refine", "none",
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    meta = json.loads((tmp_path / "o" / "run" / "config.json").read_text())
    assert meta["tap"] == "s16" and meta["feature_dim"] == 112
    report = predict(tmp_path / "o" / "run", images, tmp_path / "p", {}, None)
    assert report.ok
    for p in sorted((tmp_path / "o" / "masks").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(p)),
                              np.asarray(Image.open(tmp_path / "p" / "masks" / p.name)))


def test_centring_follows_the_backbones_measured_default():
    from unseg.backbones import list_backbones
    from unseg.pipelines.semantic import pipeline_values

    centred = [s for s in list_backbones() if s.default_center]
    plain = [s for s in list_backbones() if not s.default_center]
    assert centred and plain
    spec = centred[0]
    assert pipeline_values(3, Settings(backbone=spec.name))["center"] is True
    other = next(t for t in spec.tap_table if t != spec.default_tap)
    assert pipeline_values(3, Settings(backbone=spec.name, tap=other))["center"] is False
    assert pipeline_values(3, Settings(backbone=plain[0].name))["center"] is False


def test_runs_share_a_cache_dir_and_fit_as_with_their_own(segmented, tmp_path: Path) -> None:
    """``cache_dir``: features and pseudo-labels go there instead of RUN/cache, a second run
    reuses them (the cached files are not rewritten), and the fit is the one a private cache
    gives."""
    images, out = segmented
    shared = replace(SETTINGS, cache_dir=str(tmp_path / "cache"))
    opts = {"options": FAST["options"], "settings": shared}
    fit_semantic(images, tmp_path / "a", "primaps-em", 3, **opts)
    assert not (tmp_path / "a" / "cache").exists()
    cached = sorted(p for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert any("primaps" in p.parts for p in cached) and any("features" in p.parts for p in cached)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    fit_semantic(images, tmp_path / "b", "primaps-em", 3, **opts)
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == cached
    for run in ("a", "b"):
        got = load_file(tmp_path / run / "weights.safetensors")
        want = load_file(out / "run" / "weights.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_primaps_em_classifier_follows_the_features_norm(segmented, tmp_path: Path) -> None:
    """The reference classifier where features are LayerNorm-ed (ViT tokens), the cosine one on
    a CNN's features; ``--classifier`` overrides the default and the run records what was used."""
    from unseg.backbones import list_backbones
    from unseg.pipelines.semantic import pipeline_values

    for spec in list_backbones():
        want = "reference" if spec.family in ("dino", "dinov2") else "cosine"
        assert spec.layer_normed == (want == "reference"), spec.name
        assert pipeline_values(3, Settings(backbone=spec.name))["classifier"] == want
    images, out = segmented
    assert json.loads((out / "run" / "config.json").read_text())["config"]["classifier"] == "cosine"
    options = {**FAST["options"], "classifier": "reference"}
    fit_semantic(images, tmp_path / "ref", "primaps-em", 3, options=options, settings=SETTINGS)
    config = json.loads((tmp_path / "ref" / "config.json").read_text())["config"]
    assert config["classifier"] == "reference"


def test_predict_keeps_one_progress_bar_over_its_parts(segmented, tmp_path: Path, monkeypatch):
    """`unseg predict` extracts and predicts in parts; one bar counts every image written."""
    import unseg.pipelines.label_maps as label_maps
    import unseg.pipelines.semantic as semantic

    images, out = segmented
    bars: list[tuple[int, list[int]]] = []

    class Recorder:
        def __init__(self, total: int) -> None:
            self.updates: list[int] = []
            bars.append((total, self.updates))

        def update(self, n: int = 1) -> None:
            self.updates.append(n)

    @contextmanager
    def recording_bar(total: int, desc: str | None = None):
        yield Recorder(total)

    monkeypatch.setattr(semantic, "progress_bar", recording_bar)
    monkeypatch.setattr(semantic, "PART", 2)  # the 3 images in two parts (2 + 1) ...
    monkeypatch.setattr(label_maps, "CHUNK", 1)  # ... predicted one by one
    report = predict(out / "run", images, tmp_path / "o")
    assert len(report.written) == 3 and len(bars) == 1
    assert bars[0] == (3, [1, 1, 1])
