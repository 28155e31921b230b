"""`unseg backbones`: lists the matching backbones with their default tap, where each one's
weights go, and exit 2 for a pattern that matches none."""

from __future__ import annotations

from unseg.backbones import get_spec
from unseg.cli.main import main


def test_cli_lists_backbones_and_the_default(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNSEG_HOME", str(tmp_path))
    assert main(["backbones", "dino_vit*"]) == 0
    out = capsys.readouterr().out
    assert "dino_vits8" in out and "dinov2" not in out.split("default")[0]
    assert "download" in out and str(tmp_path / "weights" / "dino_deitsmall8_pretrain.pth") in out
    assert f"efficientnet_lite2: DINO weights not found in {tmp_path / 'weights'}" in out
    assert "taps (dim/stride)" not in out  # ViTs have one tap
    assert main(["backbones", "efficientnet*"]) == 0
    out = capsys.readouterr().out
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        spec = get_spec(name)
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert row.split()[2:5] == [spec.default_tap, str(spec.stride), str(spec.dim)]
        taps = next(line for line in out.splitlines() if line.startswith(f"{name} taps"))
        d = spec.tap_info(spec.default_tap)
        assert f"{spec.default_tap} {d.dim}/{d.stride} (default)" in taps
        assert "head 1280/32" in taps
    assert main(["backbones", "nothing*"]) == 2
