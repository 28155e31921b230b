"""`unseg report`: the page of tiny fake runs (gallery, metrics against brute force, charts,
self-contained, palette colours), the folders it reads, and a real headless-browser check."""

from __future__ import annotations

import base64
import io
import itertools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.metrics.semantic import scores_from_assignment
from unseg.report.gallery import pick
from unseg.report.html import write_report
from unseg.report.outputs import find_outputs, match_images
from unseg.report.scores import evaluate_saliency_run, evaluate_semantic_run
from unseg.report.thumbs import IGNORE_COLOR
from unseg.runs import save_run
from unseg.utils.io import save_png_atomic, write_json_atomic
from unseg.utils.palette import label_colors, png_palette

PERM = np.array([2, 0, 1])  # cluster -> class of the fake ground truth
QUADRANT_COLORS = np.array([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 220, 30]], np.uint8)
H, W = 40, 48


def _quadrants(shift: int) -> np.ndarray:
    """A ``[H, W]`` map of 4 quadrant ids, the split moved by ``shift`` pixels."""
    q = np.zeros((H, W), dtype=np.uint8)
    q[: H // 2 + shift, W // 2 - shift :] = 1
    q[H // 2 + shift :, : W // 2 + shift] = 2
    q[H // 2 + shift :, W // 2 + shift :] = 3
    return q


def _semantic_run(
    tmp_path: Path, n: int = 3, config: dict | None = None, timings: dict | None = None
) -> dict[str, Path]:
    """A fake ``segment`` output: images, label masks (K=3), a run record and ground truth whose
    classes are the clusters permuted by PERM, with noise and ignored pixels."""
    rng = np.random.default_rng(7)
    images, out, gt = tmp_path / "images", tmp_path / "out", tmp_path / "gt"
    for i in range(n):
        q = _quadrants(i % 4)
        save_png_atomic(images / f"im{i}.png", QUADRANT_COLORS[q])
        labels = np.minimum(q, 2).astype(np.uint8)
        save_png_atomic(out / "masks" / f"im{i}.png", labels, palette=png_palette())
        truth = PERM[labels].astype(np.uint8)
        noise = rng.random((H, W)) < 0.15
        truth[noise] = rng.integers(0, 3, int(noise.sum()))
        truth[:3, :5] = 255
        save_png_atomic(gt / f"im{i}.png", truth)
    run = out / "run"
    run.mkdir(parents=True)
    (run / "weights.safetensors").write_bytes(b"")
    record = {"method": "kmeans", "backbone": "fake", "num_classes": 3, "feature_size": 64}
    record.update(config or {})
    if timings is not None:
        record["timings"] = timings
    write_json_atomic(run / "config.json", record)
    return {"images": images, "out": out, "gt": gt}


def _saliency_run(tmp_path: Path, n: int = 3) -> dict[str, Path]:
    """A fake ``discover`` output (8-bit probabilities and boxes.json), images and 0/255 masks."""
    rng = np.random.default_rng(11)
    images, out, gt = tmp_path / "images", tmp_path / "out", tmp_path / "gt"
    boxes = {}
    for i in range(n):
        save_png_atomic(images / f"s{i}.png", QUADRANT_COLORS[_quadrants(i)])
        prob = np.zeros((H, W), dtype=np.uint8)
        prob[8 : 30 + i, 10:40] = 220
        prob += rng.integers(0, 30, (H, W)).astype(np.uint8)
        save_png_atomic(out / "masks" / f"s{i}.png", prob)
        truth = np.zeros((H, W), dtype=np.uint8)
        truth[10:32, 12 + 4 * i : 40] = 255
        save_png_atomic(gt / f"s{i}.png", truth)
        boxes[f"s{i}"] = [10.0, 8.0, 40.0, 30.0 + i]
    write_json_atomic(out / "boxes.json", boxes)
    return {"images": images, "out": out, "gt": gt}


def _uris(page: str) -> list[str]:
    return re.findall(r'src="(data:image/[a-z]+;base64,[^"]+)"', page)


def _decode(uri: str) -> np.ndarray:
    data = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _tagged_uris(page: str, caption: str) -> list[str]:
    return re.findall(rf'src="(data:image/[a-z]+;base64,[^"]+)" alt="{caption}"', page)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- semantic


def _brute_force_scores(masks: list[np.ndarray], truths: list[np.ndarray]) -> tuple:
    """Best pixel accuracy over all cluster -> class permutations, its mIoU and per-class IoU."""
    best = None
    for perm in itertools.permutations(range(3)):
        p = np.array(perm)
        hits = total = 0
        inter, union = np.zeros(3), np.zeros(3)
        for m, t in zip(masks, truths, strict=True):
            valid = t != 255
            mapped = p[m][valid]
            tv = t[valid]
            hits += int((mapped == tv).sum())
            total += int(valid.sum())
            for c in range(3):
                inter[c] += ((mapped == c) & (tv == c)).sum()
                union[c] += ((mapped == c) | (tv == c)).sum()
        acc = hits / total
        if best is None or acc > best[0]:
            best = (acc, float((inter / union).mean()), list(inter / union), perm)
    return best


def test_semantic_scores_equal_brute_force_and_confusion_counts(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path)
    masks = [_load(p) for p in sorted((run["out"] / "masks").glob("*.png"))]
    truths = [_load(p) for p in sorted(run["gt"].glob("*.png"))]
    acc, miou, per_class, perm = _brute_force_scores(masks, truths)
    ev = evaluate_semantic_run(run["out"] / "masks", run["gt"])
    assert ev.result.num_classes == 3  # inferred: largest label + 1
    assert ev.result.acc == pytest.approx(acc)
    assert ev.result.miou == pytest.approx(miou)
    assert ev.result.per_class_iou == pytest.approx(per_class)
    assert tuple(ev.result.assignment) == perm == tuple(PERM)
    expected = np.zeros((3, 3), dtype=np.int64)
    for m, t in zip(masks, truths, strict=True):
        valid = t != 255
        np.add.at(expected, (m[valid].astype(int), t[valid].astype(int)), 1)
    np.testing.assert_array_equal(ev.confusion, expected)
    again = scores_from_assignment(ev.confusion, np.array(ev.result.assignment))
    assert again.acc == pytest.approx(ev.result.acc)


@pytest.mark.parametrize("kind", ["semantic", "saliency"])
def test_a_missing_or_extra_prediction_is_warned_once(kind: str, tmp_path: Path,
                                                      caplog) -> None:
    """`unseg segment IMAGES --gt GT` logged "N ground-truth file(s) have no prediction" twice:
    the report's scores paired the files, then the evaluation paired them again."""
    run = (_semantic_run if kind == "semantic" else _saliency_run)(tmp_path)
    masks = run["out"] / "masks"
    first = sorted(masks.glob("*.png"))[0]
    first.rename(masks / "stray.png")
    with caplog.at_level(logging.WARNING, logger="unseg.pipelines.pairing"):
        if kind == "semantic":
            evaluate_semantic_run(masks, run["gt"])
        else:
            evaluate_saliency_run(masks, run["gt"])
    warned = [r.getMessage() for r in caplog.records]
    assert warned.count("1 ground-truth file(s) have no prediction") == 1
    assert warned.count("1 prediction(s) have no ground truth and are ignored") == 1


def test_page_has_gallery_metrics_charts_config_and_timings(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path, timings={"features": 12.25, "fit": {"em": 30.0}})
    path = write_report(run["out"], images=run["images"], gt=run["gt"])
    assert path == run["out"] / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count('<article class="card">') == 3
    assert len(_tagged_uris(page, "image")) == 3
    assert len(_tagged_uris(page, "overlay")) == 3
    assert len(_tagged_uris(page, "ground truth")) == 3
    acc, miou, per_class, _ = _brute_force_scores(
        [_load(p) for p in sorted((run["out"] / "masks").glob("*.png"))],
        [_load(p) for p in sorted(run["gt"].glob("*.png"))],
    )
    assert f'<td>pixel accuracy</td><td class="num">{100 * acc:.1f}%</td>' in page
    assert f'<td>mIoU</td><td class="num">{100 * miou:.1f}%</td>' in page
    for c, iou in enumerate(per_class):
        assert re.search(rf"<td>class {c}</td><td>.*?</td><td class=\"num\">{100 * iou:.1f}%</td>",
                         page)
    for alt in ("per-class IoU bar chart", "confusion matrix heat map"):
        (uri,) = _tagged_uris(page, alt)
        chart = _decode(uri)
        assert chart.shape[0] > 150 and chart.shape[1] > 250
        assert chart.reshape(-1, 3).std(axis=0).max() > 10  # drawn, not blank
    assert 'id="timings"' in page and "fit.em" in page and "30.0 s" in page
    assert "12.2 s" in page or "12.3 s" in page
    assert "<td>backbone</td><td>fake</td>" in page
    assert not list(run["out"].glob(".report.html.*"))  # the atomic writer's temp file is gone


def test_page_is_self_contained(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path)
    page = write_report(run["out"], images=run["images"], gt=run["gt"]).read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I)
    assert refs and all(r.startswith("data:image/") for r in refs)
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    for uri in _uris(page):
        _decode(uri)  # every picture decodes


def test_gallery_colours_are_the_png_palette_and_gt_uses_matched_clusters(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path)
    page = write_report(run["out"], gt=run["gt"]).read_text()  # no images: masks are shown
    palette = label_colors(256)
    for k in range(3):
        r, g, b = palette[k]
        assert f"background: rgb({r}, {g}, {b})" in page
    masks = _tagged_uris(page, "mask")
    truths = _tagged_uris(page, "ground truth")
    assert len(masks) == len(truths) == 3
    allowed = {tuple(palette[k]) for k in range(3)}
    for uri_m, uri_t in zip(masks, truths, strict=True):
        m, t = _decode(uri_m), _decode(uri_t)
        assert {tuple(c) for c in m.reshape(-1, 3)} == allowed
        assert {tuple(c) for c in t.reshape(-1, 3)} <= allowed | {IGNORE_COLOR}
        agree = (m == t).all(axis=2).mean()
        assert agree > 0.75  # ground truth coloured by matched cluster looks like the mask
    assert "Original images not found" in page


def test_report_without_ground_truth_or_timings(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path, config={"images": str(tmp_path / "images")})
    page = write_report(run["out"]).read_text()  # images found through the run's record
    assert page.count('<article class="card">') == 3
    assert len(_tagged_uris(page, "image")) == 3
    assert 'id="metrics"' not in page and 'id="charts"' not in page
    assert 'id="timings"' not in page
    assert 'id="config"' in page


def test_a_corrupt_mask_is_left_out_of_the_gallery(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path)
    (run["out"] / "masks" / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    page = write_report(run["out"], images=run["images"]).read_text()
    names = re.findall(r'<span class="name">([^<]+)</span>', page)
    assert names == ["im0", "im2"]


def test_a_mask_the_metrics_cannot_use_gets_no_score_on_its_card(tmp_path: Path) -> None:
    """A mask of the ground truth's size transposed (a photo with an EXIF rotation: the mask
    follows the displayed orientation) is left out of the metrics; its card must not score a
    squashed copy of it either."""
    run = _semantic_run(tmp_path)
    mask = run["out"] / "masks" / "im1.png"
    save_png_atomic(mask, np.ascontiguousarray(_load(mask).T), palette=png_palette())
    page = write_report(run["out"], images=run["images"], gt=run["gt"]).read_text()
    assert page.count('<article class="card">') == 3
    assert page.count("pixel acc ") == 2


def test_a_bare_run_folder_gets_its_configuration(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path, timings={"fit": 2.0})
    bare = tmp_path / "fitted"
    shutil.copytree(run["out"] / "run", bare)
    outputs = find_outputs(bare)
    assert outputs.masks == [] and outputs.masks_dir is None and outputs.run_dir == bare
    page = write_report(bare, gt=run["gt"]).read_text()
    assert "This folder holds no masks." in page and 'id="timings"' in page
    assert (bare / "report.html").is_file()


def test_gallery_cap_spreads_over_the_run(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path, n=7)
    page = write_report(run["out"], images=run["images"], max_images=3).read_text()
    assert page.count('<article class="card">') == 3
    assert "Showing 3 of 7 images" in page
    names = re.findall(r'<span class="name">([^<]+)</span>', page)
    assert names == ["im0", "im2", "im4"]
    assert pick(10, 4) == [0, 2, 5, 7]
    assert pick(3, 5) == [0, 1, 2]
    assert pick(5, 0) == []


def test_an_unreadable_mask_in_the_sample_gives_way_to_its_neighbour(tmp_path: Path) -> None:
    """`--max-images 3` of 7 showed 2 cards when a picked mask could not be read: the nearest
    mask not picked takes its place, so the gallery shows the number asked."""
    run = _semantic_run(tmp_path, n=7)
    (run["out"] / "masks" / "im2.png").write_bytes(b"\x89PNG broken")
    page = write_report(run["out"], images=run["images"], max_images=3).read_text()
    names = re.findall(r'<span class="name">([^<]+)</span>', page)
    assert names == ["im0", "im3", "im4"]
    assert "Showing 3 of 7 images" in page


# ----------------------------------------------------------------------------- saliency, boxes


def test_saliency_page_scores_and_per_image_iou(tmp_path: Path) -> None:
    run = _saliency_run(tmp_path)
    ev = evaluate_saliency_run(run["out"] / "masks", run["gt"])
    expected = np.zeros((2, 2), dtype=np.int64)
    for i in range(3):
        p = _load(run["out"] / "masks" / f"s{i}.png") >= 128  # v/255 > 0.5
        g = _load(run["gt"] / f"s{i}.png") >= 128
        assert ev.image_iou[f"s{i}"] == pytest.approx((p & g).sum() / (p | g).sum())
        np.add.at(expected, (g.ravel().astype(int), p.ravel().astype(int)), 1)
    np.testing.assert_array_equal(ev.pixel_confusion, expected)
    assert ev.result.iou == pytest.approx(np.mean(list(ev.image_iou.values())))
    page = write_report(run["out"], images=run["images"], gt=run["gt"]).read_text()
    assert f'<td>IoU (p &gt; 0.5)</td><td class="num">{100 * ev.result.iou:.1f}%</td>' in page
    assert f'{100 * ev.result.max_fbeta:.1f}%' in page and f"{ev.result.mae:.4f}" in page
    assert len(_tagged_uris(page, "mask and box")) == 3
    assert len(_tagged_uris(page, "pixel confusion heat map")) == 1
    assert len(_tagged_uris(page, "per-image IoU histogram")) == 1
    assert "No run record" in page


def test_the_header_names_the_method_the_command_was_given(tmp_path: Path) -> None:
    """A spectral `unseg discover` folder has no run record: its page said "method discover";
    it now names the --method its manifest records (and "unknown" without one)."""
    run = _saliency_run(tmp_path)
    page = write_report(run["out"], images=run["images"]).read_text()
    assert "method unknown" in page and "method discover" not in page
    write_json_atomic(run["out"] / "unseg-manifest.json", {"format_version": 1, "commands": [
        {"command": "discover", "settings": {"--method": "spectral"}, "files": []}]})
    page = write_report(run["out"], images=run["images"]).read_text()
    assert "saliency masks · 3 image(s) · method spectral · " in page


def test_malformed_boxes_are_not_drawn(tmp_path: Path) -> None:
    run = _saliency_run(tmp_path)
    write_json_atomic(run["out"] / "boxes.json", {"s0": [1, 2, 3, 4], "s1": "junk", "s2": None})
    page = write_report(run["out"], images=run["images"]).read_text()
    assert len(_tagged_uris(page, "mask and box")) == 1
    assert len(_tagged_uris(page, "mask")) == 2


def test_corloc_with_voc_annotations(tmp_path: Path) -> None:
    run = _saliency_run(tmp_path, n=2)
    ann = tmp_path / "ann"
    ann.mkdir()
    gt_boxes = {"s0": (11, 9, 40, 30), "s1": (1, 1, 5, 5)}  # 1-based inclusive: s0 hit, s1 miss
    for stem, (x0, y0, x1, y1) in gt_boxes.items():
        (ann / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size><object><name>thing</name>"
            f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
        )
    page = write_report(run["out"], annotations=ann).read_text()
    assert '<td>CorLoc</td><td class="num">50.0%</td>' in page
    assert '<td>boxes from</td><td class="num">boxes.json</td>' in page


# ----------------------------------------------------------------------------- folders, CLI


def test_run_folder_stands_for_its_output_folder_and_predict_layout(tmp_path: Path) -> None:
    run = _semantic_run(tmp_path)
    outputs = find_outputs(run["out"] / "run", images=run["images"])
    assert outputs.output_dir == run["out"] and outputs.kind == "semantic"
    assert len(outputs.masks) == 3 and len(match_images(outputs)) == 3
    flat = tmp_path / "pred"
    flat.mkdir()
    for p in (run["out"] / "masks").glob("*.png"):
        shutil.copy(p, flat / p.name)
    save_png_atomic(flat / "overlays" / "skip.png", np.zeros((4, 4, 3), np.uint8))
    outputs = find_outputs(flat)
    assert outputs.masks_dir == flat and len(outputs.masks) == 3 and outputs.run_dir is None
    assert outputs.kind == "semantic"  # palette PNGs
    page = write_report(flat, images=run["images"], run=run["out"] / "run").read_text()
    assert "<td>backbone</td><td>fake</td>" in page  # `predict`: the run lives elsewhere
    assert page.count('<article class="card">') == 3
    with pytest.raises(UnsegError, match="not an unseg run folder"):
        find_outputs(flat, run=run["images"])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no masks here")
    with pytest.raises(UnsegError, match="neither masks"):
        find_outputs(notes)
    with pytest.raises(UnsegError, match="no such folder"):
        find_outputs(tmp_path / "absent")
    # a file was said not to exist
    with pytest.raises(UnsegError, match=r"readme.txt: a file, not a folder \(expected a run"):
        find_outputs(notes / "readme.txt")


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _semantic_run(tmp_path)
    target = tmp_path / "r" / "page.html"
    code = main(["report", str(run["out"]), "--images", str(run["images"]), "--gt",
                 str(run["gt"]), "--out", str(target), "--max-images", "2"])
    assert code == 0
    assert f"report written to {target}" in capsys.readouterr().out
    assert target.read_text().count('<article class="card">') == 2
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    for fmt in ("html", "coco"):
        assert main(["report", str(target), "--format", fmt]) == 2
        assert f"{target}: a file, not a folder" in capsys.readouterr().err


@pytest.mark.realdata
def test_report_on_real_ecssd_masks(shared_data, tmp_path: Path) -> None:
    ecssd = shared_data("ECSSD")
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    stems = sorted(p.stem for p in (ecssd / "ground_truth_mask").glob("*.png"))[:4]
    for s in stems:  # the ground truth itself as the prediction: a perfect score
        shutil.copy(ecssd / "ground_truth_mask" / f"{s}.png", out / "masks" / f"{s}.png")
    gt = tmp_path / "gt"
    gt.mkdir()
    for s in stems:
        (gt / f"{s}.png").symlink_to(ecssd / "ground_truth_mask" / f"{s}.png")
    page = write_report(out, images=ecssd, gt=gt).read_text()
    assert page.count('<article class="card">') == 4
    assert len(_tagged_uris(page, "image")) == 4
    assert '<td>IoU (p &gt; 0.5)</td><td class="num">100.0%</td>' in page


# ----------------------------------------------------------------------------- headless browser

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--enable-logging=stderr", "--v=0",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and we are root; else skip."""
    exe = shutil.which("chromium")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update && apt-get install -y chromium", shell=True,
                       capture_output=True, timeout=1200, check=False)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no headless browser: `chromium` is not installed and `apt-get install -y "
                    "chromium` was not possible here")
    return exe


def _browse(exe: str, page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_browser_detects_console_errors(chromium: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><script>console.error("boom"); nope();'
                   "</script></body></html>")
    proc = _browse(chromium, bad, tmp_path, "--dump-dom")
    messages = _console_messages(proc.stderr)
    assert any("boom" in m for m in messages) and any("nope" in m for m in messages)


def test_page_loads_in_chromium_and_screenshot_shows_gallery(
    chromium: str, tmp_path: Path
) -> None:
    run = _semantic_run(tmp_path, n=4, timings={"fit": 1.5})
    page = write_report(run["out"], images=run["images"], gt=run["gt"])
    dom = _browse(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == []
    assert dom.stdout.count('<article class="card">') == 4
    assert 'id="gallery"' in dom.stdout and 'id="metrics"' in dom.stdout
    shot = tmp_path / "shot.png"
    proc = _browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2600",
                   "--hide-scrollbars")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert pixels.reshape(-1, 3).std(axis=0).max() > 20  # not blank
    for color in QUADRANT_COLORS:  # the gallery's images are on screen
        close = (np.abs(pixels - color).max(axis=2) < 40).sum()
        assert close > 500, f"colour {color} of the gallery images not in the screenshot"


def test_class_balance_section_gives_each_clusters_share_and_warns_of_empty_ones(
    tmp_path: Path,
) -> None:
    run = _semantic_run(tmp_path, config={"num_classes": 4})  # cluster 3 is never predicted
    page = write_report(run["out"]).read_text()
    masks = [_load(p) for p in sorted((run["out"] / "masks").glob("*.png"))]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=4)
    section = page[page.index('<section id="balance">'):]
    section = section[: section.index("</section>")]
    for c, n in enumerate(counts):
        assert re.search(rf"cluster {c}</td><td class=\"num\">{100 * n / counts.sum():.1f}%</td>",
                         section)
    assert "1 of 4 classes hold under 2.50 %" in section and "3: 0.00 %" in section
    balanced = write_report(_semantic_run(tmp_path / "k3")["out"]).read_text()
    assert 'id="balance"' in balanced and "nearly empty" not in balanced


@pytest.mark.parametrize(("method", "kind"), [("found", "saliency"), ("saliency-head", "saliency"),
                                              ("kmeans", "semantic"),
                                              ("maskcontrast", "semantic")])
def test_the_kind_of_masks_is_the_registered_methods(tmp_path: Path, method: str,
                                                     kind: str) -> None:
    """The run's method decides the kind through the registry, not its name: a FOUND run's
    masks are saliency maps (its name has no "saliency"), MaskContrast's are class ids."""
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    mode = "L" if kind == "saliency" else "P"
    Image.new(mode, (8, 8)).save(out / "masks" / "a.png")
    save_run(out / "run", method, {}, {"w": torch.zeros(1)})
    assert find_outputs(out).kind == kind


def test_nested_saliency_outputs_show_their_boxes_and_their_own_scores(tmp_path: Path) -> None:
    """discover on category folders (cats/001, dogs/001): the gallery looked boxes up by stem
    while boxes.json keys them by path (no box was drawn), and ground truth nested the same
    way was not found (no per-image score)."""
    images, out, gt = tmp_path / "images", tmp_path / "out", tmp_path / "gt"
    boxes, want = {}, {}
    for i, folder in enumerate(("cats", "dogs")):
        save_png_atomic(images / folder / "001.png", QUADRANT_COLORS[_quadrants(i)])
        prob = np.zeros((H, W), dtype=np.uint8)
        prob[8:30, 10:40] = 220
        save_png_atomic(out / "masks" / folder / "001.png", prob)
        truth = np.zeros((H, W), dtype=np.uint8)
        truth[10:32, 12 + 10 * i : 40] = 255  # the two images score differently
        save_png_atomic(gt / folder / "001.png", truth)
        boxes[f"{folder}/001"] = [10.0, 8.0, 40.0, 30.0]
        p, g = prob >= 128, truth >= 128
        want[folder] = (p & g).sum() / (p | g).sum()
    write_json_atomic(out / "boxes.json", boxes)
    page = write_report(out, images=images, gt=gt).read_text()
    assert len(_tagged_uris(page, "mask and box")) == 2
    scores = re.findall(r"IoU (\d+\.\d)%", page)
    assert sorted(scores) == sorted(f"{100 * v:.1f}" for v in want.values())
    assert len(set(scores)) == 2


def test_gallery_never_shows_another_folders_image_for_a_repeated_name(tmp_path: Path) -> None:
    """Masks cats/001 and dogs/001 with --images a folder above the images (photos/images/
    cats/001.png): matched by stem, both cards showed the first 001 (the cat). Each now shows
    its own (the one image whose path ends with its key), and a name shared by several images
    that no key tells apart shows none rather than another's."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    for i, folder in enumerate(("cats", "dogs")):
        save_png_atomic(photos / "images" / folder / "001.png", QUADRANT_COLORS[_quadrants(i)])
        save_png_atomic(out / "masks" / folder / "001.png", np.full((H, W), 200, np.uint8))
    outputs = find_outputs(out, images=photos)
    assert match_images(outputs) == {
        f"{d}/001": photos / "images" / d / "001.png" for d in ("cats", "dogs")}
    page = write_report(out, images=photos).read_text()
    cards = dict(re.findall(r'<span class="name">([^<]+)</span>.*?<img src="([^"]+)" alt="image"',
                            page))
    assert len(cards) == 2 and cards["cats/001"] != cards["dogs/001"]
    # the same names twice more under the folder (a copy): which image is which is unknown
    shutil.copytree(photos / "images", photos / "copy")
    assert match_images(find_outputs(out, images=photos)) == {}
    # the folder the masks mirror: matched by relative path, a copy elsewhere notwithstanding
    assert match_images(find_outputs(out, images=photos / "images")) == {
        f"{d}/001": photos / "images" / d / "001.png" for d in ("cats", "dogs")}
