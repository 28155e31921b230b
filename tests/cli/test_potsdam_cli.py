"""Potsdam-3 through the commands, as a researcher with STEGO's folder runs them:
``unseg segment ROOT`` → ``unseg evaluate semantic --gt ROOT`` → ``unseg report``, on a
synthetic root in STEGO's format (tests/unit/test_potsdam.py covers reading it)."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

import unseg
from unseg.cli.main import main
from unseg.utils.io import save_png_atomic

pytestmark = pytest.mark.usefixtures("registered_stand_in")

STAND_IN = "stand_in16"  # tests/conftest.py's registered stand-in (a patch's mean colour)
FAST = ["--backbone", STAND_IN, "--size", "64", "--method", "kmeans", "--refine", "none",
        "--workers", "1"]
SIDE = 64
# STEGO's fine_to_coarse: roads 0 / cars 4 → 0, buildings 1 / clutter 5 → 1, vegetation 2 /
# trees 3 → 2
FINE_TO_3 = np.array([0, 1, 2, 2, 0, 1])
# each fine class's RGB, the coarse classes in three directions from mid-grey (the stand-in's
# features are a patch's colour centred on it)
COLOURS = np.array([(230, 230, 230), (220, 30, 30), (30, 200, 30), (40, 170, 40),
                    (250, 250, 250), (200, 40, 40)], np.uint8)
TEST_IDS = ("2_10_3", "0_4_7", "1_0_0")
TRAIN_IDS = ("5_5_5",)


def _fine_layout(k: int) -> np.ndarray:
    """Tile ``k``'s fine classes: blocks of 16 pixels (one feature patch each), a void corner."""
    rng = np.random.default_rng(k)
    gt = np.repeat(np.repeat(rng.integers(0, 6, (4, 4)), 16, 0), 16, 1).astype(np.int32)
    gt[:16, :16] = 255
    return gt


def write_root(root: Path) -> Path:
    """STEGO's Potsdam folder: imgs/<id>.mat "img" uint8 [H, W, 4] (the IR channel noise),
    gt/<id>.mat "gt" int32 [H, W], labelled_test.txt / labelled_train.txt."""
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    for k, stem in enumerate((*TEST_IDS, *TRAIN_IDS)):
        gt = _fine_layout(k)
        rng = np.random.default_rng(100 + k)
        img = np.empty((SIDE, SIDE, 4), np.uint8)
        img[..., :3] = COLOURS[np.where(gt == 255, 0, gt)]
        img[..., 3] = rng.integers(0, 256, (SIDE, SIDE))  # IR: must not reach the features
        savemat(root / "imgs" / f"{stem}.mat", {"img": img})
        savemat(root / "gt" / f"{stem}.mat", {"gt": gt})
    (root / "labelled_test.txt").write_text("".join(f"{s}\n" for s in TEST_IDS))
    (root / "labelled_train.txt").write_text("".join(f"{s}\n" for s in TRAIN_IDS))
    return root


def _protocol_grid(labels: np.ndarray) -> np.ndarray:
    """A square 64-pixel map on the protocol's 320x320 grid: nearest, 5 times each pixel."""
    return np.repeat(np.repeat(labels, 5, 0), 5, 1)


def reference_scores(preds: list[np.ndarray], gts: list[np.ndarray], k: int = 3
                     ) -> tuple[float, float, list[int]]:
    """Pixel-count Hungarian matching written out: the best of every cluster → class
    permutation over the set's confusion matrix; (acc, mIoU, assignment)."""
    conf = np.zeros((k, k), np.int64)  # [cluster, class]
    for p, g in zip(preds, gts, strict=True):
        valid = g != 255
        np.add.at(conf, (p[valid].astype(int), g[valid].astype(int)), 1)
    best = max(itertools.permutations(range(k)),
               key=lambda perm: sum(conf[c, perm[c]] for c in range(k)))
    hits = sum(conf[c, best[c]] for c in range(k))
    ious = []
    for cls in range(k):
        c = best.index(cls)
        tp = conf[c, cls]
        ious.append(tp / (conf[c].sum() + conf[:, cls].sum() - tp))
    return hits / conf.sum(), float(np.mean(ious)), list(best)


def _gt_classes(root: Path, stem: str) -> np.ndarray:
    fine = loadmat(root / "gt" / f"{stem}.mat")["gt"]
    return np.where(fine == 255, 255, FINE_TO_3[np.minimum(fine, 5)])


def _evaluate(pred: Path, gt: Path, tmp: Path, *extra: str) -> tuple[int, dict]:
    out = tmp / "scores.json"
    code = main(["-q", "evaluate", "semantic", "--pred", str(pred), "--gt", str(gt),
                 "--json", str(out), *extra])
    return code, json.loads(out.read_text()) if out.is_file() else {}


@pytest.fixture(scope="module")
def segmented(registered_stand_in: str, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("potsdam")
    root = write_root(tmp / "potsdam")
    out = tmp / "out"
    assert main(["-q", "segment", str(root), "--out", str(out), "--num-classes", "3",
                 "--gt", str(root), *FAST]) == 0
    return root, out


def test_segment_writes_one_mask_per_test_tile(segmented) -> None:
    _, out = segmented
    masks = sorted(p.name for p in (out / "masks").rglob("*.png"))
    assert masks == sorted(f"{s}.png" for s in TEST_IDS)  # the split's, not the train tile
    for s in TEST_IDS:
        assert np.asarray(Image.open(out / "masks" / f"{s}.png")).shape == (SIDE, SIDE)
        assert (out / "overlays" / f"{s}.jpg").is_file()


def test_evaluate_gives_the_protocols_hungarian_scores_on_the_3_classes(segmented, tmp_path):
    root, out = segmented
    code, r = _evaluate(out / "masks", root, tmp_path)
    assert code == 0
    assert r["dataset"] == "Potsdam-3" and r["num_classes"] == 3 and r["n_images"] == 3
    assert r["class_names"] == ["roads and cars", "buildings and clutter",
                                "trees and vegetation"]
    preds = [_protocol_grid(np.asarray(Image.open(out / "masks" / f"{s}.png")))
             for s in TEST_IDS]
    gts = [_protocol_grid(_gt_classes(root, s)) for s in TEST_IDS]
    acc, miou, assignment = reference_scores(preds, gts)
    assert r["acc"] == pytest.approx(acc, abs=1e-12)
    assert r["miou"] == pytest.approx(miou, abs=1e-12)
    assert r["assignment"] == assignment
    # the colours are the classes and each block one patch: k-means finds them, but for
    # the blocks' edges (the 4x4 feature map's upsampling)
    assert r["acc"] > 0.85
    # the output folder stands for its masks, as for every dataset
    assert _evaluate(out, root, tmp_path)[1]["miou"] == r["miou"]


def test_hand_made_predictions_score_what_the_counts_give(tmp_path: Path) -> None:
    """Two tiles, counted by hand: tile A all right (a 4x4 void corner), tile B's clutter
    quarter given the vegetation cluster."""
    root = tmp_path / "potsdam"
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    a = np.zeros((SIDE, SIDE), np.int32)  # roads on the left
    a[:32, 32:] = 1  # buildings top right
    a[32:, 32:] = 3  # trees bottom right
    a[:4, :4] = 255
    b = np.full((SIDE, SIDE), 4, np.int32)  # cars on top
    b[32:, :32] = 5  # clutter bottom left
    b[32:, 32:] = 2  # low vegetation bottom right
    pa = np.full((SIDE, SIDE), 2, np.uint8)  # clusters: 2 roads/cars, 0 buildings, 1 green
    pa[:32, 32:] = 0
    pa[32:, 32:] = 1
    pb = np.full((SIDE, SIDE), 2, np.uint8)
    pb[32:, :] = 1  # the clutter quarter wrong
    for stem, gt, pred in (("0_0_0", a, pa), ("0_0_1", b, pb)):
        savemat(root / "imgs" / f"{stem}.mat", {"img": np.zeros((SIDE, SIDE, 4), np.uint8)})
        savemat(root / "gt" / f"{stem}.mat", {"gt": gt})
        save_png_atomic(tmp_path / "pred" / f"{stem}.png", pred)
    (root / "labelled_test.txt").write_text("0_0_0\n0_0_1\n")
    code, r = _evaluate(tmp_path / "pred", root, tmp_path)
    assert code == 0 and r["n_images"] == 2
    # valid pixels 4080 + 4096; wrong: B's 1024 clutter pixels
    assert Fraction(r["acc"]).limit_denominator(10_000) == Fraction(7152, 8176)
    # roads/cars: 4080 / 4080; buildings/clutter: 1024 / 2048; green: 2048 / (2048 + 1024)
    assert r["per_class_iou"] == pytest.approx([1.0, 0.5, 2 / 3], abs=1e-12)
    assert r["miou"] == pytest.approx((1 + 0.5 + 2 / 3) / 3, abs=1e-12)
    assert r["assignment"] == [1, 2, 0]  # cluster 0 → buildings, 1 → green, 2 → roads


def test_the_report_shows_each_tile_its_mask_and_ground_truth(segmented, tmp_path) -> None:
    root, out = segmented
    page = tmp_path / "page.html"
    assert main(["-q", "report", str(out), "--gt", str(root), "--out", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    for what in ("image", "overlay", "ground truth"):
        assert captions.count(what) == len(TEST_IDS), what
    assert "Potsdam-3" in html and "no ground truth" not in html
    # the report segment wrote with --gt scored the tiles too
    assert "Potsdam-3" in (out / "report.html").read_text(encoding="utf-8")


def test_a_malformed_tile_is_reported_and_the_others_segmented(tmp_path: Path, capsys) -> None:
    root = write_root(tmp_path / "potsdam")
    bad = root / "imgs" / f"{TEST_IDS[1]}.mat"
    savemat(bad, {"image": np.zeros((SIDE, SIDE, 4), np.uint8)})  # not STEGO's key
    out = tmp_path / "out"
    code = main(["-q", "segment", str(root), "--out", str(out), "--num-classes", "3", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert (f"failed: {bad}: no 'img' array in the .mat file (it holds 'image'); expected "
            "STEGO's Potsdam tile") in err
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(
        s for s in TEST_IDS if s != TEST_IDS[1])


def test_the_segmenter_takes_the_root_in_the_split_order(segmented) -> None:
    root, out = segmented
    assert [p.stem for p in unseg.list_images(root)] == list(TEST_IDS)
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=STAND_IN, size=64, refine="none",
                          workers=1)
    masks = seg.fit_predict(root)
    # masks[i] is list_images(root)[i]'s: the command's mask of the same tile
    for stem, mask in zip(TEST_IDS, masks, strict=True):
        assert np.array_equal(mask, np.asarray(Image.open(out / "masks" / f"{stem}.png")))
    labels = [_gt_classes(root, s) for s in TEST_IDS]
    assert seg.score(root, labels) > 0.75
