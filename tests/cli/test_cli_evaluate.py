"""`unseg evaluate`: JSON contract, table, and every error path (message + non-zero exit)."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unseg.cli.main import main
from unseg.data.image import load_label
from unseg.data.resize import resize_probability
from unseg.metrics.saliency import SaliencyMeter
from unseg.utils.io import save_png_atomic

K = 3


def _labels(rng: np.random.Generator, shape=(12, 16)) -> np.ndarray:
    return rng.integers(0, K, size=shape).astype(np.uint8)


@pytest.fixture
def semantic(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    perm = np.array([2, 0, 1])
    for i in range(4):
        labels = _labels(rng)
        labels[0, :4] = 255
        save_png_atomic(gt / f"img{i}.png", labels)
        save_png_atomic(pred / f"img{i}.png", perm[np.minimum(labels, K - 1)].astype(np.uint8))
    return pred, gt


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["-q", "evaluate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_semantic_json_contract(semantic, tmp_path: Path, capsys) -> None:
    pred, gt = semantic
    out_json = tmp_path / "r.json"
    code, out, _ = _run(
        ["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3",
         "--json", str(out_json)], capsys,
    )
    assert code == 0
    assert "mIoU" in out and "1.0000" in out
    r = json.loads(out_json.read_text())
    assert {"acc", "miou", "per_class_iou", "assignment", "n_images"} <= r.keys()
    assert (r["acc"], r["miou"], r["n_images"]) == (1.0, 1.0, 4)
    assert r["per_class_iou"] == [1.0, 1.0, 1.0]
    assert r["assignment"] == [1, 2, 0]
    code, _, _ = _run(
        ["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3",
         "--match", "iou", "--json", str(out_json)], capsys,
    )
    assert code == 0 and json.loads(out_json.read_text())["match"] == "iou"


def test_semantic_takes_k_for_num_classes_as_fit_does(semantic, tmp_path: Path, capsys) -> None:
    pred, gt = semantic
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "-k", "3", "--json",
                         str(out_json)], capsys)
    assert code == 0, err
    assert json.loads(out_json.read_text())["miou"] == 1.0


def test_semantic_missing_prediction(semantic, tmp_path: Path, capsys) -> None:
    pred, gt = semantic
    (pred / "img2.png").unlink()
    args = ["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]
    code, _, err = _run(args, capsys)
    assert code == 2
    assert "no prediction" in err and "img2.png" in err and "--allow-missing" in err
    out_json = tmp_path / "r.json"
    code, out, _ = _run([*args, "--allow-missing", "--json", str(out_json)], capsys)
    assert code == 1  # scored, but some inputs were missing
    r = json.loads(out_json.read_text())
    assert r["n_missing"] == 1 and r["missing"] == ["img2"] and r["n_images"] == 4
    assert r["acc"] == pytest.approx(3 / 4)  # 3 of 4 equal-sized images fully right
    assert "missing" in out


def test_semantic_extra_prediction(semantic, capsys) -> None:
    pred, gt = semantic
    save_png_atomic(pred / "stray.png", np.zeros((12, 16), np.uint8))
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt),
                         "--num-classes", "3"], capsys)
    assert code == 2 and "without ground truth" in err and "stray.png" in err


def test_semantic_label_out_of_range(semantic, capsys) -> None:
    pred, gt = semantic
    bad = np.full((12, 16), 7, np.uint8)
    save_png_atomic(gt / "img1.png", bad)
    for extra in ([], ["--allow-missing"]):
        code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt),
                             "--num-classes", "3", *extra], capsys)
        assert code == 2 and "labels >= 3" in err and "img1.png" in err


def test_semantic_size_mismatch(semantic, capsys) -> None:
    pred, gt = semantic
    args = ["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3"]
    # a clean 2x upscale is resized (nearest) and still scores 1.0
    up = np.repeat(np.repeat(load_label(pred / "img0.png"), 2, axis=0), 2, axis=1)
    save_png_atomic(pred / "img0.png", up)
    assert _run(args, capsys)[0] == 0
    save_png_atomic(pred / "img0.png", np.zeros((12, 12), np.uint8))
    code, _, err = _run(args, capsys)
    assert code == 2 and "cannot be resized" in err and "img0.png" in err
    assert "transposed" not in err


@pytest.mark.parametrize("scale", [1, 2])
def test_a_transposed_prediction_gets_the_exif_hint(semantic, scale: int, capsys) -> None:
    """A mask H×W against a W×H ground truth (an EXIF-rotated photo: the mask follows the
    displayed orientation, the ground truth the stored one) was refused with no hint."""
    pred, gt = semantic
    save_png_atomic(pred / "img0.png", np.zeros((16 * scale, 12 * scale), np.uint8))
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt),
                         "--num-classes", "3"], capsys)
    assert code == 2 and f"({12 * scale}x{16 * scale} vs 16x12); it is the ground truth's " \
        "transposed: is the photo EXIF-rotated?" in err


def test_first_ten_and_count(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    pred.mkdir()
    for i in range(13):
        save_png_atomic(gt / f"m{i:02d}.png", _labels(rng))
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt),
                         "--num-classes", "3"], capsys)
    assert code == 2
    assert "13 file(s)" in err and "(and 3 more)" in err
    assert "m09.png" in err and "m10.png" not in err


def test_semantic_needs_num_classes_for_plain_folders(semantic, capsys) -> None:
    pred, gt = semantic
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert code == 2 and "--num-classes" in err


def test_semantic_warns_about_jpeg_label_maps(semantic, capsys, caplog) -> None:
    pred, gt = semantic
    png = pred / "img0.png"
    Image.open(png).save(pred / "img0.jpg", quality=75)  # lossy: ids change at region edges
    png.unlink()
    code, _, _ = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3"],
                      capsys)
    assert code == 0
    assert "1 prediction(s) are JPEG files" in caplog.text and "img0.jpg" in caplog.text
    caplog.clear()
    (pred / "img0.jpg").unlink()
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(png)
    _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3"], capsys)
    assert "JPEG" not in caplog.text


@pytest.fixture
def saliency(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(3):
        mask = np.zeros((20, 30), np.uint8)
        mask[5:15, 5 + i : 20 + i] = 255
        save_png_atomic(gt / f"s{i}.png", mask)
        save_png_atomic(pred / f"s{i}.png", mask)
    return pred, gt


def test_saliency_json_contract_and_modes(saliency, tmp_path: Path, capsys) -> None:
    pred, gt = saliency
    out_json = tmp_path / "s.json"
    for mode, beta2 in (("curve", "0.3"), ("image-mean", "0.09")):
        code, out, _ = _run(["saliency", "--pred", str(pred), "--gt", str(gt), "--fbeta-mode",
                             mode, "--beta2", beta2, "--json", str(out_json)], capsys)
        assert code == 0 and "maxFβ" in out
        r = json.loads(out_json.read_text())
        assert {"acc", "iou", "max_fbeta", "mae", "n_images", "fbeta_mode", "beta2"} <= r.keys()
        assert (r["acc"], r["iou"], r["max_fbeta"], r["mae"]) == (1.0, 1.0, 1.0, 0.0)
        assert (r["fbeta_mode"], r["beta2"], r["n_images"]) == (mode, float(beta2), 3)


def test_saliency_warns_about_0_1_masks_only_when_the_folder_is_0_1(saliency, capsys,
                                                                   caplog) -> None:
    """Masks saved as 0/1 are read as v/255 and say so; a near-empty 8-bit map (values 0 and 1,
    as the dense CRF can leave on an image without an object) among graded ones does not warn."""
    pred, gt = saliency
    for i in range(3):
        save_png_atomic(pred / f"s{i}.png", (load_label(gt / f"s{i}.png") > 0).astype(np.uint8))
    assert _run(["saliency", "--pred", str(pred), "--gt", str(gt)], capsys)[0] == 0
    assert "3 prediction(s) hold only the values 0 and 1" in caplog.text
    caplog.clear()
    save_png_atomic(pred / "s1.png", load_label(gt / "s1.png"))
    save_png_atomic(pred / "s2.png", load_label(gt / "s2.png") // 2)
    assert _run(["saliency", "--pred", str(pred), "--gt", str(gt)], capsys)[0] == 0
    assert "values 0 and 1" not in caplog.text


def test_saliency_ground_truth_stored_as_0_1_is_binary(saliency, tmp_path: Path, capsys,
                                                      caplog) -> None:
    """Ground-truth masks saved as 0/1 were binarised at 128: all background, so an empty
    prediction scored IoU 1 and the right one 0. They are now read as binary, and said so."""
    pred, gt = saliency
    ones = tmp_path / "gt01"
    for i in range(3):
        save_png_atomic(ones / f"s{i}.png", (load_label(gt / f"s{i}.png") >= 128).astype(np.uint8))
    out_json = tmp_path / "s.json"
    caplog.set_level("INFO")
    for truth in (gt, ones):
        assert _run(["saliency", "--pred", str(pred), "--gt", str(truth), "--json",
                     str(out_json)], capsys)[0] == 0
        r = json.loads(out_json.read_text())
        assert (r["acc"], r["iou"]) == (1.0, 1.0)  # the predictions are the masks
    assert "3 ground-truth mask(s) hold only the values 0 and 1: read as binary" in caplog.text


def test_saliency_resizes_prediction_to_ground_truth(saliency, tmp_path: Path, capsys) -> None:
    pred, gt = saliency
    big = np.zeros((40, 60), np.uint8)
    big[10:30, 10:40] = 255
    save_png_atomic(pred / "s0.png", big)
    out_json = tmp_path / "s.json"
    code, _, _ = _run(["saliency", "--pred", str(pred), "--gt", str(gt), "--json",
                       str(out_json)], capsys)
    assert code == 0
    assert json.loads(out_json.read_text())["iou"] == pytest.approx(1.0)


def test_saliency_errors_and_allow_missing(saliency, tmp_path: Path, capsys) -> None:
    pred, gt = saliency
    args = ["saliency", "--pred", str(pred), "--gt", str(gt)]
    (pred / "s1.png").write_bytes(b"not a png")
    code, _, err = _run(args, capsys)
    assert code == 2 and f"{pred / 's1.png'}: not an image file Pillow can read" in err
    (pred / "s1.png").unlink()
    code, _, err = _run(args, capsys)
    assert code == 2 and "s1.png" in err
    out_json = tmp_path / "s.json"
    code, _, _ = _run([*args, "--allow-missing", "--json", str(out_json)], capsys)
    r = json.loads(out_json.read_text())
    # the missing one is an all-zero map: IoU 0 for that image, Acc 1 - 150/600
    assert code == 1 and r["n_missing"] == 1 and r["n_images"] == 3
    assert r["iou"] == pytest.approx(2 / 3)
    assert r["acc"] == pytest.approx((2 + 1 - 150 / 600) / 3)


def test_missing_folders_are_clear_errors(saliency, tmp_path: Path, capsys) -> None:
    _, gt = saliency
    code, _, err = _run(["saliency", "--pred", str(tmp_path / "nope"), "--gt", str(gt)], capsys)
    assert code == 2 and "nope: no such folder of predictions" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["saliency", "--pred", str(gt), "--gt", str(empty)], capsys)
    assert code == 2 and "no images found" in err
    code, _, err = _run(["corloc", "--pred", str(tmp_path), "--annotations",
                         str(tmp_path / "nothing")], capsys)
    assert code == 2 and "nothing" in err


@pytest.mark.parametrize("task", ["semantic", "saliency"])
def test_a_file_as_pred_is_named_a_file(task: str, saliency, tmp_path: Path, capsys) -> None:
    """`--pred mask.png` said "no such folder of predictions" of a file that exists."""
    pred, gt = saliency
    one = sorted(pred.glob("*.png"))[0]
    code, _, err = _run([task, "--pred", str(one), "--gt", str(gt), "--num-classes", "2"]
                        if task == "semantic" else [task, "--pred", str(one), "--gt", str(gt)],
                        capsys)
    assert code == 2 and f"{one} is a file: --pred takes a folder of predictions" in err
    assert "no such folder" not in err


def _xml(path: Path, box: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<annotation><size><width>50</width><height>40</height><depth>3</depth></size>"
        f"<object><name>dog</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
        f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object></annotation>"
    )


@pytest.fixture
def annotations(tmp_path: Path) -> Path:
    """A folder of two VOC annotations, one box each: ``x`` (1, 1, 20, 20) and ``y`` (21, 11,
    50, 40)."""
    ann = tmp_path / "ann"
    _xml(ann / "x.xml", (1, 1, 20, 20))
    _xml(ann / "y.xml", (21, 11, 50, 40))
    return ann


def _corloc(pred: Path, ann: Path, capsys: pytest.CaptureFixture[str],
            out_json: Path | None = None, *extra: str) -> tuple[int, str, str, dict | None]:
    """``evaluate corloc`` of ``pred`` (a boxes JSON or a masks folder) against ``ann``: exit
    code, stdout, stderr and, with ``out_json``, the JSON there (None when there is none, so
    that a failure shows its stderr)."""
    json_args = [] if out_json is None else ["--json", str(out_json)]
    code, out, err = _run(["corloc", "--pred", str(pred), "--annotations", str(ann), *json_args,
                           *extra], capsys)
    written = out_json is not None and out_json.is_file()
    result = json.loads(out_json.read_text()) if written else None
    return code, out, err, result


def test_corloc_json_and_errors(annotations: Path, tmp_path: Path, capsys) -> None:
    ann = annotations
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"x": [0, 0, 20, 20], "y": [0, 0, 10, 10]}))
    out_json = tmp_path / "c.json"
    code, out, _, r = _corloc(boxes, ann, capsys, out_json)
    assert code == 0 and "CorLoc" in out
    assert (r["corloc"], r["n_images"]) == (0.5, 2)
    boxes.write_text(json.dumps({"x": [0, 0, 20, 20]}))
    code, _, err, _ = _corloc(boxes, ann, capsys)
    assert code == 2 and "no box for 1 image" in err and "y" in err
    boxes.write_text(json.dumps({"x": [0, 0, 20], "y": "box"}))
    code, _, err, _ = _corloc(boxes, ann, capsys)
    assert code == 2 and "boxes.json" in err and "not [x0, y0, x1, y1]" in err
    masks = tmp_path / "masks"
    save_png_atomic(masks / "x.png", np.zeros((40, 50), np.uint8))
    code, _, err, _ = _corloc(masks, ann, capsys)
    assert code == 2 and "y.xml" in err
    code, _, _, r = _corloc(masks, ann, capsys, out_json, "--allow-missing")
    assert code == 1 and (r["corloc"], r["n_missing"]) == (0.0, 1)


def test_resizable_accepts_rescalings_only() -> None:
    from unseg.pipelines.evaluate import resizable

    assert resizable((24, 32), (12, 16))  # exact 2x
    assert resizable((133, 200), (267, 400))  # floor(267 / 2) rows: one pixel of rounding
    assert resizable((400, 1600), (100, 401))
    assert not resizable((12, 12), (12, 16))  # another aspect ratio
    assert not resizable((320, 320), (375, 500))  # a centre crop


def test_cityscapes_root_maps_label_ids(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    root = tmp_path / "cityscapes"
    ids = rng.integers(0, 34, size=(8, 16)).astype(np.uint8)  # 0..6 are void → ignore
    save_png_atomic(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
                    np.zeros((8, 16, 3), np.uint8))
    save_png_atomic(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    classes = np.where(ids >= 7, ids.astype(int) - 7, 255).astype(np.uint8)
    pred = tmp_path / "pred"
    save_png_atomic(pred / "aachen_000000_000019_leftImg8bit.png", classes)
    out_json = tmp_path / "r.json"
    code, _, _ = _run(["semantic", "--pred", str(pred), "--gt", str(root), "--json",
                       str(out_json)], capsys)
    r = json.loads(out_json.read_text())
    assert code == 0 and r["dataset"] == "Cityscapes-27" and r["num_classes"] == 27
    assert (r["acc"], r["miou"], r["n_images"]) == (1.0, 1.0, 1)


def test_mirrored_sub_folders_pair_by_stem(tmp_path: Path, rng: np.random.Generator,
                                           capsys) -> None:
    """Nested inputs give nested masks (``masks/city/x.png``): they still pair with a flat
    ground-truth folder, and stems repeated across sub-folders are refused by name."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i, sub in enumerate(("aachen", "aachen", "bremen")):
        labels = _labels(rng)
        save_png_atomic(gt / f"img{i}.png", labels)
        save_png_atomic(pred / sub / f"img{i}.png", labels)
    save_png_atomic(pred / ".hidden" / "img0.png", _labels(rng))  # skipped: hidden folder
    out_json = tmp_path / "r.json"
    argv = ["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3",
            "--json", str(out_json)]
    code, _, _ = _run(argv, capsys)
    r = json.loads(out_json.read_text())
    assert code == 0 and (r["n_images"], r["miou"]) == (3, 1.0)
    save_png_atomic(pred / "bremen" / "img0.png", _labels(rng))
    code, _, err = _run(argv, capsys)
    assert code != 0 and "share a stem" in err and "img0.png" in err
    # both files of the pair are named (README: "refused with both paths")
    assert str(pred / "bremen" / "img0.png") in err
    assert str(pred / "aachen" / "img0.png") in err


def test_an_unseg_output_folder_stands_for_its_masks(semantic, tmp_path: Path, capsys) -> None:
    """``--pred OUT`` of a segment run scores ``OUT/masks``, not its overlays; a plain folder
    with a ``masks`` sub-folder but no manifest is listed as it is."""
    pred, gt = semantic
    out = tmp_path / "out"
    out.mkdir()
    pred.rename(out / "masks")
    for f in (out / "masks").iterdir():
        save_png_atomic(out / "overlays" / f.name, np.zeros((12, 16, 3), np.uint8))
    argv = ["semantic", "--pred", str(out), "--gt", str(gt), "--num-classes", "3"]
    code, _, err = _run(argv, capsys)
    assert code != 0 and "share a stem" in err  # no manifest: masks and overlays collide
    assert f"--pred {out / 'masks'}" in err
    (out / "unseg-manifest.json").write_text("{}")
    code, out_text, _ = _run(argv, capsys)
    assert code == 0 and "1.0000" in out_text


def _hungarian_reference(pred: np.ndarray, gt: np.ndarray, k: int, ignore: int) -> tuple:
    """Acc and mIoU straight from evaluation.md: one confusion over the set without the ignored
    ground-truth pixels, ``linear_sum_assignment(maximize=True)`` on pixel counts, the clusters
    left over wrong (sklearn + scipy, no unseg code)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix, jaccard_score

    keep = gt != ignore
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    n = max(k, int(p.max()) + 1)
    counts = confusion_matrix(p, g, labels=range(n))[:, :k]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    lut = np.full(n, -1)
    lut[rows] = cols
    mapped = lut[p]
    iou = jaccard_score(g, mapped, labels=range(k), average=None, zero_division=0)
    return float(np.mean(mapped == g)), float(iou.mean())


def test_a_cluster_numbered_like_the_ignore_label_is_a_cluster(
    tmp_path: Path, rng: np.random.Generator, capsys
) -> None:
    # CamVid: 11 classes, ground truth 11 = unlabelled (`--ignore-index 11`); over-clustered
    # predictions (16 clusters) use id 11 as an ordinary cluster, which evaluation.md matches
    # like any other: only the ground truth's ignore label is skipped
    k, ignore, n_clusters = 11, 11, 16
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    perm = rng.permutation(n_clusters)
    gts, preds = [], []
    for i in range(3):
        gt = rng.integers(0, k + 1, size=(24, 32)).astype(np.uint8)  # 11: ignored
        pred = perm[np.minimum(gt, k - 1)].astype(np.uint8)
        noise = rng.random(gt.shape) < 0.2
        pred[noise] = rng.integers(0, n_clusters, size=int(noise.sum()))
        save_png_atomic(gt_dir / f"img{i}.png", gt)
        save_png_atomic(pred_dir / f"img{i}.png", pred)
        gts.append(gt)
        preds.append(pred)
    assert (np.concatenate(preds) == 11).any()
    acc, miou = _hungarian_reference(np.concatenate(preds), np.concatenate(gts), k, ignore)
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(pred_dir), "--gt", str(gt_dir), "-k", "11",
                         "--ignore-index", "11", "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["acc"] == pytest.approx(acc, abs=1e-12)
    assert r["miou"] == pytest.approx(miou, abs=1e-12)
    assert len(r["assignment"]) == n_clusters


def _bilinear_exact(v: np.ndarray, shape: tuple[int, int]) -> list[list[Fraction]]:
    """Bilinear resize with half-pixel centres (edges clamped) in exact rational arithmetic."""
    def taps(o: int, n_in: int, n_out: int) -> list[tuple[int, Fraction]]:
        s = max(Fraction(2 * o + 1, 2) * Fraction(n_in, n_out) - Fraction(1, 2), Fraction(0))
        i0 = min(int(s), n_in - 1)
        return [(i0, 1 - (s - i0)), (min(i0 + 1, n_in - 1), s - i0)]

    h, w = v.shape
    return [[sum(wy * wx * int(v[y, x]) for y, wy in taps(i, h, shape[0])
                 for x, wx in taps(j, w, shape[1])) for j in range(shape[1])]
            for i in range(shape[0])]


def test_saliency_resized_prediction_on_a_threshold_is_not_above_it(
    tmp_path: Path, rng: np.random.Generator, capsys
) -> None:
    # evaluation.md, saliency: the prediction is resized bilinearly to the ground truth and
    # binarised `p > t`, t = k/255. Values that are all 7 mod 16 make every pixel of a 2x
    # upsampling land exactly on a threshold: it must not count as above it.
    gt = np.zeros((16, 24), np.uint8)
    gt[4:12, 6:18] = 255
    small = (16 * rng.integers(0, 16, size=(8, 12)) + 7).astype(np.uint8)
    save_png_atomic(tmp_path / "gt" / "a.png", gt)
    save_png_atomic(tmp_path / "pred" / "a.png", small)
    raw = _bilinear_exact(small, gt.shape)  # 255 p, exactly
    assert all(x.denominator == 1 for row in raw for x in row)
    v = np.array(raw, dtype=np.int64)
    fg = gt >= 128
    pos = v[None] > np.arange(255)[:, None, None]
    tp, npos = (pos & fg).sum((1, 2)), pos.sum((1, 2))
    precision = np.where(npos > 0, tp / np.maximum(npos, 1), 1.0)
    recall = tp / fg.sum()
    f = 1.3 * precision * recall / np.maximum(0.3 * precision + recall, 1e-12)
    binary = 2 * v > 255  # p > 0.5
    # the whole curve, through the resize the command uses
    meter = SaliencyMeter()
    meter.update(resize_probability(small, gt.shape), gt)
    np.testing.assert_allclose(meter.fbeta_curve(), f, rtol=0, atol=1e-12)
    out_json = tmp_path / "r.json"
    code, _, err = _run(["saliency", "--pred", str(tmp_path / "pred"), "--gt",
                         str(tmp_path / "gt"), "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["max_fbeta"] == pytest.approx(f.max(), abs=1e-12)
    assert r["best_threshold"] == pytest.approx(int(np.argmax(f)) / 255, abs=1e-12)
    assert r["acc"] == pytest.approx(np.mean(binary == fg), abs=1e-12)
    assert r["iou"] == pytest.approx((binary & fg).sum() / (binary | fg).sum(), abs=1e-12)


def _stego_grid(labels: np.ndarray, size: int = 320) -> np.ndarray:
    """STEGO's evaluation grid, in torch: Resize(size) (short side, long side truncated, as
    torchvision), nearest with pixel centres (``nearest-exact``), CenterCrop(size)."""
    import torch
    import torch.nn.functional as F

    h, w = labels.shape
    th, tw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    out = F.interpolate(t, size=(th, tw), mode="nearest-exact")[0, 0].numpy()
    top, left = round((th - size) / 2), round((tw - size) / 2)
    return out[top : top + size, left : left + size].astype(labels.dtype)


def test_cityscapes_is_scored_on_the_320_centre_crop(tmp_path: Path, rng: np.random.Generator,
                                                    capsys) -> None:
    # evaluation.md, "Resolution": Cityscapes-27 (as COCO-Stuff-27, Potsdam-3) is scored with
    # image and label resized to short side 320 and centre-cropped to 320x320
    root, pred_dir = tmp_path / "cityscapes", tmp_path / "pred"
    stems = ["aachen_000000_000019", "aachen_000001_000019"]
    ids = rng.integers(7, 34, size=(2, 40, 64)).astype(np.uint8)
    ids[:, :3, :5] = 0  # void
    classes = np.where(ids >= 7, ids.astype(int) - 7, 255).astype(np.uint8)
    preds = np.where(classes == 255, 0, classes).astype(np.uint8)
    # wrong only in the margins the crop leaves out: columns < 7 and >= 57 of 64 (the crop
    # keeps 320 of 512 resized columns, 96..415, source columns 12..51), in one image
    preds[0, :, :7] = (preds[0, :, :7] + 1) % 27
    preds[0, :, 57:] = (preds[0, :, 57:] + 5) % 27
    noise = rng.random((40, 64)) < 0.3  # and noise everywhere in the other
    preds[1][noise] = rng.integers(0, 27, size=int(noise.sum()))
    for i, stem in enumerate(stems):
        save_png_atomic(root / f"leftImg8bit/val/aachen/{stem}_leftImg8bit.png",
                        np.zeros((40, 64, 3), np.uint8))
        save_png_atomic(root / f"gtFine/val/aachen/{stem}_gtFine_labelIds.png", ids[i])
        save_png_atomic(pred_dir / f"{stem}_leftImg8bit.png", preds[i])
    gt_grid = np.stack([_stego_grid(c) for c in classes])
    pred_grid = np.stack([_stego_grid(p) for p in preds])
    acc, miou = _hungarian_reference(pred_grid, gt_grid, 27, 255)
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(pred_dir), "--gt", str(root), "--json",
                         str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["dataset"] == "Cityscapes-27"
    assert r["acc"] == pytest.approx(acc, abs=1e-12)
    assert r["miou"] == pytest.approx(miou, abs=1e-12)
    # the first image alone: every pixel of its crop is right
    assert (pred_grid[0] == gt_grid[0])[gt_grid[0] != 255].all()


def _iou_protocol_reference(
    pred: np.ndarray, gt: np.ndarray, k: int, *, drop_predicted_255: bool = False,
    keep_ignored_gt: bool = False,
) -> tuple[tuple[int, ...], float, dict]:
    """MaskContrast's ``--match iou`` protocol restated by brute force in numpy (no unseg, no
    scipy): the ground truth's 255 pixels are dropped; every permutation of the ``k`` cluster ids
    onto the classes is tried, scored by the summed IoU of each cluster with its class (union
    over the kept pixels, where a predicted 255 is in no cluster but still in its class); the
    best one maps the prediction, a 255 staying unmatched (wrong). Returns the permutation, its
    lead over the runner-up, and the scores (Acc, per-class IoU, mIoU over the classes present).
    The keywords give two other protocols, to show that the data tells them apart."""
    keep = np.ones(gt.shape, bool) if keep_ignored_gt else gt != 255
    if drop_predicted_255:
        keep &= pred != 255
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    sums = {}
    for perm in itertools.permutations(range(k)):
        total = 0.0
        for c in range(k):
            inter = np.sum((p == c) & (g == perm[c]))
            union = np.sum((p == c) | (g == perm[c]))
            total += inter / union if union else 0.0
        sums[perm] = total
    ranked = sorted(sums, key=sums.__getitem__, reverse=True)
    best = ranked[0]
    mapped = np.full(p.shape, -1)
    for c in range(k):
        mapped[p == c] = best[c]
    iou = [np.sum((mapped == c) & (g == c)) / np.sum((mapped == c) | (g == c)) for c in range(k)]
    scores = {"acc": float(np.mean(mapped == g)), "per_class_iou": [float(v) for v in iou],
              "miou": float(np.mean(iou))}
    return best, sums[best] - sums[ranked[1]], scores


def test_iou_matching_skips_ignored_truth_and_counts_predicted_255_as_wrong(
    tmp_path: Path, capsys
) -> None:
    """`evaluate semantic --match iou` (MaskContrast's Hungarian on IoU, its
    ``linear_sum_assignment(N - IoU)``) against the brute force above, on pixels built so that
    the IoU-best permutation differs from the one matching pixel counts, from the one a
    predicted 255 left out of its class's union gives, and from the one counting the pixels of
    ignored ground truth in their cluster's area: each of those mistakes would change the
    matching and the scores. A predicted 255 is a wrong pixel of its class, as in the
    reference's union (its evaluation code never predicts 255)."""
    k = 3
    # (cluster, class) pixel counts, then class pixels predicted 255 and cluster pixels on
    # ignored ground truth, plus pixels ignored on both sides
    counts = [[5, 1, 10], [5, 4, 0], [0, 2, 6]]
    predicted_255 = [10, 0, 5]
    on_ignored = [0, 3, 5]
    pairs = [(c, cls) for c in range(k) for cls in range(k) for _ in range(counts[c][cls])]
    pairs += [(255, cls) for cls in range(k) for _ in range(predicted_255[cls])]
    pairs += [(c, 255) for c in range(k) for _ in range(on_ignored[c])]
    pairs += [(255, 255)] * (2 * 48 - len(pairs))
    order = np.random.default_rng(0).permutation(len(pairs))
    pred, gt = (np.array([pairs[i][j] for i in order], np.uint8).reshape(2, 6, 8)
                for j in (0, 1))
    best, lead, want = _iou_protocol_reference(pred, gt, k)
    assert lead > 0.01  # one best permutation: no tie for scipy to break otherwise
    others = [_iou_protocol_reference(pred, gt, k, drop_predicted_255=True)[0],
              _iou_protocol_reference(pred, gt, k, keep_ignored_gt=True)[0]]
    by_pixels = max(itertools.permutations(range(k)), key=lambda perm: sum(
        np.sum((pred == c) & (gt == perm[c])) for c in range(k)))
    assert best not in (*others, by_pixels)
    for i in range(2):
        save_png_atomic(tmp_path / "gt" / f"img{i}.png", gt[i])
        save_png_atomic(tmp_path / "pred" / f"img{i}.png", pred[i])
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(tmp_path / "pred"), "--gt",
                         str(tmp_path / "gt"), "-k", "3", "--match", "iou", "--json",
                         str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert tuple(r["assignment"]) == best
    assert r["acc"] == pytest.approx(want["acc"], abs=1e-12)
    assert r["miou"] == pytest.approx(want["miou"], abs=1e-12)
    assert r["per_class_iou"] == pytest.approx(want["per_class_iou"], abs=1e-12)


def _nested(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """Ground truth in category folders whose stems repeat (cats/001, dogs/001), and the
    predictions segment writes for them (mirrored folders), each its own image's labels."""
    gt, pred = tmp_path / "gt", tmp_path / "out" / "masks"
    for folder in ("cats", "dogs"):
        for stem in ("001", "002"):
            labels = _labels(rng)
            save_png_atomic(gt / folder / f"{stem}.png", labels)
            save_png_atomic(pred / folder / f"{stem}.png", labels)
    return pred, gt


def test_nested_ground_truth_with_repeated_stems_pairs_by_relative_path(
        tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    """Ground truth in category folders (cats/001.png, dogs/001.png) gave "no images found"
    (its top was listed only) or "several ground-truth files share a stem": it now pairs with
    the predictions' mirrored folders by relative path."""
    pred, gt = _nested(tmp_path, rng)
    out_json = tmp_path / "r.json"
    for kind in ("semantic", "saliency"):
        code, _, err = _run([kind, "--pred", str(pred), "--gt", str(gt), "--json",
                             str(out_json), *(["--num-classes", "3"] if kind == "semantic"
                                              else [])], capsys)
        assert code == 0, err
        r = json.loads(out_json.read_text())
        assert r["n_images"] == 4 and r["n_missing"] == 0 and r["acc"] == 1.0  # each its own
    # swapped folders: every image scored against another's labels
    (pred / "cats").rename(pred / "tmp")
    (pred / "dogs").rename(pred / "cats")
    (pred / "tmp").rename(pred / "dogs")
    code, _, _ = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes", "3",
                       "--json", str(out_json)], capsys)
    assert code == 0 and json.loads(out_json.read_text())["acc"] < 0.6
    # predictions without the folders cannot be told apart: each missing one is named
    flat = tmp_path / "flat"
    save_png_atomic(flat / "001.png", _labels(rng))
    code, _, err = _run(["semantic", "--pred", str(flat), "--gt", str(gt), "--num-classes",
                         "3"], capsys)
    assert code == 2 and "cats/001.png" in err and "dogs/002.png" in err


def test_ground_truth_at_the_top_and_in_sub_folders_is_all_scored(
        tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    """Ground truth with images at its top beside a category folder (001.png, dogs/001.png):
    the sub-folder's were ignored (the top held images), and the mirrored predictions were
    refused as "several prediction files share a stem"."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for rel in ("001", "002", "dogs/001", "dogs/002"):
        labels = _labels(rng)
        save_png_atomic(gt / f"{rel}.png", labels)
        save_png_atomic(pred / f"{rel}.png", labels)
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes",
                         "3", "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert (r["n_images"], r["n_missing"], r["acc"]) == (4, 0, 1.0)
    # a sub-folder's prediction missing is named, not ignored
    (pred / "dogs" / "002.png").unlink()
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes",
                         "3"], capsys)
    assert code == 2 and "dogs/002.png" in err


def test_flat_predictions_for_repeated_nested_ground_truth_say_why(
        tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    """Flat predictions against ground truth whose names repeat across sub-folders: the error
    named the files but not that the predictions must mirror the sub-folders."""
    _, gt = _nested(tmp_path, rng)
    flat = tmp_path / "flat"
    for stem in ("001", "002"):
        save_png_atomic(flat / f"{stem}.png", _labels(rng))
    code, _, err = _run(["semantic", "--pred", str(flat), "--gt", str(gt), "--num-classes",
                         "3"], capsys)
    assert code == 2 and "cats/001.png" in err and str(flat / "001.png") in err
    assert "repeat across its sub-folders (cats/001, dogs/001)" in err
    assert "same sub-folder" in err
    # mirrored one folder down (an output folder copied without its manifest, with overlays;
    # a run on the dataset's parent folder): the --pred to give is named
    copy = tmp_path / "copy"
    for sub in ("masks", "overlays"):
        for rel in ("cats/001", "dogs/001"):
            save_png_atomic(copy / sub / f"{rel}.png", _labels(rng))
    code, _, err = _run(["semantic", "--pred", str(copy), "--gt", str(gt), "--num-classes",
                         "3"], capsys)
    assert code == 2 and f"pass --pred {copy / 'masks'}" in err


def test_nested_ground_truth_with_unique_stems_still_pairs_by_stem(
        tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i, folder in enumerate(("a", "b")):
        labels = _labels(rng)
        save_png_atomic(gt / folder / f"im{i}.png", labels)
        save_png_atomic(pred / f"im{i}.png", labels)  # flat predictions
    out_json = tmp_path / "r.json"
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes",
                         "3", "--json", str(out_json)], capsys)
    assert code == 0, err
    assert json.loads(out_json.read_text())["acc"] == 1.0
    # a repeated stem in one folder is still an error naming both files
    Image.fromarray(_labels(rng)).save(gt / "a" / "im0.bmp")
    code, _, err = _run(["semantic", "--pred", str(pred), "--gt", str(gt), "--num-classes",
                         "3"], capsys)
    assert code == 2 and "share a stem" in err and "im0.bmp" in err


def test_corloc_of_a_nested_discover_boxes_json(annotations: Path, tmp_path: Path,
                                                 capsys) -> None:
    """discover keys boxes.json by path for nested inputs ("sub/x"); CorLoc against the flat
    annotations found no box for any image ("no box for 2 image(s)")."""
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"sub1/x": [0, 0, 20, 20], "sub2/deeper/y": [0, 0, 10, 10]}))
    code, _, err, r = _corloc(boxes, annotations, capsys, tmp_path / "c.json")
    assert code == 0, err
    assert (r["corloc"], r["n_images"], r["n_missing"]) == (0.5, 2, 0)
    boxes.write_text(json.dumps({"a/x": [0, 0, 20, 20], "b/x": None, "y": None}))
    code, _, err, _ = _corloc(boxes, annotations, capsys)
    assert code == 2 and "repeat in sub-folders" in err and "b/x" in err


def test_corloc_against_annotations_in_category_folders(tmp_path: Path, capsys) -> None:
    """Annotations laid out as the images (ann/cats/x.xml, ann/dogs/x.xml): only the top of
    the folder was read ("no .xml annotations found"). Repeated names pair by path with a
    nested discover's boxes.json (cats/x) and with its masks, each box against its own
    image's annotation."""
    ann = tmp_path / "ann"
    _xml(ann / "cats" / "x.xml", (1, 1, 20, 20))
    _xml(ann / "dogs" / "x.xml", (21, 11, 50, 40))
    _xml(ann / ".hidden" / "x.xml", (1, 1, 5, 5))  # skipped, as hidden images are
    boxes = tmp_path / "boxes.json"
    own = {"cats/x": [0, 0, 20, 20], "dogs/x": [20, 10, 50, 40]}
    out_json = tmp_path / "c.json"
    for pred, want in ((own, 1.0), ({"cats/x": own["dogs/x"], "dogs/x": own["cats/x"]}, 0.0)):
        boxes.write_text(json.dumps(pred))
        code, _, err, r = _corloc(boxes, ann, capsys, out_json)
        assert code == 0, err
        assert (r["corloc"], r["n_images"], r["n_missing"]) == (want, 2, 0)
    masks = tmp_path / "masks"
    for folder, (x0, y0, x1, y1) in own.items():
        mask = np.zeros((40, 50), np.uint8)
        mask[y0:y1, x0:x1] = 255
        save_png_atomic(masks / f"{folder}.png", mask)
    code, _, err, r = _corloc(masks, ann, capsys, out_json)
    assert code == 0, err
    assert r["corloc"] == 1.0
    # flat boxes cannot be told apart: each annotation without a box is named
    boxes.write_text(json.dumps({"x": [0, 0, 20, 20]}))
    code, _, err, _ = _corloc(boxes, ann, capsys)
    assert code == 2 and "cats/x" in err and "dogs/x" in err
