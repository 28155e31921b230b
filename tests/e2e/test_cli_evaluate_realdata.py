"""`unseg evaluate` on the real data in ../shared/data, naming the dataset roots directly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from unseg.cli.main import main
from unseg.data.image import load_label
from unseg.data.voc import parse_voc_xml
from unseg.metrics.saliency import fbeta
from unseg.utils.io import save_png_atomic

pytestmark = pytest.mark.realdata

VOC12 = "VOC2012/VOCdevkit/VOC2012"
VOC07 = "VOC2007/VOCdevkit/VOC2007"


def _evaluate(argv: list[str], out_json: Path) -> dict:
    assert main(["-q", "evaluate", *argv, "--json", str(out_json)]) == 0
    return json.loads(out_json.read_text())


def test_ecssd_ground_truth_against_itself(shared_data, tmp_path: Path) -> None:
    root = shared_data("ECSSD")
    r = _evaluate(["saliency", "--pred", str(root / "ground_truth_mask"), "--gt", str(root)],
                  tmp_path / "r.json")
    assert r["n_images"] == 1000 and r["dataset"] == "ECSSD"
    assert (r["acc"], r["iou"], r["max_fbeta"], r["mae"]) == (1.0, 1.0, 1.0, 0.0)


def test_ecssd_perturbed_predictions_match_pysodmetrics(shared_data, tmp_path: Path) -> None:
    py_sod_metrics = pytest.importorskip("py_sod_metrics")
    masks = sorted((shared_data("ECSSD") / "ground_truth_mask").glob("*.png"))[::20]
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = py_sod_metrics.Fmeasure()
    mae = py_sod_metrics.MAE()
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    for path in masks:
        (gt_dir / path.name).symlink_to(path)
        gt = load_label(path)
        pred = np.roll(gt, int(rng.integers(-15, 15)), axis=1)
        flip = rng.random(gt.shape) < 0.05
        pred[flip] = 255 - pred[flip]
        pred[0, 0], pred[-1, -1] = 0, 255  # never empty, min-max rescaling is a no-op
        save_png_atomic(pred_dir / path.name, pred)
        fm.step(pred=pred, gt=gt)
        mae.step(pred=pred, gt=gt)
    ref = fm.get_results()
    curve = _evaluate(["saliency", "--pred", str(pred_dir), "--gt", str(gt_dir)],
                      tmp_path / "c.json")
    image_mean = _evaluate(["saliency", "--pred", str(pred_dir), "--gt", str(gt_dir),
                            "--fbeta-mode", "image-mean"], tmp_path / "m.json")
    assert curve["n_images"] == len(masks) == 50
    assert curve["max_fbeta"] == pytest.approx(
        fbeta(ref["pr"]["p"][:255], ref["pr"]["r"][:255], 0.3).max(), abs=1e-12
    )
    assert image_mean["max_fbeta"] == pytest.approx(ref["fm"]["curve"][:255].max(), abs=1e-12)
    assert curve["mae"] == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert 0.5 < curve["max_fbeta"] < 1.0


@pytest.mark.parametrize("match", ["pixels", "iou"])
def test_voc2012_permuted_ground_truth_scores_one(shared_data, tmp_path: Path, match: str) -> None:
    root = shared_data(VOC12)
    perm = np.random.default_rng(0).permutation(21)
    lut = np.arange(256, dtype=np.uint8)
    lut[:21] = perm
    pred = tmp_path / "pred"
    for path in sorted((root / "SegmentationClass").glob("*.png")):
        save_png_atomic(pred / path.name, lut[load_label(path)])
    r = _evaluate(["semantic", "--pred", str(pred), "--gt", str(root), "--num-classes", "21",
                   "--match", match], tmp_path / "r.json")
    assert r["n_images"] == 217 and r["dataset"] == "VOC2012"
    assert (r["acc"], r["miou"]) == (1.0, 1.0)
    assert r["per_class_iou"] == [1.0] * 21
    assert [r["assignment"][perm[c]] for c in range(21)] == list(range(21))


def test_voc2007_first_ground_truth_box_gives_corloc_one(shared_data, tmp_path: Path) -> None:
    root = shared_data(VOC07)
    boxes = {p.stem: parse_voc_xml(p)[1][0] for p in sorted((root / "Annotations").glob("*.xml"))}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    r = _evaluate(["corloc", "--pred", str(tmp_path / "boxes.json"), "--annotations",
                   str(root)], tmp_path / "r.json")
    assert (r["corloc"], r["n_images"], r["dataset"]) == (1.0, 422, "VOC2007-boxes")
    # a box shifted by its own width misses
    boxes = {k: [b[2], b[1], 2 * b[2] - b[0], b[3]] for k, b in boxes.items()}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    r = _evaluate(["corloc", "--pred", str(tmp_path / "boxes.json"), "--annotations",
                   str(root)], tmp_path / "r.json")
    assert r["corloc"] < 0.3
