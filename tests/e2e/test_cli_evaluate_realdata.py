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


def test_voc2012_noisy_over_clustered_matches_scipy_reference(shared_data, tmp_path: Path) -> None:
    """Imperfect predictions (30 clusters for 21 classes, 20 % noise, shifted rows) against
    evaluation.md computed from scratch: one confusion matrix over the set without the 255
    pixels, linear_sum_assignment(maximize=True), leftover clusters wrong."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix, jaccard_score

    root = shared_data(VOC12)
    rng = np.random.default_rng(1)
    perm = rng.permutation(30)
    gts, preds = [], []
    for path in sorted((root / "SegmentationClass").glob("*.png")):
        gt = load_label(path)
        lab = np.where(gt == 255, 0, gt).astype(np.int64)
        half = (np.arange(gt.shape[1]) > gt.shape[1] // 2)[None, :] & (lab + 21 < 30)
        pred = perm[np.where(half, lab + 21, lab)]
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, 30, size=int(noise.sum()))
        pred = np.roll(pred, int(rng.integers(-10, 10)), axis=0).astype(np.uint8)
        save_png_atomic(tmp_path / "pred" / path.name, pred)
        keep = gt != 255
        gts.append(gt[keep].astype(np.int64))
        preds.append(pred[keep].astype(np.int64))
    g, p = np.concatenate(gts), np.concatenate(preds)
    counts = confusion_matrix(p, g, labels=range(30))[:, :21]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    lut = np.full(30, -1)
    lut[rows] = cols
    ref_iou = jaccard_score(g, lut[p], labels=range(21), average=None, zero_division=0)
    r = _evaluate(["semantic", "--pred", str(tmp_path / "pred"), "--gt", str(root)],
                  tmp_path / "r.json")
    assert r["acc"] == pytest.approx(np.mean(lut[p] == g), abs=1e-12)
    assert r["per_class_iou"] == pytest.approx(ref_iou.tolist(), abs=1e-12)
    assert r["miou"] == pytest.approx(ref_iou.mean(), abs=1e-12)
    assert 0.3 < r["acc"] < 0.9


def test_voc2007_corloc_of_masks_matches_scipy_reference(shared_data, tmp_path: Path) -> None:
    """CorLoc from masks (an instance of SegmentationObject, shifted, plus a blob) against
    scipy.ndimage's largest 4-connected component, its pixel-edge box and VOC boxes as
    [xmin - 1, ymin - 1, xmax, ymax], difficult/truncated included, IoU >= 0.5 with any."""
    import xml.etree.ElementTree as ET

    from scipy import ndimage

    root = shared_data(VOC07)
    rng = np.random.default_rng(2)
    stems = (root / "ImageSets/Main/trainval.txt").read_text().split()[::4]
    annotations = tmp_path / "ann"
    annotations.mkdir()
    correct = 0
    for stem in stems:
        xml = root / "Annotations" / f"{stem}.xml"
        (annotations / xml.name).symlink_to(xml)
        gt_boxes = [[float(o.findtext(f"bndbox/{t}")) - d for t, d in
                     (("xmin", 1), ("ymin", 1), ("xmax", 0), ("ymax", 0))]
                    for o in ET.parse(xml).getroot().iter("object")]
        seg = load_label(root / "SegmentationObject" / f"{stem}.png")
        ids = [i for i in np.unique(seg) if 0 < i < 255]
        mask = np.zeros(seg.shape, np.uint8)
        mask[seg == rng.choice(ids)] = 255
        mask = np.roll(mask, tuple(rng.integers(-40, 40, 2)), axis=(0, 1))
        y, x = rng.integers(0, np.array(seg.shape) - 60)
        mask[y : y + rng.integers(5, 60), x : x + rng.integers(5, 60)] = 255
        save_png_atomic(tmp_path / "pred" / f"{stem}.png", mask)
        labels, _ = ndimage.label(mask >= 128)
        biggest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        ys, xs = np.nonzero(labels == biggest)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        for g in gt_boxes:
            iw = max(0.0, min(box[2], g[2]) - max(box[0], g[0]))
            ih = max(0.0, min(box[3], g[3]) - max(box[1], g[1]))
            union = (box[2] - box[0]) * (box[3] - box[1]) + (g[2] - g[0]) * (g[3] - g[1])
            if iw * ih / (union - iw * ih) >= 0.5:
                correct += 1
                break
    r = _evaluate(["corloc", "--pred", str(tmp_path / "pred"), "--annotations",
                   str(annotations)], tmp_path / "r.json")
    assert (r["n_images"], r["n_correct"]) == (len(stems), correct)
    assert 0.2 < r["corloc"] < 0.9
