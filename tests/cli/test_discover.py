"""`unseg discover`, `unseg fit saliency` and `unseg predict` end to end, and bad input."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.cli.main import main
from unseg.data.image import load_label
from unseg.layout import BOXES_FILE, MASKS_DIR, WEIGHTS_FILE
from unseg.methods.collapse import MIN_PREDICTED
from unseg.pipelines import saliency
from unseg.pipelines.folder import MaskWriter, discover
from unseg.pipelines.kind import Prediction, Settings
from unseg.pipelines.saliency import saliency_maps
from unseg.pipelines.saved_head import INPUTS_KEY
from unseg.refine.guided_filter import GuidedFilterConfig
from unseg.refine.saliency_crf import SaliencyCRFConfig, crf_foreground
from unseg.utils.batch import BatchReport

BACKBONE = "stand_in16"  # the stand-in every command builds (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("registered_stand_in")


def _square(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (40 + 20 * rng.random((h, w, 3))).astype(np.uint8)
    img[h // 4 : h // 2 + 10, w // 3 : w // 3 + h // 3] = (230, 220, 40)
    return img


def predict_masks(paths, out, prob_fn, guided, size, stride):
    """The folder pipeline's saliency prediction of ``paths`` with the map ``prob_fn``: its
    :func:`saliency_maps` written by its :class:`MaskWriter` (masks and boxes.json)."""
    report = BatchReport()
    writer = MaskWriter(out, Path(os.path.commonpath(paths)), False, False, report)
    for path, mask, box in saliency_maps(paths, prob_fn, guided, size, stride, report):
        writer.write(Prediction(path, mask, None, box))
    writer.close()
    return report


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i, (h, w) in enumerate([(96, 128), (120, 90), (100, 100)]):
        Image.fromarray(_square(h, w, i)).save(d / f"img{i}.png")
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(d / "blank.png")
    Image.fromarray(_square(12, 9, 5)).save(d / "tiny.png")  # smaller than one patch
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


def _check_outputs(out, folder, expect_failed=("broken", "tiny")):
    boxes = json.loads((out / BOXES_FILE).read_text())
    for p in folder.iterdir():
        if p.stem in expect_failed:
            assert p.stem not in boxes
            continue
        mask = load_label(out / MASKS_DIR / f"{p.stem}.png")
        h, w = np.asarray(Image.open(p)).shape[:2]
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        box = boxes[p.stem]
        if box is None:
            assert (mask < 128).all()
        else:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert (mask[int(y0) : int(y1), int(x0) : int(x1)] >= 128).any()
    return boxes


@pytest.mark.parametrize("gf", ["--guided-filter", "--no-guided-filter"])
def test_discover_spectral(folder, tmp_path, gf, capsys):
    out = tmp_path / "out"
    code = main(["-q", "discover", str(folder), "--out", str(out), "--backbone", BACKBONE, gf])
    assert code == 1  # the broken and the tiny file are reported, the rest are written
    boxes = _check_outputs(out, folder)
    assert boxes["img0"] is not None


def test_the_dense_crf_is_the_default_refinement(folder, tmp_path):
    """The measured default: the spectral cut's maps and a trained head's go through the dense
    CRF (the same masks as ``--dense-crf``) unless the run or ``unseg predict`` says otherwise."""
    from unseg.methods.head_config import HeadTrainingConfig
    from unseg.pipelines.saliency import _crf_settings

    base = ["-q", "discover", str(folder), "--backbone", BACKBONE, "--method", "spectral"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 1
    assert main([*base, "--out", str(tmp_path / "crf"), "--dense-crf"]) == 1
    for name in ("img0", "img1", "img2"):
        np.testing.assert_array_equal(
            load_label(tmp_path / "default" / MASKS_DIR / f"{name}.png"),
            load_label(tmp_path / "crf" / MASKS_DIR / f"{name}.png"))
    unset, off, on = (HeadTrainingConfig(dense_crf=v) for v in (None, False, True))
    assert _crf_settings(unset, {}) == SaliencyCRFConfig()
    assert _crf_settings(on, {}) == SaliencyCRFConfig()
    assert _crf_settings(off, {}) is None
    assert _crf_settings(off, {"dense_crf": True}) == SaliencyCRFConfig()
    assert _crf_settings(on, {"dense_crf": False}) is None
    assert _crf_settings(unset, {"dense_crf": False}) is None


def test_discover_dense_crf_refines_the_unfiltered_map(folder, tmp_path):
    """``--dense-crf`` runs the 2-label CRF on the spectral cut's 0/1 map instead of the guided
    filter (on by default): each mask is the CRF of the unrefined one, to 8-bit rounding."""
    base = ["-q", "discover", str(folder), "--backbone", BACKBONE, "--method", "spectral"]
    assert main([*base, "--out", str(tmp_path / "plain"), "--no-guided-filter",
                 "--no-dense-crf"]) == 1
    assert main([*base, "--out", str(tmp_path / "crf"), "--dense-crf", "--crf-temperature",
                 "2"]) == 1
    for name in ("img0", "img1", "img2"):
        plain = load_label(tmp_path / "plain" / MASKS_DIR / f"{name}.png")
        image = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"))
        prob = torch.from_numpy(plain / 255.0).float()
        expected = crf_foreground(prob, image, SaliencyCRFConfig(temperature=2.0))
        got = load_label(tmp_path / "crf" / MASKS_DIR / f"{name}.png").astype(int)
        assert np.abs(got - (expected * 255).round().numpy()).max() <= 1


def test_a_map_the_crf_erases_stays_unrefined():
    """The CRF smooths a small confident blob on a flat image away (no pixel left at 0.5);
    the pipeline then keeps the unrefined map, and the CRF's map everywhere else."""
    from unseg.pipelines.saliency import saliency_maps, unless_erased
    from unseg.utils.batch import BatchReport

    flat = np.full((60, 80, 3), 120, np.uint8)
    blob = torch.zeros(60, 80)
    blob[30:33, 40:43] = 1.0
    erased = crf_foreground(blob, flat)
    assert float(erased.max()) < 0.5
    assert torch.equal(unless_erased(erased, blob), blob)
    edged = flat.copy()
    edged[30:33, 40:43] = 250  # the same blob with an edge the CRF keeps
    kept = crf_foreground(blob, edged)
    assert float(kept.max()) >= 0.5 and torch.equal(unless_erased(kept, blob), kept)
    empty = torch.zeros(60, 80)
    assert torch.equal(unless_erased(crf_foreground(empty, flat), empty),
                       crf_foreground(empty, flat))
    paths = [Path("flat.png"), Path("edged.png")]
    arrays = {paths[0]: flat, paths[1]: edged}
    out = {p: m for p, m, _ in saliency_maps(
        paths, lambda image: blob.clone(), None, 64, 16, BatchReport(), arrays=arrays,
        crf=SaliencyCRFConfig())}
    np.testing.assert_array_equal(out[paths[0]], (blob * 255).round().to(torch.uint8).numpy())
    np.testing.assert_array_equal(out[paths[1]],
                                  (kept * 255).round().to(torch.uint8).numpy())


def test_dense_crf_above_its_pixel_cap_runs_shrunk(monkeypatch):
    """Above CRF_MAX_PIXELS the CRF runs on a shrunk copy and its map is upsampled: the same
    size out, and still pulled onto the object (a colour square the 0/1 map overshoots by 4
    pixels on every side)."""
    import unseg.pipelines.saliency as saliency

    image = np.full((80, 120, 3), 30, np.uint8)
    image[20:60, 30:90] = (230, 190, 70)
    prob = torch.zeros(80, 120)
    prob[16:64, 24:96] = 1.0
    truth = torch.zeros(80, 120, dtype=torch.bool)
    truth[20:60, 30:90] = True
    iou = lambda m: float((m & truth).sum() / (m | truth).sum())  # noqa: E731
    whole = saliency._crf_refine(prob, image, SaliencyCRFConfig())
    monkeypatch.setattr(saliency, "CRF_MAX_PIXELS", 80 * 120 // 2)
    shrunk = saliency._crf_refine(prob, image, SaliencyCRFConfig())
    assert shrunk.shape == whole.shape == (80, 120)
    assert iou(prob > 0.5) < 0.7
    assert iou(whole > 0.5) > 0.9 and iou(shrunk > 0.5) > 0.9


def test_discover_says_which_default_backbone(folder, tmp_path, capsys, monkeypatch):
    """The real default backbone (pretrained weights, offline) on one image."""
    monkeypatch.undo()
    img = folder / "img0.png"
    assert main(["-q", "discover", str(img), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "default backbone" in err
    assert "method spectral" in err and "tap s16+s32" in err  # the tap it was measured best on
    assert (tmp_path / "o" / MASKS_DIR / "img0.png").is_file()


def test_all_background_gives_empty_mask_and_null_box(folder, tmp_path):
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    report = predict_masks(
        paths, tmp_path / "o", lambda im: torch.zeros(im.shape[:2]), GuidedFilterConfig(), 320, 16
    )
    assert report.ok
    boxes = json.loads((tmp_path / "o" / BOXES_FILE).read_text())
    assert set(boxes) == {p.stem for p in paths} and all(v is None for v in boxes.values())
    assert all(load_label(tmp_path / "o" / MASKS_DIR / f"{p.stem}.png").max() == 0 for p in paths)


def test_extreme_aspect_is_reported_and_duplicate_stems_mirrored(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(_square(40, 40, 0)).save(d / "a.png")
    Image.fromarray(_square(40, 40, 1)).save(d / "sub" / "a.png")
    Image.fromarray(np.zeros((4, 2000, 3), np.uint8)).save(d / "strip.png")
    report = predict_masks(
        sorted(d.rglob("*.png")), tmp_path / "o", lambda im: torch.ones(im.shape[:2]), None, 320, 16
    )
    assert [(p.name, "aspect ratio" in m) for p, m in report.failed] == [("strip.png", True)]
    assert (tmp_path / "o" / MASKS_DIR / "a.png").is_file()
    assert (tmp_path / "o" / MASKS_DIR / "sub" / "a.png").is_file()
    assert set(json.loads((tmp_path / "o" / BOXES_FILE).read_text())) == {"a", "sub/a"}


def test_discover_works_panoramas_at_the_max_side_limit(tmp_path):
    """A 40x5000 strip at short side 320 would need 20x2500 patches: at the default long-side
    limit (4 x 320) it is worked at 16x1280 and its mask written at the input's size; with
    ``--max-side 0`` (no limit) it is refused by name."""
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(_square(40, 5000, 0)).save(d / "strip.png")
    Image.fromarray(_square(96, 128, 1)).save(d / "a.png")
    out = tmp_path / "o"
    assert main(["-q", "discover", str(d), "--out", str(out), "--backbone", BACKBONE]) == 0
    assert load_label(out / MASKS_DIR / "strip.png").shape == (40, 5000)
    base = ["-q", "discover", str(d), "--backbone", BACKBONE, "--max-side", "0"]
    assert main([*base, "--out", str(tmp_path / "o2")]) == 1
    assert not (tmp_path / "o2" / MASKS_DIR / "strip.png").exists()
    assert (tmp_path / "o2" / MASKS_DIR / "a.png").is_file()


def test_fit_saliency_then_predict_roundtrip(folder, tmp_path):
    run = tmp_path / "run"
    args = [
        "-q",
        "fit",
        "saliency",
        str(folder),
        "--out",
        str(run),
        "--backbone",
        BACKBONE,
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--size",
        "64",
        "--multiscale",
        "--lr",
        "1e-3",
    ]
    assert main(args) == 1  # broken.jpg and tiny.png reported
    meta = json.loads((run / "config.json").read_text())
    assert meta["method"] == "saliency-head" and meta["backbone"] == BACKBONE
    assert len(meta["weights_sha256"]) == 64
    assert meta["config"]["multiscale"] is True and meta["config"]["lr"] == 1e-3
    assert meta["training"]["n_images"] == 4
    out = tmp_path / "pred"
    code = main(["-q", "predict", str(run), str(folder), "--out", str(out), "--guide", "luma",
                 "--no-dense-crf"])
    assert code == 1
    _check_outputs(out, folder)
    out2 = tmp_path / "pred2"
    assert main(["-q", "predict", str(run), str(folder / "img1.png"), "--out", str(out2),
                 "--no-guided-filter", "--no-dense-crf"]) == 0
    a = load_label(out / MASKS_DIR / "img1.png").astype(int)
    b = load_label(out2 / MASKS_DIR / "img1.png").astype(int)
    assert a.shape == b.shape and (a != b).any()  # the filter changed something
    image = np.asarray(Image.open(folder / "img1.png").convert("RGB"))
    expected = crf_foreground(torch.from_numpy(b / 255.0).float(), image)
    for name, flags in (("pred3", ["--dense-crf"]), ("pred4", [])):  # the CRF of the raw map,
        out3 = tmp_path / name  # asked for or by default
        assert main(["-q", "predict", str(run), str(folder / "img1.png"), "--out", str(out3),
                     *flags]) == 0
        c = load_label(out3 / MASKS_DIR / "img1.png").astype(int)
        assert np.abs(c - (expected * 255).round().numpy()).max() <= 1


def test_guided_filter_options_under_the_crf_say_they_do_nothing(folder, tmp_path, caplog):
    """The dense CRF replaces the guided filter: ``--guide`` without ``--no-dense-crf`` warns
    (predict) or says so on discover's stderr line."""
    from unseg.cli.discover import _refinement

    run = tmp_path / "run"
    assert main(["-q", "fit", "found", str(folder), "--out", str(run), "--backbone", BACKBONE,
                 "--steps", "2", "--size", "64"]) == 1
    assert main(["-q", "predict", str(run), str(folder / "img1.png"), "--out",
                 str(tmp_path / "p"), "--guide", "luma"]) == 0
    assert "guided-filter options given do nothing" in caplog.text
    caplog.clear()
    assert main(["-q", "predict", str(run), str(folder / "img1.png"), "--out",
                 str(tmp_path / "q"), "--guide", "luma", "--no-dense-crf"]) == 0
    assert "do nothing" not in caplog.text
    assert "do nothing" in _refinement({"guided.guide": "luma"})
    assert "do nothing" not in _refinement({"guided.guide": "luma", "dense_crf": False})
    assert "do nothing" not in _refinement({"guided.radius": 5, "guided_filter": False})
    assert "do nothing" in _refinement({"guided_filter": True})


def test_predict_refuses_the_options_of_another_kind_of_run(folder, tmp_path, capsys):
    """`predict SEMANTIC_RUN --guided-filter` was silently ignored (the option is the saliency
    runs'): an option of another kind of run is refused, as an option of another method is."""
    found, km = tmp_path / "found", tmp_path / "km"
    assert main(["-q", "fit", "found", str(folder), "--out", str(found), "--backbone", BACKBONE,
                 "--steps", "2", "--size", "64"]) == 1
    assert main(["-q", "fit", "kmeans", str(folder), "-k", "2", "--out", str(km), "--backbone",
                 BACKBONE, "--size", "64", "--refine", "none", "--workers", "1"]) == 1
    capsys.readouterr()
    for run, flags, says in (
        (km, ["--guided-filter"], "--guided-filter applies to saliency runs only"),
        (km, ["--no-dense-crf"], "--dense-crf applies to saliency runs only"),
        (km, ["--guide", "luma"], "--guide applies to saliency runs only"),
        (km, ["-k", "3"], "--num-classes applies to maskcontrast runs only"),
        (found, ["--refine", "crf"], "--refine applies to semantic runs only"),
        (found, ["--clusters", "training"], "--clusters applies to maskcontrast runs only"),
    ):
        out = tmp_path / "p"
        assert main(["predict", str(run), str(folder), "--out", str(out), *flags]) == 2
        method = "found" if run == found else "kmeans"
        assert f"{says}, and {run} is a {method} run" in capsys.readouterr().err
        assert not out.exists()


def test_discover_head_trains_into_out_run(folder, tmp_path):
    img = folder / "img0.png"
    out = tmp_path / "o"
    code = main(
        [
            "-q",
            "discover",
            str(img),
            "--out",
            str(out),
            "--method",
            "head",
            "--backbone",
            BACKBONE,
            "--epochs",
            "1",
            "--train-images",
            str(folder),
        ]
    )
    assert code == 1  # broken.jpg in the training folder is reported
    assert (out / "run" / "config.json").is_file() and (out / MASKS_DIR / "img0.png").is_file()


def test_discover_says_how_many_heads_it_averages(folder, tmp_path, capsys):
    """The FOUND-style head is the mean of ``--ensemble`` heads (5 by default): discover's
    stderr line says so, and says nothing of it for one head; the saved run keeps the number."""
    for extra, said in (([], "the mean of 5 heads"), (["--ensemble", "1"], None)):
        out = tmp_path / f"o{len(extra)}"
        main(["-q", "discover", str(folder / "img0.png"), "--out", str(out), "--method",
              "found", "--backbone", BACKBONE, "--steps", "2", "--size", "64",
              "--train-images", str(folder), *extra])
        err = capsys.readouterr().err
        assert "method found (as asked)" in err
        assert (said in err) if said else ("the mean of" not in err)
        config = json.loads((out / "run" / "config.json").read_text())
        assert json.dumps(config).count(f'"ensemble": {5 if said else 1}') == 1


def test_predict_rejects_other_runs(tmp_path):
    with pytest.raises(SystemExit):
        main(["predict"])
    assert main(["predict", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def _saliency_dataset(root):
    """An ECSSD-layout root: photos in images/, their masks (same stems) in ground_truth_mask/."""
    (root / "images").mkdir(parents=True)
    (root / "ground_truth_mask").mkdir()
    for i in range(2):
        Image.fromarray(_square(96, 128, i)).save(root / "images" / f"{i:04d}.jpg")
        mask = np.zeros((96, 128), np.uint8)
        Image.fromarray(mask).save(root / "ground_truth_mask" / f"{i:04d}.png")
    return root


def test_discover_and_fit_read_a_dataset_root_through_its_layout(tmp_path):
    """The ground-truth masks of a dataset root are not photos: every command lists its images
    through the layout, as `fit` and `features` do."""
    root = _saliency_dataset(tmp_path / "ECSSD")
    out = tmp_path / "o"
    assert main(["-q", "discover", str(root), "--out", str(out), "--backbone", BACKBONE]) == 0
    assert sorted(p.name for p in (out / MASKS_DIR).iterdir()) == ["0000.png", "0001.png"]
    run = tmp_path / "run"
    assert main(["-q", "fit", "saliency", str(root), "--out", str(run), "--backbone", BACKBONE,
                 "--epochs", "1", "--size", "64"]) == 0
    assert json.loads((run / "config.json").read_text())["training"]["n_images"] == 2
    assert main(["-q", "predict", str(run), str(root), "--out", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p" / MASKS_DIR).iterdir()) == [
        "0000.png", "0001.png"]


def _fit_with_verdict(tmp_path, monkeypatch, capsys, verdict: tuple, *extra: str):
    """``fit saliency`` (one epoch) of a head whose collapse check gives the
    :class:`CollapseReport` of ``verdict``'s fields; ``extra``: more options. Returns the exit
    code, stdout and the run's recorded ``training``."""
    from unseg.methods.collapse import CollapseReport
    from unseg.methods.saliency import SaliencyHead

    def check(self, features, images):
        return CollapseReport(*verdict)

    monkeypatch.setattr(SaliencyHead, "check_collapse", check)
    root = _saliency_dataset(tmp_path / "ECSSD")
    run = tmp_path / "run"
    code = main(["-q", "fit", "saliency", str(root), "--out", str(run), "--backbone", BACKBONE,
                 "--epochs", "1", "--size", "64", *extra])
    training = json.loads((run / "config.json").read_text())["training"]
    return code, capsys.readouterr().out, training


def test_fit_saliency_reports_a_collapsed_head_and_records_it(tmp_path, monkeypatch, capsys):
    """A head whose training collapsed is saved, but the run records the verdict and the
    command says so and exits 1."""
    code, out, training = _fit_with_verdict(
        tmp_path, monkeypatch, capsys, ("constant", 2, 1.0, 1.0, 0.0, 1.0, False, 0.5, 0.5))
    assert code == 1
    assert "TRAINING FAILED (constant" in out
    collapse = training["collapse"]
    assert collapse["verdict"] == "constant" and collapse["failed"] is True


def test_fit_saliency_flags_oversized_masks_without_failing(tmp_path, monkeypatch, capsys):
    """Oversized masks are worth a look, not a failure: status 0, the verdict in the line and
    the run, restarts' scores recorded when there were restarts."""
    code, out, training = _fit_with_verdict(
        tmp_path, monkeypatch, capsys, ("oversized", 2, 0.7, 0.0, 0.0, 0.0, False, 0.5, 0.5),
        "--restarts", "2", "--restart-steps", "2")
    assert code == 0
    assert "check the masks (oversized" in out
    assert training["collapse"]["flagged"] is True and training["collapse"]["failed"] is False
    assert len(training["restarts"]) == 2 and sum(r["chosen"] for r in training["restarts"]) == 1


@pytest.mark.parametrize("band_pixels", [700, 1500])
def test_guided_filter_in_row_bands_equals_the_whole_image(monkeypatch, band_pixels):
    """Discover's guided filter runs in row bands with a 2r+1 halo above BAND_PIXELS; the bands
    give the whole image's result (bands of 7 and 15 rows at radius 9: halos larger than the
    bands, bands smaller than the radius)."""
    import unseg.pipelines.saliency as saliency

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (57, 100, 3), dtype=np.uint8)
    image[20:40, 30:70] = (250, 30, 30)
    prob = torch.from_numpy(rng.random((57, 100)).astype(np.float32))
    gf = GuidedFilterConfig(radius=9)
    whole = saliency._refine_whole(prob, image, gf)
    monkeypatch.setattr(saliency, "BAND_PIXELS", band_pixels)
    banded = saliency._refine(prob, image, gf)
    torch.testing.assert_close(banded, whole, atol=2e-5, rtol=0)
    monkeypatch.setattr(saliency, "BAND_PIXELS", 100)  # one row per band, still the same
    torch.testing.assert_close(saliency._refine(prob, image, gf), whole, atol=2e-5, rtol=0)


def test_degenerate_masks_over_the_predicted_set_are_warned_about(tmp_path, caplog):
    """A method that calls every pixel foreground on the images it predicts is reported, even
    though the masks are written; planted squares are not."""
    d = tmp_path / "images"
    d.mkdir()
    for i in range(MIN_PREDICTED + 1):
        Image.fromarray(_square(64, 64, i)).save(d / f"img{i}.png")
    paths = sorted(d.iterdir())
    with caplog.at_level(logging.WARNING, logger="unseg.pipelines.saliency"):
        report = predict_masks(paths, tmp_path / "o", lambda im: torch.ones(im.shape[:2]), None,
                               320, 16)
    assert report.ok and len(report.written) == len(paths)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "degenerate (constant)" in warned[0]
    caplog.clear()

    def square(im: torch.Tensor) -> torch.Tensor:
        prob = torch.zeros(im.shape[:2])
        prob[10:30, 10:30] = 1.0
        return prob

    with caplog.at_level(logging.WARNING, logger="unseg.pipelines.saliency"):
        predict_masks(paths, tmp_path / "p", square, None, 320, 16)
        # too few images to judge a set: no verdict
        predict_masks(paths[: MIN_PREDICTED - 1], tmp_path / "q",
                      lambda im: torch.ones(im.shape[:2]), None, 320, 16)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_oversized_masks_warn_unless_the_caller_expects_them(tmp_path, caplog):
    """Masks 70 % foreground are flagged with a warning; inside MaskContrast's mask-source
    context (which asks for large masks) the same flag is an INFO line giving its reason."""
    from unseg.pipelines.saliency import MASK_SOURCE_OPTIONS, mask_source_context

    d = tmp_path / "images"
    d.mkdir()
    for i in range(MIN_PREDICTED + 1):
        Image.fromarray(_square(64, 64, i)).save(d / f"img{i}.png")
    paths = sorted(d.iterdir())

    def large(im: torch.Tensor) -> torch.Tensor:
        prob = torch.zeros(im.shape[:2])
        prob[: int(0.7 * im.shape[0])] = 0.9
        return prob

    options = next(iter(MASK_SOURCE_OPTIONS.values()))
    with caplog.at_level(logging.INFO, logger="unseg.pipelines.saliency"):
        predict_masks(paths, tmp_path / "o", large, None, 320, 16)
        with mask_source_context(options):
            predict_masks(paths, tmp_path / "p", large, None, 320, 16)
        with mask_source_context(None):  # a source at discover's defaults: a warning
            predict_masks(paths, tmp_path / "q", large, None, 320, 16)
    flagged = [(r.levelno, r.getMessage()) for r in caplog.records if "oversized" in
               r.getMessage()]
    assert [lv for lv, _ in flagged] == [logging.WARNING, logging.INFO, logging.WARNING]
    assert "use another seed" in flagged[0][1] and "use another seed" in flagged[2][1]
    assert "expected here: MaskContrast's mask source" in flagged[1][1]


def test_auto_trains_the_found_head_only_on_a_large_enough_folder(tmp_path):
    from unseg.pipelines.saliency import AUTO_TRAINED, MIN_TRAIN_IMAGES, resolve_discover_method

    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.zeros((8, 8, 3), np.uint8)
    for i in range(MIN_TRAIN_IMAGES - 1):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    method, why = resolve_discover_method("auto", folder)
    assert method == "spectral" and f"only {MIN_TRAIN_IMAGES - 1} images" in why
    method, why = resolve_discover_method("auto", folder, train_images=tmp_path / "other")
    assert method == AUTO_TRAINED and "trained on" in why
    Image.fromarray(pixels).save(folder / "last.png")
    method, why = resolve_discover_method("auto", folder)
    assert method == AUTO_TRAINED and f"these {MIN_TRAIN_IMAGES} images" in why
    assert resolve_discover_method("spectral", folder)[0] == "spectral"
    assert resolve_discover_method("saliency-head", folder)[0] == "saliency-head"


def test_discover_says_which_method_ran(tmp_path, capsys):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_square(64, 96, i)).save(d / f"{i}.png")
    out = tmp_path / "o"
    assert main(["discover", str(d), "--out", str(out), "--backbone", BACKBONE, "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "method spectral: only 2 images" in err
    assert "refined by the dense CRF" in err  # spectral's measured default
    for flags, says in ((["--no-dense-crf"], "refined by the guided filter"),
                        (["--no-dense-crf", "--no-guided-filter"], "unrefined")):
        assert main(["discover", str(d), "--out", str(tmp_path / says), "--backbone", BACKBONE,
                     "--no-report", *flags]) == 0
        assert says in capsys.readouterr().err
    from unseg.cli.discover import _refinement

    assert _refinement({}) == "refined by the dense CRF"  # a head's default too
    assert _refinement({"dense_crf": False}) == "refined by the guided filter"


def test_a_heads_training_options_are_not_silently_ignored_by_spectral(tmp_path, capsys):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_square(64, 96, i)).save(d / f"{i}.png")
    base = ["discover", str(d), "--backbone", BACKBONE, "--no-report"]
    # asked for spectral: a training option is a clear error naming it
    assert main([*base, "--method", "spectral", "--out", str(tmp_path / "a"), "--epochs", "7"]) == 2
    err = capsys.readouterr().err
    assert "--epochs" in err and "trains nothing" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "masks").exists()
    # auto falls back to spectral on 2 images: the run goes on, and says what it ignored
    out = tmp_path / "b"
    assert main([*base, "--out", str(out), "--epochs", "7", "--guided-radius", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: --epochs" in err and "ignored" in err and "--guided-radius" not in err
    assert len(list((out / "masks").glob("*.png"))) == 2
    # the options spectral does use are accepted without a word
    assert main([*base, "--method", "spectral", "--out", str(tmp_path / "c"),
                 "--guided-radius", "5", "--no-guided-filter"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_found_heads_options_are_a_heads_training_options_for_spectral(tmp_path, capsys):
    """auto's head is FOUND-style: its --ensemble or --steps on a folder too small to train on
    is ignored with the warning a saliency-head option gets, not refused in the name of
    saliency-head (a method nobody asked for)."""
    d = tmp_path / "few"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_square(64, 96, i)).save(d / f"{i}.png")
    base = ["discover", str(d), "--backbone", BACKBONE, "--no-report"]
    out = tmp_path / "b"
    assert main([*base, "--out", str(out), "--ensemble", "2", "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: --" in err and "--ensemble" in err and "--steps" in err
    assert "ignored" in err and "saliency-head" not in err
    assert len(list((out / "masks").glob("*.png"))) == 2
    assert main([*base, "--method", "spectral", "--out", str(tmp_path / "a"),
                 "--ensemble", "2"]) == 2
    err = capsys.readouterr().err
    assert "--ensemble" in err and "trains nothing" in err and "saliency-head" not in err


def test_spectral_refuses_train_images_it_would_not_use(tmp_path, capsys):
    """--method spectral trains nothing: --train-images is an error naming it, as a head's
    training options are, not silently ignored."""
    d = tmp_path / "few"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_square(64, 96, i)).save(d / f"{i}.png")
    out = tmp_path / "a"
    assert main(["discover", str(d), "--out", str(out), "--backbone", BACKBONE, "--no-report",
                 "--method", "spectral", "--train-images", str(d)]) == 2
    err = capsys.readouterr().err
    assert "--train-images" in err and "trains nothing" in err and "Traceback" not in err
    assert not (out / "masks").exists()


def test_discover_gives_its_stage_seconds_to_a_callers_timings(folder, tmp_path):
    from unseg.pipelines.folder import discover
    from unseg.pipelines.kind import Settings
    from unseg.utils.timing import Timings

    timings = Timings()
    report = discover(folder, tmp_path / "o", "spectral", settings=Settings(backbone=BACKBONE),
                      timings=timings)
    assert len(report.written) == 4 and {p.stem for p, _ in report.failed} == {"broken", "tiny"}
    assert {"decode", "predicting", "writing"} <= set(timings.as_dict())


def test_spectral_and_the_found_head_default_to_the_measured_tap() -> None:
    """No tap asked: spectral and the FOUND-style head run on the stride-16 ``s16+s32`` tap
    (measured better than the default ``head`` tap), where the backbone has it."""
    from unseg.pipelines.kind import Settings
    from unseg.pipelines.saliency import SaliencyKind, method_tap

    lite2 = Settings(backbone="efficientnet_lite2")
    assert method_tap("spectral", lite2).tap == "s16+s32"
    assert method_tap("found", lite2).tap == "s16+s32"
    assert method_tap("found-head", lite2).tap == "s16+s32"
    assert method_tap("saliency-head", lite2).tap is None  # its default stays the backbone's
    assert method_tap("found", Settings(backbone="efficientnet_lite2", tap="head")).tap == "head"
    assert method_tap("spectral", Settings(backbone=BACKBONE)).tap is None  # no such tap
    kind = SaliencyKind.create("found-head", None, None, lite2)  # an alias: the same method
    assert kind.settings.tap == "s16+s32" and kind.stride() == 16
    assert SaliencyKind.create("spectral", None, None, lite2).settings.tap == "s16+s32"


def test_a_resumed_discover_reuses_the_head_it_trained(folder, tmp_path, monkeypatch):
    """`discover --resume` (and `segment --method maskcontrast --resume`, whose chain discovers
    first) trained its head again although the killed attempt had saved it in OUT/run; it is
    reused only when the configuration and the training images are the same."""
    out = tmp_path / "o"
    base = ["-q", "discover", str(folder), "--out", str(out), "--method", "found", "--backbone",
            BACKBONE, "--steps", "2", "--size", "64", "--ensemble", "1"]
    assert main(base) == 1  # broken.jpg and tiny.png are reported
    masks = {p.name: p.read_bytes() for p in (out / MASKS_DIR).iterdir()}
    weights = (out / "run" / WEIGHTS_FILE).read_bytes()
    trained: list[int] = []
    real = saliency.train_saliency
    monkeypatch.setattr(saliency, "train_saliency",
                        lambda *a, **k: trained.append(1) or real(*a, **k))
    assert main([*base, "--resume"]) == 1
    assert trained == []
    assert {p.name: p.read_bytes() for p in (out / MASKS_DIR).iterdir()} == masks
    assert (out / "run" / WEIGHTS_FILE).read_bytes() == weights

    def run(seed: int) -> None:
        discover(folder, out, "found", options={"steps": 2, "ensemble": 1},
                 settings=Settings(backbone=BACKBONE, size=64, seed=seed))

    run(1)  # another configuration: trained, and saved over the first
    assert trained == [1]
    run(1)
    assert trained == [1]
    Image.fromarray(_square(90, 90, 7)).save(folder / "img0.png")  # other training images
    run(1)
    assert trained == [1, 1]
    config = json.loads((out / "run" / "config.json").read_text())
    del config["training"][INPUTS_KEY]  # a run saved before the key was recorded
    (out / "run" / "config.json").write_text(json.dumps(config))
    run(1)
    assert trained == [1, 1, 1]


def test_the_heads_training_takes_max_pixels(tmp_path, monkeypatch, capsys):
    """An image over the pixel limit: ``discover --method found --max-pixels`` trains on it as
    it predicts it, and ``fit found`` / ``fit saliency`` take ``--max-pixels`` too (the
    refusal's message tells the user to pass it). The limit is lowered for the test."""
    import unseg.data.image as image_module

    monkeypatch.setattr(image_module, "DEFAULT_MAX_PIXELS", 10_000)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_square(120, 160, 0)).save(images / "big.png")  # 19,200 pixels
    Image.fromarray(_square(96, 96, 1)).save(images / "small.png")
    common = ["--backbone", BACKBONE, "--size", "64", "--max-pixels", "20000"]
    out = tmp_path / "out"
    assert main(["-q", "discover", str(images), "--out", str(out), "--method", "found",
                 "--steps", "2", "--ensemble", "1", "--no-report", *common]) == 0
    assert "image too large" not in capsys.readouterr().err
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["training"]["n_images"] == 2
    for method, steps in (("found", ["--steps", "2", "--ensemble", "1"]),
                          ("saliency", ["--epochs", "1"])):
        run = tmp_path / method
        main(["-q", "fit", method, str(images), "--out", str(run), *steps, *common])
        assert "image too large" not in capsys.readouterr().err
        assert json.loads((run / "config.json").read_text())["training"]["n_images"] == 2


def test_a_spectral_discover_report_shows_the_commands_timings(folder, tmp_path):
    """A discover with no run record (spectral: nothing trained) made a report without timings
    although its manifest records them; the page made by the command and a later `unseg
    report` both show the manifest's stages."""
    out = tmp_path / "o"
    assert main(["-q", "discover", str(folder), "--out", str(out), "--method", "spectral",
                 "--backbone", BACKBONE]) == 1  # broken.jpg and tiny.png
    manifest = json.loads((out / "unseg-manifest.json").read_text())
    stages = manifest["commands"][-1]["timings"]
    assert "predicting" in stages
    for page in ((out / "report.html").read_text(),
                 (main(["-q", "report", str(out)]), (out / "report.html").read_text())[1]):
        assert 'id="timings"' in page and "predicting" in page
        assert "its manifest" in page and "No run record" in page


def test_the_report_of_an_auto_discover_names_the_method_that_ran(folder, tmp_path):
    """`discover` with its default `--method auto` on a folder too small to train on runs the
    spectral cut; its page said "method auto" (the option, not the method)."""
    out = tmp_path / "o"
    assert main(["-q", "discover", str(folder), "--out", str(out), "--backbone",
                 BACKBONE]) == 1  # broken.jpg and tiny.png
    assert json.loads((out / "unseg-manifest.json").read_text())["commands"][-1][
        "method"] == "spectral"
    for page in ((out / "report.html").read_text(),
                 (main(["-q", "report", str(out)]), (out / "report.html").read_text())[1]):
        assert "method spectral" in page and "method auto" not in page


def test_discover_lists_its_images_once(folder, tmp_path, listing_reads):
    """`unseg discover` listed the folder (every file opened, every header read) to choose its
    method (auto), to train its head, and again to predict: two or three passes over a large
    folder. Now one listing serves them all; the other walk is the command's check that the
    folder has images, before --overwrite deletes anything (it reads no file)."""
    files = sorted(folder.iterdir())
    # auto: spectral on these few images (after counting them); found: trains on them
    head = ["--steps", "2", "--size", "64", "--ensemble", "1"]
    for method, options in (("auto", []), ("found", head)):
        for reads in listing_reads.values():
            reads.clear()
        assert main(["-q", "discover", str(folder), "--out", str(tmp_path / method), "--method",
                     method, "--backbone", BACKBONE, "--no-report", *options]) == 1  # broken, tiny
        assert listing_reads["walks"] == [folder, folder]
        assert sorted(listing_reads["opened"]) == sorted(listing_reads["headers"]) == files
