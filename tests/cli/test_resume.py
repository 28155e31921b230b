"""``--resume`` after an interrupted command: the outputs of an uninterrupted run, to the byte,
and nothing half-written left behind.

The interrupts are simulated in-process where they land deterministically: a Ctrl-C raised by
the N-th cache write (the writer thread's error reaches the command as a real interrupt does), a
kill -9's leftovers (temporary files of atomic writes, a manifest entry still ``running`` for a
dead process) written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unseg.features
from unseg.cli.main import main
from unseg.layout import MANIFEST_FILE

BACKBONE = "efficientnet_lite0"
N_IMAGES = 10  # one shape: batches of 8 and 2


def _images(folder: Path) -> Path:
    """``N_IMAGES`` textured images of one size (one shape group, so a batch holds several)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        img = np.zeros((64, 96, 3), np.uint8)
        img[: 32 + 2 * i] = (40, 90, 200)
        img[32 + 2 * i :] = (60, 140, 50)
        img[20:44, 10 + 5 * i : 40 + 5 * i] = (200, 40, 40)
        img = np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
    return folder


def _fit(images: Path, out: Path, *extra: str) -> int:
    return main(["-q", "fit", "primaps-em", str(images), "--out", str(out), "-k", "3",
                 "--size", "64", "--steps", "12", "--backbone", BACKBONE, "--device", "cpu",
                 "--workers", "1", *extra])


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the manifest, by relative path; ``config.json`` without
    its seconds."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        data = path.read_bytes()
        if path.name == "config.json":
            config = json.loads(data)
            config.pop("timings", None)
            data = json.dumps(config, sort_keys=True).encode()
        found[rel] = data
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The images and the outputs of an uninterrupted ``fit``."""
    root = tmp_path_factory.mktemp("resume")
    images = _images(root / "images")
    assert _fit(images, root / "ref") == 0
    return images, _outputs(root / "ref")


def test_a_resume_after_an_interrupt_in_the_features_fits_the_same_run(
    reference, tmp_path, monkeypatch
):
    """Interrupted inside the first batch of features (5 of its 8 images cached), resumed: the
    batch is computed again as a whole (a backbone rounds differently in a smaller batch), so
    the features, the weights and every other file are the uninterrupted run's."""
    images, ref = reference
    real_save, writes = unseg.features.save_tensor, []

    def save_then_interrupt(path, name, tensor):
        if len(writes) == 4 * 5 + 1:  # features, flipped, student, image per image
            raise KeyboardInterrupt
        writes.append(path)
        real_save(path, name, tensor)

    with monkeypatch.context() as m:
        m.setattr(unseg.features, "save_tensor", save_then_interrupt)
        assert _fit(images, tmp_path / "out") == 130
    assert _fit(images, tmp_path / "out", "--resume") == 0
    got = _outputs(tmp_path / "out")
    assert sorted(got) == sorted(ref)
    assert [rel for rel in ref if got[rel] != ref[rel]] == []


def test_a_resume_after_a_kill_9_deletes_the_temporary_files_it_left(reference, tmp_path):
    """A kill -9 cannot remove the temporary file of the write it was in (unseg's, and the one
    safetensors writes inside it): ``--resume`` deletes them, and only them."""
    images, ref = reference
    out = tmp_path / "out"
    assert _fit(images, out) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    entry = manifest["commands"][-1]
    entry.update(status="running", pid=2**22 + 1, pid_start=None, files=entry["files"][:3])
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    cache = next((out / "cache" / "features").iterdir())
    left = [cache / ".0123abcd.safetensors.k2x_9qzw.tmp", cache / ".tmpAb12Cd",
            out / ".config.json.0a1b2c3d.tmp"]
    for path in left:
        path.write_bytes(b"half")
    kept = out / "notes.tmp"  # named .tmp, but no temporary file of unseg's: left alone
    kept.write_text("mine")
    assert _fit(images, out, "--resume") == 0
    assert [p for p in left if p.exists()] == [] and kept.read_text() == "mine"
    assert sorted(_outputs(out)) == sorted([*ref, "notes.tmp"])
    recorded = {f for c in json.loads((out / MANIFEST_FILE).read_text())["commands"]
                for f in c["files"]}
    assert not any(".tmp" in f for f in recorded - {"notes.tmp"})
