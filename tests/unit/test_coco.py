"""COCO export: our RLE against pycocotools (decode, encode, area, bbox), and whole exports of fake
semantic and saliency outputs decoded back to exactly the written masks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.outdir import claim, recorded
from unseg.report.coco import (
    coco_results,
    counts_string,
    encode_rle,
    mask_bbox,
    rle_counts,
    write_coco,
)
from unseg.report.outputs import find_outputs
from unseg.utils.io import save_png_atomic, write_json_atomic
from unseg.utils.palette import png_palette

mask_util = pytest.importorskip(
    "pycocotools.mask", reason="pycocotools is not installed (pip install -e '.[dev]')"
)
# pycocotools 2.0.x passes copy=False to numpy's __array__; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _masks(rng: np.random.Generator) -> list[np.ndarray]:
    """Binary masks covering the edge cases: empty, full, first pixel set or not, one pixel,
    long runs (multi-character counts), many short runs (negative count differences)."""
    out = [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.ones((1, 1), bool),
        np.zeros((1, 1), bool),
        np.eye(6, dtype=bool),
    ]
    big = np.zeros((300, 400), bool)
    big[40:260, 100:330] = True
    big[0, 0] = True
    out.append(big)
    out += [rng.random((h, w)) < p for h, w, p in [(17, 23, 0.5), (64, 48, 0.05), (3, 200, 0.9)]]
    blobs = np.zeros((120, 90), bool)
    for _ in range(12):
        y, x = rng.integers(0, 110), rng.integers(0, 80)
        blobs[y : y + rng.integers(2, 30), x : x + rng.integers(2, 30)] = True
    out.append(blobs)
    return out


def _brute_counts(mask: np.ndarray) -> list[int]:
    counts, current, run = [], False, 0
    for v in mask.T.ravel():
        if bool(v) != current:
            counts.append(run)
            current, run = bool(v), 0
        run += 1
    counts.append(run)
    return counts


def test_rle_counts_match_a_brute_force_run_length(rng: np.random.Generator) -> None:
    for mask in _masks(rng):
        assert rle_counts(mask) == _brute_counts(mask)


def test_our_rle_decodes_with_pycocotools_to_the_mask(rng: np.random.Generator) -> None:
    for mask in _masks(rng):
        rle = encode_rle(mask)
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_our_counts_string_equals_pycocotools_encode(rng: np.random.Generator) -> None:
    for mask in _masks(rng):
        ref = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert encode_rle(mask)["counts"] == ref["counts"].decode("ascii")
        assert encode_rle(mask)["size"] == list(ref["size"])
        assert int(mask.sum()) == int(mask_util.area(ref))
        if mask.any():
            np.testing.assert_allclose(mask_bbox(mask), mask_util.toBbox(ref))


def test_counts_string_known_values() -> None:
    # hand-computed: 0 -> '0'; 5 -> chr(48 + 5); 40 = 8 + 1 * 32 -> chr(48 + 8 | 0x20), chr(49)
    assert counts_string([0]) == "0"
    assert counts_string([5]) == "5"
    assert counts_string([40]) == chr(48 + (8 | 0x20)) + "1"
    # the fourth count is stored as its difference to the second: 3 - 7 = -4 -> 0x1c -> 'L'
    assert counts_string([1, 7, 2, 3]) == "172L"


def _semantic_out(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path / "seg"
    rng = np.random.default_rng(3)
    written = {}
    for name, (h, w) in {"a": (31, 40), "sub/b": (20, 20), "c": (8, 50)}.items():
        labels = rng.integers(0, 4, (h, w)).astype(np.uint8)
        labels[:2, :3] = 255
        save_png_atomic(out / "masks" / f"{name}.png", labels, palette=png_palette())
        written[f"{name}.png"] = labels
    return out, written


def test_semantic_export_decodes_to_exactly_the_label_pngs(tmp_path: Path) -> None:
    out, written = _semantic_out(tmp_path)
    path = write_coco(out)
    assert path == out / "coco_results.json"
    results = json.loads(path.read_text())
    names = sorted(written)
    assert {r["file_name"] for r in results} == set(names)
    for image_id, name in enumerate(names, start=1):
        labels = written[name]
        entries = [r for r in results if r["file_name"] == name]
        assert {r["image_id"] for r in entries} == {image_id}
        assert sorted(r["category_id"] for r in entries) == sorted(
            int(v) for v in np.unique(labels) if v != 255
        )
        for r in entries:
            seg = r["segmentation"]
            decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), labels == r["category_id"])
            assert r["area"] == int((labels == r["category_id"]).sum())
        rebuilt = np.full(labels.shape, 255, dtype=np.uint8)
        for r in entries:
            seg = r["segmentation"]
            rebuilt[mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
                    .astype(bool)] = r["category_id"]
        np.testing.assert_array_equal(rebuilt, labels)


def test_saliency_export_one_object_per_image_and_loadres(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    out = tmp_path / "disc"
    prob = np.zeros((30, 40), np.uint8)
    prob[5:20, 10:30] = 200
    prob[6, 11] = 127
    save_png_atomic(out / "masks" / "x.png", prob)
    save_png_atomic(out / "masks" / "empty.png", np.full((10, 10), 100, np.uint8))
    write_json_atomic(out / "boxes.json", {"x": [10.0, 5.0, 30.0, 20.0], "empty": None})
    results = coco_results(find_outputs(out))
    assert len(results) == 1
    (r,) = results
    assert (r["file_name"], r["image_id"], r["category_id"]) == ("x.png", 2, 1)
    seg = r["segmentation"]
    decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), prob >= 128)
    assert r["bbox"] == [10.0, 5.0, 20.0, 15.0]
    assert r["score"] == pytest.approx(200 / 255, abs=1e-6)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 10, "width": 10}, {"id": 2, "height": 30, "width": 40}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [],
    }
    gt.createIndex()
    loaded = gt.loadRes(results)
    ann = loaded.loadAnns(loaded.getAnnIds(imgIds=[2]))[0]
    np.testing.assert_array_equal(loaded.annToMask(ann).astype(bool), prob >= 128)


def test_cli_format_coco_writes_where_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = _semantic_out(tmp_path)
    target = tmp_path / "elsewhere" / "res.json"
    assert main(["report", str(out), "--format", "coco", "--out", str(target)]) == 0
    assert "COCO results written to" in capsys.readouterr().out
    assert len(json.loads(target.read_text())) > 0
    assert not (out / "coco_results.json").exists()


def test_export_of_a_folder_without_masks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UnsegError, match="neither masks"):
        write_coco(tmp_path / "nothing")


def test_export_names_a_corrupt_mask(tmp_path: Path) -> None:
    out, _ = _semantic_out(tmp_path)
    (out / "masks" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnsegError, match=r"broken\.png"):
        write_coco(out)


def test_an_export_into_an_output_folder_goes_with_its_outputs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`unseg report --format coco` wrote coco_results.json into the folder unrecorded: a
    later --overwrite of the same command refused the folder ("holds 1 file(s):
    coco_results.json that unseg did not write") and --resume warned about it. It is now
    recorded as the folder's command's: --overwrite deletes it with the masks it was made of."""
    out = tmp_path / "seg"
    with recorded(out, "segment", {"k": 3}) as record:
        save_png_atomic(out / "masks" / "cats" / "001.png", np.ones((8, 8), np.uint8),
                        palette=png_palette())
        save_png_atomic(out / "masks" / "dogs" / "001.png", np.zeros((8, 8), np.uint8),
                        palette=png_palette())
        record.exit_code = 0
    assert main(["-q", "report", str(out), "--format", "coco"]) == 0
    assert main(["-q", "report", str(out), "--out", str(out / "extra.html")]) == 0
    assert main(["-q", "report", str(out), "--format", "coco",
                 "--out", str(tmp_path / "elsewhere.json")]) == 0
    results = json.loads((out / "coco_results.json").read_text())
    assert sorted({(r["image_id"], r["file_name"]) for r in results}) == [
        (1, "cats/001.png"), (2, "dogs/001.png")]  # repeated names: one id each
    with caplog.at_level(logging.WARNING):
        claim(out, "segment", {"k": 3}, mode="resume").close("finished")
    assert "did not write" not in caplog.text
    claim(out, "segment", {"k": 3}, mode="overwrite").close("finished")
    assert not (out / "coco_results.json").exists() and not (out / "extra.html").exists()
    assert (tmp_path / "elsewhere.json").is_file()  # outside the folder: not its to delete
