"""`unseg features` on two real images: its summary line, and exit 1 naming a broken file and
the backbone once an input fails (the second run takes the other two from the cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unseg.cli.main import main


@pytest.mark.realdata
def test_cli_features_summary_and_exit_code(shared_data, tmp_path, capsys):
    images = shared_data("ECSSD") / "images"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("0001.jpg", "0002.jpg"):
        (folder / name).write_bytes((images / name).read_bytes())
    args = ["-q", "features", str(folder), "--backbone", "efficientnet_lite0",
            "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(args) == 0
    assert "2 images: 2 computed, 0 from cache, 0 failed" in capsys.readouterr().out
    (folder / "broken.jpg").write_text("nope")
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "3 images: 0 computed, 2 from cache, 1 failed" in captured.out
    assert "broken.jpg" in captured.err and "efficientnet_lite0" in captured.err


@pytest.mark.parametrize(("fit", "features"), [
    (["segment", "--method", "kmeans", "-k", "2", "--refine", "none", "--size", "64"],
     ["--size", "64"]),
    (["fit", "saliency-head", "--epochs", "1", "--image-size", "64"],
     ["--kind", "keys", "--crop", "--size", "64"]),
])
def test_features_out_cache_features_is_what_cache_dir_reads(tmp_path, capsys, fit, features):
    """`--cache-dir C` keeps the features in `C/features` for every kind of run (saliency
    heads used `C` itself), so `unseg features --out C/features` with the same settings finds
    them all: one cache the commands share."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    cache = tmp_path / "cache"
    common = ["--backbone", "efficientnet_lite0"]
    n = 2 if fit[0] == "fit" else 1
    command, rest = fit[:n], fit[n:]
    code = main(["-q", *command, str(folder), "--out", str(tmp_path / "run"), *common,
                 "--cache-dir", str(cache), *rest])
    assert code in (0, 1)  # 1: a head trained one epoch on noise may be flagged as failed
    assert [p.name for p in cache.iterdir()] == ["features"]
    capsys.readouterr()
    assert main(["-q", "features", str(folder), "--out", str(cache / "features"), *common,
                 *features]) == 0
    assert "3 images: 0 computed, 3 from cache, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize(("option", "says"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    (["--workers", "-1"], "--workers must be at least 0 (0: load in the main process), got -1"),
])
@pytest.mark.usefixtures("registered_stand_in")
def test_batch_size_and_workers_out_of_range_are_refused(tmp_path, capsys, option, says):
    """They ended in tracebacks: range()'s ValueError, a missing cache file, torch's
    DataLoader ValueError."""
    images = Path(__file__).resolve().parents[2] / "examples" / "images"
    assert main(["-q", "features", str(images), "--out", str(tmp_path / "c"),
                 "--backbone", "stand_in16", "--size", "64", *option]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not list((tmp_path / "c").rglob("*.safetensors"))
