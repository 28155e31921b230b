"""Feature extraction: sizes, batching, content-addressed cache, resuming, bad files, torchrun
(the `unseg features` command: tests/cli/test_features_cli.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unseg.backbones.base import Tap
from unseg.data.image import load_image
from unseg.data.resize import prepare_image, target_size
from unseg.errors import UnsegError
from unseg.features import FeatureSet, extract_features, load_cache
from unseg.utils import dist

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py, which the rank script imports
SIZES = [(40, 60), (60, 40), (40, 60), (50, 50), (33, 47), (40, 60)]


def make_images(root: Path, sizes=SIZES) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = root / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def test_target_size_hand_values():
    assert target_size(400, 267, 320, 16) == (480, 320)
    assert target_size(300, 400, 320, 14) == (322, 420)
    assert target_size(300, 400, 320, 14, crop=True) == (322, 322)
    assert target_size(10, 2000, 320, 8) == (320, 64000)
    assert target_size(3, 4, 2, 8) == (8, 8)  # never below one stride


def test_prepare_image_close_to_pil_and_crop_is_central(rng):
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    x = prepare_image(arr, 32, 8)
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    ref = np.asarray(Image.fromarray(arr).resize((48, 32), Image.BILINEAR), dtype=float)
    assert np.abs(x.permute(1, 2, 0).numpy() * 255 - ref).mean() < 1.0
    c = prepare_image(arr, 32, 8, crop=True)
    assert c.shape == (3, 32, 32)
    assert torch.allclose(c, x[:, :, 8:40], atol=1e-6)


def test_features_equal_direct_model_call(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    model = stand_in(8)
    fs = extract_features(paths, model, size=32, batch_size=4, num_workers=0)
    assert isinstance(fs, FeatureSet) and fs.paths == paths and len(fs) == len(paths)
    for p in paths:
        x = prepare_image(load_image(p), 32, 8)
        ref = model.forward_features(x[None])[0]
        assert torch.allclose(fs[p], ref, atol=1e-6)
        h, w = Image.open(p).size[::-1]
        assert fs.original_size(p) == (h, w)
        assert fs.image_size(p) == tuple(x.shape[1:])
        assert fs.shape_of(p) == (6, x.shape[1] // 8, x.shape[2] // 8) == tuple(fs[p].shape)
    assert fs.report.ok


def test_images_of_one_shape_share_batches(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    model = stand_in(8)
    extract_features(paths, model, size=32, batch_size=8, num_workers=0)
    shapes = {target_size(h, w, 32, 8) for h, w in SIZES}
    assert model.calls == len(shapes) and model.images == len(paths)
    model = stand_in(8)
    extract_features(paths, model, size=32, batch_size=2, num_workers=0)
    assert model.calls == 4  # three (40, 60) images → 2 batches, plus one per other shape


def test_second_run_computes_nothing(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    model = stand_in(8)
    first = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=2)
    assert model.images == len(paths) and first.stats["computed"] == len(paths)
    model.calls = model.images = 0
    second = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=2)
    assert model.calls == 0
    assert second.stats == {"images": 6, "computed": 0, "cached": 6, "failed": 0}
    for p in paths:
        assert torch.equal(first[p], second[p])
    index = json.loads(next((tmp_path / "c").glob("*/index.json")).read_text())
    assert set(index["images"]) == {str(p) for p in paths}
    assert index["backbone"] == "stand_in8" and index["size"] == 32
    reopened = load_cache(second.cache_dir)
    assert set(reopened.paths) == set(paths)
    for p in paths:
        assert reopened.record(p) == second.record(p) and torch.equal(reopened[p], first[p])


def test_cache_is_keyed_by_content_and_setting(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    cache = tmp_path / "c"
    model = stand_in(8)
    extract_features(paths, model, size=32, cache_dir=cache, num_workers=0)
    # same bytes under another name: a cache hit
    copy = tmp_path / "renamed.jpg"
    copy.write_bytes(paths[0].read_bytes())
    model.images = 0
    fs = extract_features([copy], model, size=32, cache_dir=cache, num_workers=0)
    assert model.images == 0 and fs.stats["cached"] == 1
    # another size, kind, dtype, crop, or other weights: computed again into its own folder
    for kw, m in [
        ({"size": 40}, model),
        ({"kind": "keys"}, model),
        ({"dtype": torch.float16}, model),
        ({"crop": True}, model),
        ({}, stand_in(8, seed=1)),
    ]:
        m.images = 0
        extract_features(paths[:1], m, **{"size": 32, **kw}, cache_dir=cache, num_workers=0)
        assert m.images == 1, kw
    assert len(list(cache.iterdir())) == 6


def test_in_memory_equals_cached_and_dtype(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    mem = extract_features(paths, stand_in(8), size=32, num_workers=0)
    half = extract_features(
        paths, stand_in(8), size=32, cache_dir=tmp_path / "c", dtype=torch.float16,
        num_workers=0,
    )
    for p in paths:
        assert half[p].dtype == torch.float16
        assert torch.allclose(half[p].float(), mem[p], atol=1e-2)
    keys = extract_features(paths, stand_in(8, negate_keys=True), size=32, kind="keys",
                            num_workers=0)
    assert torch.equal(keys[paths[0]], -mem[paths[0]])


def _broken(tmp_path: Path) -> dict[str, Path]:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = {
        "empty": tmp_path / "empty.jpg",
        "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "text.png",
        "missing": tmp_path / "missing.jpg",
    }
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["text"].write_text("not an image")
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_reported_and_skipped(stand_in, tmp_path, workers):
    paths = make_images(tmp_path / "im")
    bad = _broken(tmp_path)
    inputs = [paths[0], *bad.values(), *paths[1:]]
    fs = extract_features(inputs, stand_in(8), size=32, cache_dir=tmp_path / "c",
                          num_workers=workers)
    assert fs.paths == paths
    failed = dict(fs.report.failed)
    assert set(failed) == set(bad.values())
    assert "empty" in failed[bad["empty"]] and "no such file" in failed[bad["missing"]]
    assert "truncated" in failed[bad["truncated"]]
    assert fs.stats["failed"] == 4 and len(cache_files(tmp_path / "c")) == len(paths)


def test_interrupted_run_resumes_without_partial_files(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    cache = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, stand_in(8, fail_after=2), size=32, batch_size=1,
                         cache_dir=cache, num_workers=0)
    done = cache_files(cache)
    assert len(done) == 2
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".safetensors"] == []
    for f in done:
        assert load_file(f)["features"].shape[0] == 6  # whole, readable files (6 channels)
    model = stand_in(8)
    fs = extract_features(paths, model, size=32, batch_size=1, cache_dir=cache, num_workers=0)
    assert model.images == len(paths) - 2
    assert fs.stats["computed"] == len(paths) - 2 and fs.stats["cached"] == 2
    ref = extract_features(paths, stand_in(8), size=32, num_workers=0)
    for p in paths:
        assert torch.allclose(fs[p], ref[p], atol=1e-6)


def test_shard_is_a_partition():
    items = list(range(11))
    shards = [dist.shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and all(shards)
    assert dist.init_distributed() == (0, 1) and dist.is_main()
    with pytest.raises(ValueError):
        dist.shard(items, 3, 3)


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from conftest import StandInBackbone, stand_in_spec
from unseg.features import extract_features
from unseg.utils import dist
rank, world = dist.init_distributed()
model = StandInBackbone(stand_in_spec("stand_in8", 8)).requires_grad_(False).eval()
fs = extract_features(sys.argv[4:], model, size=32, batch_size=2, cache_dir=sys.argv[2],
                      num_workers=0)
result = {"rank": rank, "world": world, "images": model.images, "stats": fs.stats,
          "failed": [str(p) for p, _ in fs.report.failed]}
with open(f"{sys.argv[3]}/result-{rank}.json", "w") as f:
    json.dump(result, f)
dist.cleanup()
"""


def test_two_processes_equal_one(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")
    bad = _broken(tmp_path)["truncated"]
    inputs = [*paths, bad]
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(TESTS), str(tmp_path / "two"), str(tmp_path), *map(str, inputs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one file per rank: the ranks share stdout, where their lines can interleave
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world"] for r in results} == {2}
    assert all(r["images"] > 0 for r in results)  # the work was split
    assert sum(r["images"] for r in results) == len(paths)
    assert all(r["stats"] == results[0]["stats"] for r in results)
    assert all(r["failed"] == [str(bad)] for r in results)

    one = extract_features(inputs, stand_in(8), size=32, batch_size=2,
                           cache_dir=tmp_path / "one", num_workers=0)
    assert one.stats == results[0]["stats"]
    files_one = cache_files(tmp_path / "one")
    files_two = cache_files(tmp_path / "two")
    assert [f.relative_to(tmp_path / "one") for f in files_one] == [
        f.relative_to(tmp_path / "two") for f in files_two
    ]
    for a, b in zip(files_one, files_two, strict=True):
        assert torch.allclose(load_file(a)["features"], load_file(b)["features"], atol=1e-6)
    idx_one = json.loads(next((tmp_path / "one").glob("*/index.json")).read_text())
    idx_two = json.loads(next((tmp_path / "two").glob("*/index.json")).read_text())
    assert idx_one == idx_two


@pytest.mark.realdata
def test_efficientnet_lite0_on_real_images(shared_data, tmp_path):
    from unseg.backbones import create_backbone

    images = shared_data("ECSSD") / "images"
    paths = [images / "0001.jpg", images / "0002.jpg"]
    model = create_backbone("efficientnet_lite0", device="cpu")
    fs = extract_features(paths, model, size=320, cache_dir=tmp_path / "c", num_workers=0)
    for p in paths:
        h, w = fs.image_size(p)
        s = model.stride  # the default tap's
        assert min(h, w) == 320 and h % s == 0 and w % s == 0
        assert fs[p].shape == (model.dim, h // s, w // s) and torch.isfinite(fs[p]).all()
    again = extract_features(paths, model, size=320, cache_dir=tmp_path / "c", num_workers=0)
    assert again.stats["computed"] == 0


def test_extras_are_computed_in_the_same_pass(stand_in, tmp_path):
    """Flipped features, the resized image and the student view's features: each equal to a
    direct computation, from one forward per batch, each image decoded once."""
    from unseg.data.resize import resize_image
    from unseg.data.transforms import student_view

    paths = make_images(tmp_path / "im")
    model = stand_in(8)
    fs = extract_features(paths, model, size=32, batch_size=8, num_workers=0,
                          extras=("flipped", "image", "student"), student_seed=3)
    shapes = {target_size(h, w, 32, 8) for h, w in SIZES}
    assert model.calls == len(shapes) and model.images == 3 * len(paths)
    for p in paths:
        image = resize_image(load_image(p), 32, 8)
        assert torch.equal(fs.extra(p, "image"), image)
        x = image.float() / 255
        flipped = model.forward_features(x.flip(-1)[None])[0].flip(-1)
        assert torch.allclose(fs.extra(p, "flipped"), flipped, atol=1e-6)
        sha = fs.record(p).sha256
        gen = torch.Generator().manual_seed(3 * 1_000_003 + int(sha[:12], 16))
        student = model.forward_features(student_view(x, gen)[None])[0]
        assert torch.allclose(fs.extra(p, "student"), student, atol=1e-5)


def test_extras_are_cached_and_a_missing_one_is_computed(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")[:2]
    model = stand_in(8)
    first = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0,
                             extras=("flipped",))
    names = sorted(p.name.split(".", 1)[1] for p in cache_files(tmp_path / "c"))
    assert names == ["flipped.safetensors"] * 2 + ["safetensors"] * 2
    model.images = 0
    again = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0,
                             extras=("flipped",))
    assert model.images == 0
    for p in paths:
        assert torch.equal(again.extra(p, "flipped"), first.extra(p, "flipped"))
    seeded = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0,
                              extras=("flipped", "student"), student_seed=1)
    assert model.images == len(paths)  # only the missing student views went through the model
    fresh = extract_features(paths, stand_in(8), size=32, num_workers=0,
                             extras=("flipped", "student"), student_seed=1)
    for p in paths:
        assert torch.allclose(seeded.extra(p, "student"), fresh.extra(p, "student"), atol=1e-6)
        assert torch.equal(seeded[p], first[p])
    with pytest.raises(KeyError, match="no 'image' computed"):
        again.extra(paths[0], "image")
    with pytest.raises(UnsegError, match="unknown feature extras"):
        extract_features(paths, model, size=32, extras=("depth",))
    model.images = 0
    extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0,
                     extras=("flipped", "image"))
    assert model.images == 0  # the resized image needs no forward
    assert len(list(seeded.cache_dir.glob("*.image.safetensors"))) == len(paths)


def test_the_tap_is_part_of_the_cache_key(stand_in, tmp_path):
    paths = make_images(tmp_path / "im")[:1]
    model = stand_in(8)
    model.spec = dataclasses.replace(
        model.spec, taps=(("last", Tap(6, 8)), ("stage4", Tap(6, 8))), default_tap="last"
    )
    a = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0)
    model.tap = "stage4"  # another tap of the same weights
    b = extract_features(paths, model, size=32, cache_dir=tmp_path / "c", num_workers=0)
    assert a.cache_dir != b.cache_dir and b.stats["computed"] == 1
    assert json.loads((b.cache_dir / "index.json").read_text())["tap"] == "stage4"


def test_the_progress_bar_counts_images_good_and_bad(stand_in, tmp_path, monkeypatch):
    """The extraction's bar advances by images (a batch's good and bad ones), not by batches."""
    from contextlib import contextmanager

    import unseg.features as features

    bars: list[tuple[int, list[int]]] = []

    class Recorder:
        def update(self, n: int = 1) -> None:
            bars[-1][1].append(n)

    @contextmanager
    def recording_bar(total, desc=None, unit="img", show=True):
        bars.append((total, []))
        yield Recorder()

    monkeypatch.setattr(features, "progress_bar", recording_bar)
    paths = make_images(tmp_path / "im")
    truncated = _broken(tmp_path)["truncated"]
    extract_features([*paths, truncated], stand_in(8), size=32, batch_size=2, num_workers=0)
    assert len(bars) == 1
    total, updates = bars[0]
    assert total == len(paths) + 1 and sum(updates) == total and max(updates) <= 2



def test_a_later_run_removes_the_stale_temp_files_of_a_killed_one(stand_in, tmp_path):
    """A run killed mid-write (SIGKILL) left its temp files (``.<file>.<random>.tmp``) in the
    cache folder, and no later run (``--resume`` included) removed them. Now the next run on
    the folder removes the store's own that no one has touched for an hour; a recent one (a
    writer sharing the cache), files of another pattern and links stay."""
    import tempfile
    import time

    from unseg.feature_store import STALE_TEMP_SECONDS, TEMP_FILE, remove_stale_temps
    from unseg.utils.io import atomic_path

    paths = make_images(tmp_path / "im")[:2]
    cache = tmp_path / "c"
    extract_features(paths, stand_in(8), size=32, cache_dir=cache, num_workers=0)
    folder = next(cache.iterdir())

    def killed(name: str) -> Path:
        """The temp file a writer of ``name`` killed mid-write leaves (atomic_path's name)."""
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.write(fd, b"partial")
        os.close(fd)
        return Path(tmp)

    sha = "ab" * 32
    with atomic_path(folder / f"{sha}.safetensors") as tmp:  # the pattern is atomic_path's
        assert TEMP_FILE.fullmatch(tmp.name)
    left = [killed(f"{sha}{end}.safetensors") for end in ("", ".image", ".student-0")]
    left.append(killed("index.json"))
    fresh = killed(f"{sha}.flipped.safetensors")  # a live writer's
    foreign = [killed("notes.txt"), killed(f"{'cd' * 32}.pt"), folder / "keep.tmp",
               folder / f"{sha}.safetensors.abcdefgh.tmp"]
    foreign[2].write_bytes(b"x")
    foreign[3].write_bytes(b"x")
    link = folder / f".{'ef' * 32}.safetensors.abcdefgh.tmp"
    link.symlink_to(paths[0])
    old = time.time() - STALE_TEMP_SECONDS - 60
    for f in [*left, *foreign, link]:
        os.utime(f, (old, old), follow_symlinks=False)
    extract_features(paths, stand_in(8), size=32, cache_dir=cache, num_workers=0)  # all cached
    assert not any(f.exists() for f in left)
    assert fresh.exists() and all(f.exists() for f in foreign) and link.is_symlink()
    assert remove_stale_temps(folder) == [] and remove_stale_temps(tmp_path / "none") == []
    assert remove_stale_temps(folder, older_than=0) == [fresh]
