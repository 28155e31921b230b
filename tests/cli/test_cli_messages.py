"""What the commands say and leave: the manifest of segment, refusal / --resume / --overwrite of
a used --out, the report written at the end, completion lines, -v stage timings, progress bars
that count images."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unseg.cli.main import main
from unseg.layout import MANIFEST_FILE
from unseg.utils import progress as progress_module
from unseg.utils.timing import Timings, collect, log_totals

BACKBONE = "efficientnet_lite0"
FAST = ["--backbone", BACKBONE, "--size", "64", "--workers", "1", "--method", "kmeans",
        "--refine", "none", "--n-init", "2"]
REPO = Path(__file__).resolve().parents[2]


def _images(folder: Path, n: int) -> Path:
    """``n`` small photo-like images (sky, grass, an object)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        img = np.zeros((64, 80, 3), np.uint8)
        img[:32], img[32:] = (40, 90, 200), (60, 140, 50)
        img[20:44, 30 + 4 * i : 50 + 4 * i] = (200, 40, 40)
        noisy = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i}.png")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(images, output folder, stdout) of one ``unseg segment`` with 3 classes."""
    root = tmp_path_factory.mktemp("seg")
    images, out = _images(root / "images", 3), root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["-q", "segment", str(images), *FAST, "-k", "3", "--out", str(out)]) == 0
    return images, out, stdout.getvalue()


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(out, target)
    return target


def test_segment_records_exactly_the_files_it_wrote(segmented) -> None:
    images, out, stdout = segmented
    manifest = _manifest(out)
    (entry,) = manifest["commands"]
    on_disk = set(_files(out)) - {MANIFEST_FILE}
    assert set(entry["files"]) == on_disk
    assert {"masks/img0.png", "overlays/img2.jpg", "run/config.json", "report.html"} <= on_disk
    assert entry["command"] == "segment" and entry["status"] == "finished"
    assert entry["exit_code"] == 0 and entry["resumed"] is False
    assert entry["settings"]["images"] == str(images.resolve())
    assert entry["settings"]["--num-classes"] == 3 and entry["settings"]["--n-init"] == 2
    assert "backbone" in entry["timings"] and "fitting" in entry["timings"]
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"unseg segment: kmeans, 3 classes, 3 mask(s) written to {out}/masks")
    assert ", 0 input(s) failed, in " in line and line.endswith(f" s; report {out}/report.html")


def test_a_used_out_is_refused_and_left_as_it_was(segmented, tmp_path: Path, capsys) -> None:
    images, out, _ = segmented
    out = _copy(out, tmp_path)
    before = _files(out)
    assert main(["-q", "segment", str(images), *FAST, "-k", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"unseg: error: {out}: already holds the outputs of `unseg segment`" in err
    assert "--resume" in err and "--overwrite" in err and "--num-classes: 3 before, 4 now" in err
    assert _files(out) == before


def test_resume_continues_the_same_configuration_only(segmented, tmp_path: Path, capsys) -> None:
    images, out, _ = segmented
    out = _copy(out, tmp_path)
    masks = {k: v for k, v in _files(out).items() if k.startswith("masks/")}
    args = ["-q", "segment", str(images), *FAST, "--out", str(out), "--resume"]
    assert main([*args, "-k", "4", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues `unseg segment`" in err
    assert "--num-classes: 3 before, 4 now; --seed: 0 before, 1 now" in err
    assert main([*args, "-k", "3"]) == 0
    first, second = _manifest(out)["commands"]
    assert second["resumed"] is True and second["status"] == "finished"
    assert {k: v for k, v in _files(out).items() if k.startswith("masks/")} == masks
    assert set(first["files"]) | set(second["files"]) == set(_files(out)) - {MANIFEST_FILE}


def test_overwrite_clears_unseg_s_outputs_and_refuses_around_user_files(
    segmented, tmp_path: Path, capsys
) -> None:
    images, out, _ = segmented
    out = _copy(out, tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(images / "img1.png", one)
    args = ["-q", "segment", str(one), *FAST, "-k", "4", "--out", str(out), "--no-report"]
    (out / "masks" / "notes.txt").write_text("mine")
    before = _files(out)
    assert main([*args, "--overwrite"]) == 2
    assert "did not write; --overwrite deletes only the files unseg recorded" in (
        capsys.readouterr().err)
    assert _files(out) == before
    (out / "masks" / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["img1.png"]  # no stale masks
    assert not (out / "report.html").exists()
    (entry,) = _manifest(out)["commands"]
    assert entry["settings"]["--num-classes"] == 4
    assert set(entry["files"]) == set(_files(out)) - {MANIFEST_FILE}


def test_predict_and_discover_write_the_report(segmented, tmp_path: Path, capsys) -> None:
    images, out, _ = segmented
    pred, found = tmp_path / "pred", tmp_path / "found"
    assert main(["-q", "predict", str(out / "run"), str(images), "--out", str(pred)]) == 0
    assert main(["-q", "discover", str(images), "--backbone", BACKBONE, "--out", str(found)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(
        f"unseg predict: run {out / 'run'}, 3 mask(s) written to {pred}/masks,")
    assert lines[0].endswith(f"; report {pred}/report.html")
    assert lines[1].startswith("unseg discover: spectral, 3 mask(s) written to ")
    for folder in (pred, found):
        page = (folder / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and 'id="gallery"' in page
        assert "report.html" in _manifest(folder)["commands"][0]["files"]


def test_no_report_and_a_failing_report(segmented, tmp_path: Path, monkeypatch, caplog,
                                        capsys) -> None:
    images, out, _ = segmented
    run = str(out / "run")
    assert main(["-q", "predict", run, str(images), "--out", str(tmp_path / "a"),
                 "--no-report"]) == 0
    assert not (tmp_path / "a" / "report.html").exists()
    assert "; report" not in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr("unseg.cli.predict.write_report", broken)
    with caplog.at_level(logging.WARNING, logger="unseg.cli.common"):
        assert main(["-q", "predict", run, str(images), "--out", str(tmp_path / "b")]) == 0
    assert "report not written: matplotlib exploded" in caplog.text
    assert len(list((tmp_path / "b" / "masks").glob("*.png"))) == 3
    assert len(list((tmp_path / "b" / "overlays").glob("*.jpg"))) == 3  # as segment writes


def test_a_missing_gt_is_refused_before_any_work(segmented, tmp_path: Path, capsys) -> None:
    images, out, _ = segmented
    target = tmp_path / "p"
    assert main(["-q", "predict", str(out / "run"), str(images), "--out", str(target),
                 "--gt", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such ground-truth folder (--gt)" in capsys.readouterr().err
    assert not target.exists()


def test_fit_prints_its_completion_line_and_v_logs_stage_times(tmp_path: Path) -> None:
    images, run = _images(tmp_path / "images", 2), tmp_path / "run"
    argv = [sys.executable, "-m", "unseg.cli.main", "-v", "fit", "kmeans", str(images), "-k", "3",
            "--backbone", BACKBONE, "--size", "64", "--workers", "1", "--n-init", "2",
            "--out", str(run)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith(f"unseg fit kmeans: 3 classes, 2 image(s) fitted, run in {run}, "
                                "0 input(s) failed, in ")
    assert "INFO unseg.utils.timing: unseg fit kmeans: stage backbone took " in done.stderr
    assert "INFO unseg.utils.timing: unseg fit kmeans: stage fitting took " in done.stderr
    quiet = subprocess.run([*argv[:3], *argv[4:-1], str(tmp_path / "run2")],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr
    assert _manifest(run)["commands"][0]["command"] == "fit kmeans"


def test_timings_gather_every_stage_and_log_it(caplog) -> None:
    outer = Timings()
    with collect() as gathered:
        with caplog.at_level(logging.DEBUG, logger="unseg.utils.timing"), outer.stage("decode"):
            pass
        Timings().add("fitting", 2.0)
        Timings().add("fitting", 0.5)
    Timings().add("fitting", 9.0)  # after the command: not gathered
    assert set(gathered.as_dict()) == {"decode", "fitting"}
    assert gathered.as_dict()["fitting"] == 2.5 and outer.as_dict().keys() == {"decode"}
    assert "decode: 0.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unseg.utils.timing"):
        log_totals(gathered, "unseg test")
    assert [r.getMessage() for r in caplog.records][1] == "unseg test: stage fitting took 2.50 s"


class _FakeBar:
    """Stands in for tqdm: records its total, unit and updates."""

    def __init__(self, total=None, desc=None, unit="it", **kwargs) -> None:
        self.total, self.unit, self.updates = total, unit, []

    def update(self, n=1):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_chunked_progress_counts_images(monkeypatch) -> None:
    made: list[_FakeBar] = []
    monkeypatch.setattr(progress_module, "tqdm", lambda **kw: made.append(_FakeBar(**kw))
                        or made[-1])
    monkeypatch.setattr(progress_module, "_ENABLED", False)
    items = list(range(7))
    off = [list(c) for c in progress_module.chunked(items, 3, "predict")]
    assert off == [[0, 1, 2], [3, 4, 5], [6]] and made == []
    monkeypatch.setattr(progress_module, "_ENABLED", True)
    seen = []
    for chunk in progress_module.chunked(items, 3, "predict"):
        seen.append(list(chunk))
        assert sum(made[-1].updates) == sum(len(c) for c in seen[:-1])  # done ones
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    (bar,) = made
    assert bar.total == 7 and bar.unit == "img" and bar.updates == [3, 3, 1]
    with pytest.raises(ValueError, match="chunk size"):
        list(progress_module.chunked(items, 0))


def test_overwrite_never_deletes_the_run_that_predict_reads(
    segmented, tmp_path: Path, capsys
) -> None:
    images, out, _ = segmented
    out = _copy(out, tmp_path)
    before = _files(out)
    args = ["-q", "predict", str(out / "run"), str(images), "--out", str(out), "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite would delete" in err and "which this command reads" in err
    assert _files(out) == before  # the fitted run is still there


def test_an_out_under_a_file_is_a_usage_error(segmented, tmp_path: Path, capsys) -> None:
    images, out, _ = segmented
    (tmp_path / "afile").write_text("x")
    args = ["-q", "segment", str(images), *FAST, "-k", "3", "--out", str(tmp_path / "afile/o")]
    assert main(args) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["-q", "report", str(out), "--out", str(tmp_path / "afile/r.html")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["-q", "report", str(out), "--out", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
