"""CorLoc: mask boxes (vs scipy.ndimage), hand-computed IoUs, multi-object XML, empty masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from unseg.metrics.corloc import box_iou, corloc, is_correct, largest_component_box
from unseg.pipelines.evaluate import evaluate_corloc
from unseg.utils.io import save_png_atomic


def _ref_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Boxes of every largest 4-connected component (several when areas tie), via scipy."""
    labels, n = ndimage.label(mask)  # default structure: 4-connectivity
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    out = []
    for lab in np.nonzero(sizes == sizes.max())[0] + 1:
        ys, xs = np.nonzero(labels == lab)
        out.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    return out


def test_largest_component_box_matches_scipy(rng: np.random.Generator) -> None:
    for _ in range(40):
        mask = rng.random((24, 31)) < rng.uniform(0.05, 0.6)
        ref = _ref_boxes(mask)
        got = largest_component_box(mask)
        assert (got is None) if not ref else (got in ref)


def test_box_of_hand_drawn_mask() -> None:
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:9] = 1  # 18 px
    mask[7:9, 0:2] = 1  # 4 px
    mask[5, 9] = 1  # touches the big one diagonally only: separate under 4-connectivity
    assert largest_component_box(mask) == (3.0, 2.0, 9.0, 5.0)
    assert largest_component_box(np.zeros((4, 4))) is None


def test_box_iou_hand_computed() -> None:
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 20]) == pytest.approx(0.5)
    assert box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
    assert box_iou([0, 0, 10, 10], [2, 2, 8, 8]) == pytest.approx(36 / 100)
    assert is_correct([0, 0, 10, 10], [[0, 0, 10, 20]])  # IoU exactly 0.5 counts
    assert not is_correct([0, 0, 10, 10], [[0, 0, 10, 21]])
    assert not is_correct(None, [[0, 0, 10, 10]])
    assert corloc([[0, 0, 10, 10], None], [[[0, 0, 10, 10]], [[0, 0, 5, 5]]]) == 0.5


def _write_xml(path: Path, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> None:
    objects = "".join(
        f"<object><name>cat</name><difficult>{i % 2}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for i, b in enumerate(boxes)
    )
    path.write_text(
        f"<annotation><filename>{path.stem}.jpg</filename><size><width>{size[1]}</width>"
        f"<height>{size[0]}</height><depth>3</depth></size>{objects}</annotation>"
    )


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    ann = tmp_path / "ann"
    ann.mkdir()
    # VOC bndbox is 1-based inclusive: (11, 21, 30, 40) covers columns 10..29, rows 20..39
    _write_xml(ann / "a.xml", (60, 80), [(11, 21, 30, 40), (51, 1, 80, 30)])
    _write_xml(ann / "b.xml", (60, 80), [(1, 1, 40, 60)])
    _write_xml(ann / "c.xml", (60, 80), [(1, 1, 80, 60)])
    return ann


def test_masks_multi_object_and_empty_mask(voc: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    a = np.zeros((60, 80), np.uint8)
    a[0:30, 50:80] = 255  # exactly the second object of a.xml
    a[50:52, 0:2] = 255  # a smaller blob elsewhere
    b = np.zeros((30, 40), np.uint8)  # half-size mask: box rescaled to the annotation's size
    b[0:30, 20:40] = 255  # → [40, 0, 80, 60], IoU with [0, 0, 40, 60] is 0: a miss
    save_png_atomic(pred / "a.png", a)
    save_png_atomic(pred / "b.png", b)
    save_png_atomic(pred / "c.png", np.zeros((60, 80), np.uint8))  # empty: a miss, no crash
    r = evaluate_corloc(pred, voc)
    assert (r.n_images, r.n_correct, r.source) == (3, 1, "masks")
    assert r.corloc == pytest.approx(1 / 3)
    b[:, :] = 0
    b[:, 0:20] = 255  # → [0, 0, 40, 60]: exact
    save_png_atomic(pred / "b.png", b)
    assert evaluate_corloc(pred, voc).n_correct == 2


def test_boxes_json(voc: Path, tmp_path: Path) -> None:
    boxes = {"a": [10, 20, 30, 40], "b": [0, 0, 20, 60], "c": None}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    r = evaluate_corloc(tmp_path / "boxes.json", voc)
    # a: exact first object; b: IoU 0.5 (counts); c: null → miss
    assert (r.n_correct, r.n_images, r.source) == (2, 3, "boxes.json")
    # a folder holding boxes.json works too
    assert evaluate_corloc(tmp_path, voc).n_correct == 2
