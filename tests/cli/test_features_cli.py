"""`unseg features` on two real images: its summary line, and exit 1 naming a broken file and
the backbone once an input fails (the second run takes the other two from the cache)."""

from __future__ import annotations

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
