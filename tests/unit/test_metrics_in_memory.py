"""unseg.score_semantic / score_saliency / score_corloc: `unseg evaluate`'s protocols on arrays.

Checked against a brute force over every cluster-to-class permutation (semantic), per-image
counts written out by hand (saliency IoU / Acc at 0.5), and the `unseg evaluate` command on the
same maps written as PNGs (which resizes and reads files its own way).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unseg
from unseg.cli.main import main
from unseg.errors import UnsegError


def _brute_force(preds: list[np.ndarray], gts: list[np.ndarray], k: int,
                 ignore: int) -> tuple[float, float]:
    """Accuracy and mIoU under the cluster-to-class permutation with the most matched pixels
    (clusters 0..k-1; a predicted 255 is wrong; ignored ground truth is left out)."""
    best = None
    for perm in itertools.permutations(range(k)):
        tp = np.zeros(k)
        pred_n = np.zeros(k)
        gt_n = np.zeros(k)
        for p, g in zip(preds, gts, strict=True):
            keep = g != ignore
            p, g = p[keep], g[keep]
            for cluster, cls in enumerate(perm):
                tp[cls] += np.sum((p == cluster) & (g == cls))
                pred_n[cls] += np.sum(p == cluster)
            for cls in range(k):
                gt_n[cls] += np.sum(g == cls)
        if best is None or tp.sum() > best[0].sum():
            best = (tp, pred_n, gt_n)
    tp, pred_n, gt_n = best
    union = pred_n + gt_n - tp
    present = union > 0
    return float(tp.sum() / gt_n.sum()), float(np.mean(tp[present] / union[present]))


@pytest.mark.parametrize("match", ["pixels", "iou"])
def test_semantic_equals_a_brute_force_over_permutations(match: str) -> None:
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for shape in ((10, 14), (9, 7), (12, 12)):
        g = rng.integers(0, 3, shape)
        g[rng.random(shape) < 0.1] = 255  # ignored
        p = (g + 1) % 3  # a permutation of the classes ...
        noise = rng.random(shape) < 0.25
        p[noise] = rng.integers(0, 3, int(noise.sum()))  # ... with errors
        p[rng.random(shape) < 0.05] = 255  # predicted "no label"
        gts.append(g.astype(np.uint8))
        preds.append(p.astype(np.uint8))
    got = unseg.score_semantic(preds, gts, num_classes=3, match=match)
    acc, miou = _brute_force(preds, gts, 3, 255)
    assert got.acc == pytest.approx(acc, abs=1e-12)
    if match == "pixels":  # the IoU matching maximises summed IoU: same permutation here
        assert got.miou == pytest.approx(miou, abs=1e-12)
    assert got.assignment[:3] == [2, 0, 1]  # cluster c is class c - 1
    # the number of classes defaults to the ground truth's largest label + 1
    assert unseg.score_semantic(preds, gts, match=match) == got


def test_a_smaller_prediction_is_resized_nearest_to_its_ground_truth() -> None:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 4, (6, 8)).astype(np.uint8)
    full = np.repeat(np.repeat(small, 2, 0), 2, 1)  # the exact 2x nearest upsampling
    gt = rng.integers(0, 4, (12, 16)).astype(np.uint8)
    assert unseg.score_semantic([small], [gt]) == unseg.score_semantic([full], [gt])


def _write(folder: Path, maps: list[np.ndarray]) -> Path:
    folder.mkdir()
    for i, m in enumerate(maps):
        Image.fromarray(m).save(folder / f"im{i}.png")
    return folder


def test_semantic_and_saliency_equal_the_evaluate_command(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gts = [rng.integers(0, 4, (20, 30)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(0, 5, (10, 15)).astype(np.uint8) for _ in range(3)]  # half size
    gt_dir, pred_dir = _write(tmp_path / "gt", gts), _write(tmp_path / "pred", preds)
    result = tmp_path / "r.json"
    assert main(["-q", "evaluate", "semantic", "--pred", str(pred_dir), "--gt", str(gt_dir),
                 "--num-classes", "4", "--json", str(result)]) == 0
    cli = json.loads(result.read_text())
    got = unseg.score_semantic(preds, [gt_dir / f"im{i}.png" for i in range(3)], num_classes=4)
    assert (got.acc, got.miou) == pytest.approx((cli["acc"], cli["miou"]), abs=1e-12)

    masks = [(rng.random((20, 30)) < 0.4).astype(np.uint8) * 255 for _ in range(3)]
    maps = [rng.integers(0, 256, (10, 15)).astype(np.uint8) for _ in range(3)]
    mask_dir, map_dir = _write(tmp_path / "masks", masks), _write(tmp_path / "maps", maps)
    assert main(["-q", "evaluate", "saliency", "--pred", str(map_dir), "--gt", str(mask_dir),
                 "--json", str(result)]) == 0
    cli = json.loads(result.read_text())
    got = unseg.score_saliency(maps, masks)
    assert (got.acc, got.iou, got.max_fbeta, got.mae) == pytest.approx(
        (cli["acc"], cli["iou"], cli["max_fbeta"], cli["mae"]), abs=1e-12)


def test_saliency_iou_and_accuracy_by_hand() -> None:
    gt = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    pred = np.array([[200, 128, 10], [127, 0, 255]], np.uint8)  # > 0.5: 200, 128, 255
    got = unseg.score_saliency([pred], [gt])
    # predicted {(0,0), (0,1), (1,2)}, true {(0,1), (0,2), (1,2)}: 2 shared of 4, 4 of 6 right
    assert got.iou == pytest.approx(2 / 4) and got.acc == pytest.approx(4 / 6)
    as_float = unseg.score_saliency([pred / 255.0], [gt > 0])  # floats, and a bool mask
    assert as_float.iou == pytest.approx(2 / 4) and as_float.acc == pytest.approx(4 / 6)


def test_corloc_counts_boxes_with_iou_of_at_least_a_half() -> None:
    gt = [[[0, 0, 10, 10]], [[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 4, 4]]]
    boxes = [[0, 0, 10, 5], [21, 21, 30, 30], None]  # IoU 0.5 (counts), 0.81, a miss
    assert unseg.score_corloc(boxes, gt) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)], []), "1 predictions for 0"),
    (lambda: unseg.score_semantic("pred/", "gt/"), "give lists"),
    (lambda: unseg.score_semantic([np.zeros((2, 2, 3), np.uint8)], [np.zeros((2, 2), np.uint8)]),
     r"prediction 0: expected an \[H, W\] map"),
    (lambda: unseg.score_semantic([np.zeros((2, 2))], [np.zeros((2, 2), np.uint8)]),
     "prediction 0: class ids must be integers"),
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)], [np.full((2, 2), 7)],
                                  num_classes=3), r"image 0: ground-truth labels \[7\]"),
    (lambda: unseg.score_saliency([np.full((2, 2), 1.5)], [np.zeros((2, 2), np.uint8)]),
     r"must lie in \[0, 1\]"),
    (lambda: unseg.score_semantic([], []), "no predictions"),
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)], [np.zeros((2, 2))]),
     "ground truth 0: class ids must be integers, got float64"),
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)], [np.zeros((2, 2), np.uint8)],
                                  num_classes=2.5), "num_classes: expected an integer"),
    (lambda: unseg.score_semantic([np.zeros((0, 2), np.uint8)], [np.zeros((2, 2), np.uint8)]),
     r"prediction 0: empty map of shape \(0, 2\)"),
    (lambda: unseg.score_saliency([np.zeros((0, 2), np.uint8)], [np.zeros((2, 2), np.uint8)]),
     r"prediction 0: empty map"),
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)], [np.zeros((2, 0), np.uint8)]),
     r"ground truth 0: empty map"),
    (lambda: unseg.score_semantic((p for p in [np.zeros((2, 2), np.uint8)]),
                                  [np.zeros((2, 2), np.uint8)]),
     "predictions: expected a list .*got generator"),
    (lambda: unseg.score_semantic([np.zeros((2, 2), np.uint8)],
                                  [np.random.default_rng(0).integers(0, 3, (2, 2, 3))]),
     r"ground truth 0: a colour image of shape \(2, 2, 3\)"),
    (lambda: unseg.score_corloc([[0, 0, 10]], [[[0, 0, 10, 10]]]),
     r"boxes\[0\]: expected a box \[x0, y0, x1, y1\] of four finite numbers"),
    (lambda: unseg.score_corloc([[0, 0, float("nan"), 10]], [[[0, 0, 10, 10]]]),
     r"boxes\[0\]: expected a box"),
    (lambda: unseg.score_corloc([[0, 0, 10, 10]], [None]), r"gt_boxes\[0\]: expected a list"),
    (lambda: unseg.score_corloc([[0, 0, 10, 10]], [[0, 0, 10, 10]]),
     r"gt_boxes\[0\]: expected a list of boxes, got one box"),
    (lambda: unseg.score_corloc([[0, 0, 10, 10]], [[[0, 0, 10]]]), r"gt_boxes\[0\]\[0\]"),
    (lambda: unseg.score_corloc([], []), "no boxes"),
])
def test_bad_inputs_are_errors_that_say_which(call, message: str) -> None:
    with pytest.raises(UnsegError, match=message):
        call()


def test_a_0_1_or_float_saliency_ground_truth_is_not_read_as_empty() -> None:
    """A 0/1 uint8 mask was binarised at 128 (all background) and so was a float mask in
    [0, 1]: an empty prediction then scored IoU 1.0. A float mask is now binarised above 0.5,
    as the bool mask it stands for, and a 0/1 integer mask is binary (as CorLoc reads one)."""
    truth = np.zeros((4, 6), np.uint8)
    truth[1:3, 2:5] = 1
    empty, exact = np.zeros((4, 6), np.uint8), truth * 255
    for given in (truth, truth.astype(np.int32), truth.astype(bool), truth.astype(np.float32),
                  truth * 255):
        assert unseg.score_saliency([empty], [given]).iou == 0.0
        assert unseg.score_saliency([exact], [given]).iou == 1.0
    with pytest.raises(UnsegError, match=r"ground truth 0: a float mask must lie in \[0, 1\]"):
        unseg.score_saliency([empty], [truth * 255.0])


def test_one_map_is_one_image_and_a_stack_is_many(tmp_path: Path) -> None:
    """A single [H, W] prediction and ground truth (as Segmenter.predict takes one image) were
    iterated by rows: "4 predictions for 4 ground-truth maps" scored rows as images, or the
    counts differed. One map is now one image; a [N, H, W] stack is N images."""
    rng = np.random.default_rng(5)
    preds = [rng.integers(0, 3, (4, 6)).astype(np.uint8) for _ in range(2)]
    gts = [rng.integers(0, 3, (4, 6)).astype(np.uint8) for _ in range(2)]
    one = unseg.score_semantic(preds[:1], gts[:1], num_classes=3)
    assert unseg.score_semantic(preds[0], gts[0], num_classes=3) == one
    assert one.n_pixels == 24
    assert (unseg.score_semantic(np.stack(preds), np.stack(gts), num_classes=3)
            == unseg.score_semantic(preds, gts, num_classes=3))
    Image.fromarray(gts[0]).save(tmp_path / "gt.png")
    for truth in (tmp_path / "gt.png", str(tmp_path / "gt.png"), Image.fromarray(gts[0]),
                  Image.fromarray(gts[0]).convert("RGB"), [np.dstack([gts[0]] * 3)]):
        assert unseg.score_semantic(preds[0], truth, num_classes=3) == one  # as its file reads
    mask = (gts[0] > 0).astype(np.uint8) * 255
    assert (unseg.score_saliency(preds[0] * 100, mask)
            == unseg.score_saliency([preds[0] * 100], [mask]))
    with pytest.raises(UnsegError, match="give lists"):
        unseg.score_semantic(preds[0], tmp_path)


def test_0_1_uint8_saliency_predictions_are_refused_not_scored_as_background() -> None:
    """Binary masks given as 0/1 uint8 were read as 8-bit maps (v/255: almost background), so
    a perfect prediction scored IoU 0 without a word (`unseg evaluate` warns of such files).
    As bool or 0/255 they score as expected; a set of 8-bit maps where some are graded is
    taken, even when one of them peaks at 1."""
    truth = np.zeros((4, 6), np.uint8)
    truth[1:3, 2:5] = 255
    binary = (truth > 0).astype(np.uint8)
    with pytest.raises(UnsegError, match="predictions hold only the values 0 and 1"):
        unseg.score_saliency([binary], [truth])
    assert unseg.score_saliency([binary.astype(bool)], [truth]).iou == 1.0
    assert unseg.score_saliency([binary * 255], [truth]).iou == 1.0
    faint = unseg.score_saliency([binary, binary * 255], [truth, truth])
    assert faint.iou == pytest.approx(0.5)  # the 0/1 map is below 0.5 everywhere: IoU 0


def test_one_colour_ground_truth_array_is_one_image() -> None:
    """An [H, W, 3] ground truth given alone was taken as H maps of [W, 3] ("1 predictions
    for 4 ground-truth maps"); it is one image, read as its file would be: equal channels as
    one, different ones refused with the palette hint."""
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, (4, 6)).astype(np.uint8)
    grey_rgb = np.repeat(labels[..., None], 3, axis=2)
    assert unseg.score_semantic(labels, grey_rgb) == unseg.score_semantic(labels, labels)
    colour = grey_rgb.copy()
    colour[..., 1] = 0
    with pytest.raises(UnsegError, match=r"ground truth 0: a colour image of shape \(4, 6, 3\)"):
        unseg.score_semantic(labels, colour)


def test_a_huge_predicted_id_is_refused_not_allocated() -> None:
    """An int32 prediction holding a stray id near 2**31 made the confusion matrix grow a row
    per id (a MemoryError or the machine's swap); ids past 65535 are refused, naming it."""
    pred = np.zeros((4, 6), np.int32)
    pred[0, 0] = 2**31 - 1
    with pytest.raises(UnsegError, match="prediction 0: class ids up to 65535 are scored, got "
                                         "2147483647"):
        unseg.score_semantic([pred], [np.zeros((4, 6), np.uint8)])
    pred[0, 0] = 65535  # the largest scored id
    assert unseg.score_semantic([pred], [np.zeros((4, 6), np.uint8)]).acc == pytest.approx(23 / 24)


def test_set_progress_takes_a_bool_only() -> None:
    """set_progress("no") switched the bars on (a truthy string)."""
    with pytest.raises(TypeError, match="set_progress takes True or False, got 'no'"):
        unseg.set_progress("no")
