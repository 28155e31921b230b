"""unseg.Segmenter: the masks the commands write, from images in memory, for every kind of method.

Real images (a few VOC2012 / ECSSD ones at a small working size on efficientnet_lite0, to keep
the CPU low): ``Segmenter(...).fit_predict`` equals ``unseg segment`` / ``unseg discover``'s
PNGs byte for byte; save → load → predict equals predict; paths, PIL images, arrays and a folder
give the same masks; bad inputs give errors that name them.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unseg
from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.registry import list_methods

BACKBONE = "efficientnet_lite0"
SMALL = 64  # the working short side of these tests


def _copy(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def voc(shared_data, tmp_path: Path) -> Path:
    jpegs = shared_data("VOC2012") / "VOCdevkit" / "VOC2012" / "JPEGImages"
    return _copy(sorted(jpegs.glob("*.jpg"))[:3], tmp_path / "voc")


@pytest.fixture
def ecssd(shared_data, tmp_path: Path) -> Path:
    images = shared_data("ECSSD") / "images"
    return _copy(sorted(images.glob("*.jpg"))[:3], tmp_path / "ecssd")


def _pngs(out: Path, images: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(out / "masks" / f"{p.stem}.png"))
            for p in sorted(images.glob("*.jpg"))]


def _equal(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.uint8 and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


SEMANTIC = {
    "kmeans": ([], {}),
    "primaps-em": (["--steps", "6"], {"steps": 6}),
}


@pytest.mark.parametrize("method", sorted(SEMANTIC))
def test_fit_predict_equals_unseg_segment(method: str, voc: Path, tmp_path: Path) -> None:
    flags, options = SEMANTIC[method]
    out = tmp_path / "out"
    code = main(["segment", str(voc), "--out", str(out), "--method", method, "-k", "3",
                 "--backbone", BACKBONE, "--size", str(SMALL), "--no-report", *flags])
    assert code == 0
    seg = unseg.Segmenter(method, num_classes=3, backbone=BACKBONE, size=SMALL, **options)
    masks = seg.fit_predict(voc)
    _equal(masks, _pngs(out, voc))
    assert max(int(m.max()) for m in masks) < 3
    # the soft maps: class probabilities at each image's size whose argmax is the mask (up to
    # ties of the tiled upsampling)
    for proba, mask in zip(seg.predict_proba(voc), masks, strict=True):
        assert proba.dtype == np.float32 and proba.shape == (3, *mask.shape)
        np.testing.assert_allclose(proba.sum(0), 1.0, atol=1e-4)
        assert (proba.argmax(0) == mask).mean() > 0.99
    # the run it saves is the one `unseg predict` reads, both ways
    seg.save(tmp_path / "run")
    again = unseg.Segmenter.load(tmp_path / "run").predict(voc)
    _equal(again, seg.predict(voc))
    assert main(["predict", str(tmp_path / "run"), str(voc), "--out", str(tmp_path / "p"),
                 "--no-report"]) == 0
    _equal(again, _pngs(tmp_path / "p", voc))
    loaded = unseg.Segmenter.load(out / "run")  # and the CLI's run loads in Python
    assert loaded.num_classes == 3 and loaded.output == "semantic"


SALIENCY = {
    "spectral": ([], {}),
    "saliency-head": (["--epochs", "2", "--size", str(SMALL), "--batch-size", "3"],
                      {"epochs": 2, "image_size": SMALL, "batch_size": 3}),
}


@pytest.mark.parametrize("method", sorted(SALIENCY))
def test_fit_predict_equals_unseg_discover(method: str, ecssd: Path, tmp_path: Path) -> None:
    flags, options = SALIENCY[method]
    out = tmp_path / "out"
    code = main(["discover", str(ecssd), "--out", str(out), "--method", method,
                 "--backbone", BACKBONE, "--no-report", *flags])
    assert code == 0
    seg = unseg.Segmenter(method, backbone=BACKBONE, **options)
    masks = seg.fit_predict(ecssd)
    _equal(masks, _pngs(out, ecssd))
    boxes = json.loads((out / "boxes.json").read_text())
    want = [boxes[p.stem] for p in sorted(ecssd.glob("*.jpg"))]
    assert seg.predict_boxes(ecssd) == want
    proba = seg.predict_proba(ecssd)
    assert all(p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1 for p in proba)
    if method == "spectral":
        with pytest.raises(UnsegError, match="training-free"):
            seg.save(tmp_path / "run")
        return
    seg.save(tmp_path / "run")
    _equal(unseg.Segmenter.load(tmp_path / "run").predict(ecssd), masks)


def test_paths_pil_images_arrays_and_a_folder_give_the_same_masks(voc: Path,
                                                                  tmp_path: Path) -> None:
    """PNG copies (lossless; a JPEG path is decoded at a reduced DCT scale when it is much
    larger than the working size, an array is not, see unseg.segmenter)."""
    folder = tmp_path / "png"
    folder.mkdir()
    arrays = []
    for f in sorted(voc.glob("*.jpg")):
        arr = np.asarray(Image.open(f).convert("RGB"))
        Image.fromarray(arr).save(folder / f"{f.stem}.png")
        arrays.append(arr)
    paths = sorted(folder.glob("*.png"))
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL, refine="none")
    want = seg.fit_predict(folder)
    _equal(seg.predict([str(p) for p in paths]), seg.predict(folder))
    for images in (paths, [Image.open(p) for p in paths], arrays, [paths[0], arrays[1],
                                                                     Image.open(paths[2])]):
        fresh = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL,
                                refine="none")
        _equal(fresh.fit_predict(images), want)
    probs = seg.predict_proba(arrays)
    assert [p.shape for p in probs] == [(3, *a.shape[:2]) for a in arrays]
    agree = np.mean([(p.argmax(0) == m).mean() for p, m in zip(probs, want, strict=True)])
    assert agree > 0.999  # the argmax of the soft maps is the labels (up to exact ties)


def test_bad_inputs_and_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnsegError, match="kmeans has no option 'epochs'"):
        unseg.Segmenter("kmeans", epochs=3)
    with pytest.raises(UnsegError, match="--num-classes must be at least 2"):
        unseg.Segmenter("kmeans", num_classes=1)
    with pytest.raises(UnsegError, match="unknown method 'kmean'"):
        unseg.Segmenter("kmean")
    with pytest.raises(UnsegError, match="saliency method: it has no num_classes"):
        unseg.Segmenter("spectral", num_classes=3)
    with pytest.raises(UnsegError, match="epochs: a head's training option, and spectral"):
        unseg.Segmenter("spectral", epochs=3)
    assert not unseg.Segmenter("spectral", guided_filter=False, image_size=160).config.guided_filter
    with pytest.raises(UnsegError, match="refine"):
        unseg.Segmenter("kmeans", backbone=BACKBONE, refine="bilateral")
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL)
    with pytest.raises(UnsegError, match="not fitted"):
        seg.predict([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(UnsegError, match=r"images\[1\]: expected an H×W×3 uint8 array"):
        seg.fit([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(UnsegError, match=r"images\[0\]: expected an H×W×3 uint8 array.*"
                                         r"float32 of shape \(64, 64, 3\) \(a float image"):
        seg.fit([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(UnsegError, match=r"images\[0\]: expected .*shape \(64, 64, 2\)"):
        seg.fit([np.zeros((64, 64, 2), np.uint8)])
    with pytest.raises(UnsegError, match="no such file"):
        seg.fit([tmp_path / "absent.jpg"])
    with pytest.raises(UnsegError, match="smaller than one 32-pixel patch"):
        seg.fit([np.zeros((8, 8, 3), np.uint8)])
    tiny, strip = tmp_path / "tiny.png", tmp_path / "strip.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiny)
    Image.fromarray(np.zeros((4, 400, 3), np.uint8)).save(strip)
    for path, size in ((tiny, "8x8"), (strip, "400x4")):  # as the commands refuse them
        with pytest.raises(UnsegError, match=f"{path}: image {size} is smaller than one 32-pixel"):
            seg.fit([path])
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        jpeg, "JPEG")
    truncated = Image.open(io.BytesIO(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]))
    with pytest.raises(UnsegError, match=r"images\[0\]: corrupt or truncated image \(image file"):
        seg.fit([truncated])  # not an EXIF problem
    with pytest.raises(UnsegError, match="the list is empty"):
        seg.fit([])
    with pytest.raises(UnsegError, match="expected a path, a PIL image"):
        seg.fit([3])
    with pytest.raises(UnsegError, match="boxes come from saliency methods"):
        seg.predict_boxes([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(UnsegError, match="maskcontrast is an embedding method; boxes come"):
        unseg.Segmenter("maskcontrast", backbone=BACKBONE).predict_boxes(
            [np.zeros((64, 64, 3), np.uint8)])


@pytest.mark.parametrize("method", ["kmeans", "primaps-em", "maskcontrast"])
def test_size_and_max_side_are_checked_with_the_commands_messages(method: str) -> None:
    """`unseg segment --size 7` is refused; the Segmenter took it and failed later on an
    unrelated message (or not at all)."""
    with pytest.raises(UnsegError, match="--size 7: must be 64 to 2048 with efficientnet_lite0"):
        unseg.Segmenter(method, backbone=BACKBONE, size=7)
    with pytest.raises(UnsegError, match=r"--max-side 10: must be 0 \(no limit\)"):
        unseg.Segmenter(method, backbone=BACKBONE, max_side=10)


@pytest.mark.parametrize("method", ["spectral", "saliency-head", "found"])
def test_size_of_a_saliency_method_points_to_image_size(method: str) -> None:
    """Segmenter("spectral", size=256) called size "a head's training option" (the others:
    "has no option 'size'"); a saliency method's working size is image_size, --size's field."""
    with pytest.raises(UnsegError, match=rf"{method} has no option 'size': a saliency method's "
                                         rf"working size is its option image_size \(Segmenter\("
                                         rf"'{method}', image_size=256\)"):
        unseg.Segmenter(method, backbone=BACKBONE, size=256)
    assert unseg.Segmenter(method, backbone=BACKBONE, image_size=256).config.image_size == 256


def test_a_loaded_segmenter_refuses_to_fit_with_a_message(tmp_path: Path) -> None:
    """Segmenter.load(run).fit(images) died on `assert pool is not None`."""
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1)
    loaded = unseg.Segmenter.load(seg.fit([image]).save(tmp_path / "run"))
    with pytest.raises(UnsegError, match=r"loaded from the run .*run: it predicts"):
        loaded.fit([image])
    with pytest.raises(UnsegError, match="it predicts"):
        loaded.fit_predict([image])
    np.testing.assert_array_equal(loaded.predict([image])[0], seg.predict([image])[0])


def test_load_refuses_options_it_does_not_use(tmp_path: Path) -> None:
    """Segmenter.load(run, foo=1) ignored foo silently, as it did an option of another kind
    of run (guided_filter for a k-means run)."""
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    run = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit([image]).save(tmp_path / "run")
    with pytest.raises(UnsegError, match=r"Segmenter.load has no option 'foo'; it takes "
                                         r"device, refine, weights, max_pixels, workers, "):
        unseg.Segmenter.load(run, foo=1)
    with pytest.raises(UnsegError, match=r"--guided-filter applies to saliency runs only, and "
                                         r".*run is a kmeans run"):
        unseg.Segmenter.load(run, guided_filter=True)
    assert unseg.Segmenter.load(run, refine="crf", workers=1).options == {
        "refine": "crf", "workers": 1}


@pytest.mark.parametrize(("bad", "expected"), [
    ({"refine": 3}, "a string or None"), ({"max_pixels": "x"}, "an integer or None"),
    ({"max_pixels": 1.5}, "an integer or None"), ({"workers": "2"}, "an integer or None"),
    ({"guided_filter": "yes"}, "True or False or None"), ({"dense_crf": 1}, "True or False"),
    ({"guide": "rgb"}, "'mean' or 'luma' or None"), ({"max_side": "x"}, "an integer or None"),
    ({"num_classes": 2.5}, "an integer or None"), ({"seed": "1"}, "an integer or None"),
    ({"clusters": 3}, "a string or None"), ({"weights": 3}, "a path"),
    ({"device": 3}, "a string"),
])
def test_load_refuses_an_option_of_the_wrong_type_naming_it(bad: dict, expected: str,
                                                             tmp_path: Path) -> None:
    """Segmenter.load checked its options' names, not their types: refine=3 failed on
    "unknown refinement", num_classes=2.5 became 2 classes, seed="1" was taken; a wrong type
    is refused as the constructor refuses it, before the run is read."""
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    run = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit([image]).save(tmp_path / "run")
    name, value = next(iter(bad.items()))
    with pytest.raises(UnsegError, match=rf"^{name}: expected {expected}.*, got {value!r}$"):
        unseg.Segmenter.load(run, **bad)


@pytest.mark.parametrize("bad", [{"num_classes": 2.5}, {"num_classes": "5"}, {"seed": "a"},
                                 {"seed": 1.5}, {"num_classes": True}])
def test_num_classes_and_seed_must_be_integers(bad: dict) -> None:
    """num_classes=2.5 silently became 2 classes; seed='a' died in seed_everything."""
    name, value = next(iter(bad.items()))
    with pytest.raises(UnsegError, match=f"{name}: expected an integer, got {value!r}"):
        unseg.Segmenter("kmeans", backbone=BACKBONE, **bad)


@pytest.mark.parametrize(("method", "bad", "expected"), [
    ("kmeans", {"size": "320"}, "an integer"), ("kmeans", {"size": 320.5}, "an integer"),
    ("kmeans", {"size": True}, "an integer"), ("kmeans", {"refine": 3}, "a string"),
    ("kmeans", {"max_side": "x"}, "an integer or None"),
    ("kmeans", {"max_pixels": 1.5}, "an integer or None"),
    ("kmeans", {"workers": "2"}, "an integer or None"),
    ("kmeans", {"label_factor": 2.0}, "an integer"), ("kmeans", {"backbone": 3}, "a string"),
    ("kmeans", {"tap": 3}, "a string or None"), ("kmeans", {"weights": 3}, "a path"),
    ("kmeans", {"cache_dir": 3}, "a path"), ("kmeans", {"embeddings": 3}, "a path"),
    ("kmeans", {"device": 3}, "a string"), ("found", {"max_side": 2.5}, "an integer"),
    ("maskcontrast", {"discover": 3}, "a string"), ("maskcontrast", {"saliency": 3}, "a path"),
])
def test_a_setting_of_the_wrong_type_is_refused_naming_it(method: str, bad: dict,
                                                          expected: str) -> None:
    """size="320" and max_side="x" died on "'<=' not supported", tap=3 on "'int' object has
    no attribute 'split'", refine=3 was "unknown refinement 3"; size=320.5, max_pixels=1.5,
    device=3 (torch: cuda:3) and weights=3 were taken."""
    name, value = next(iter(bad.items()))
    with pytest.raises(UnsegError, match=rf"^{name}: expected {expected}.*, got {value!r}$"):
        unseg.Segmenter(method, **{"backbone": BACKBONE, **bad})


def test_path_settings_take_a_path_object(tmp_path: Path) -> None:
    seg = unseg.Segmenter("kmeans", backbone=BACKBONE, cache_dir=tmp_path, weights=None)
    assert seg.get_params()["cache_dir"] is tmp_path


def test_a_config_option_of_the_wrong_type_is_refused_at_construction() -> None:
    """Segmenter("kmeans", n_init="x").fit(...) died in kmeans.py with "'str' object cannot
    be interpreted as an integer"."""
    with pytest.raises(UnsegError, match="n_init: expected an integer, got 'x'"):
        unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, n_init="x")


def test_clone_and_set_params_follow_scikit_learns_convention() -> None:
    """``sklearn.base.clone`` makes an unfitted copy with the same arguments (it checks that
    ``get_params`` gives back the very objects passed); ``set_params`` re-checks and unfits."""
    from sklearn.base import clone

    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit([image])
    copy = clone(seg)
    assert copy is not seg and not copy.fitted and seg.fitted
    assert copy.get_params() == seg.get_params() == {
        "method": "kmeans", "num_classes": 2, "backbone": BACKBONE, "seed": 0, "device": None,
        "size": SMALL, "refine": "none", "n_init": 1}
    np.testing.assert_array_equal(copy.fit_predict([image])[0], seg.predict([image])[0])
    assert seg.set_params(num_classes=3, n_init=2) is seg and not seg.fitted
    assert seg.config.num_classes == 3 and seg.config.n_init == 2
    with pytest.raises(UnsegError, match="n_init: expected an integer"):
        seg.set_params(num_classes=4, n_init="x")
    assert seg.get_params()["num_classes"] == 3 and seg.config.num_classes == 3


@pytest.mark.parametrize(("method", "options", "recorded"), [
    ("kmeans", {"num_classes": 2, "size": SMALL, "refine": "none", "n_init": 1, "seed": 4},
     {"size": SMALL, "max_side": 4 * SMALL, "refine": "none", "n_init": 1, "seed": 4}),
    ("found", {"image_size": SMALL, "steps": 3, "ensemble": 1, "seed": 3,
               "guided.radius": 4},
     {"image_size": SMALL, "steps": 3, "ensemble": 1, "seed": 3, "guided.radius": 4}),
])
def test_clone_of_a_loaded_segmenter_is_configured_like_its_run(
        method: str, options: dict, recorded: dict, tmp_path: Path) -> None:
    """clone(Segmenter.load(run)) was a default Segmenter(method): the run's size, refinement,
    config and seed were lost. get_params of a loaded segmenter now gives the run's."""
    from sklearn.base import clone

    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    seg = unseg.Segmenter(method, backbone=BACKBONE, **options)
    loaded = unseg.Segmenter.load(seg.fit([image]).save(tmp_path / "run"))
    params = loaded.get_params()
    assert {k: params[k] for k in recorded} == recorded
    copy = clone(loaded)
    assert not copy.fitted and copy.config == seg.config
    assert copy._kind.settings == replace(seg._kind.settings, tap=params["tap"])  # named
    np.testing.assert_array_equal(copy.fit_predict([image])[0], loaded.predict([image])[0])
    again = unseg.Segmenter.load(tmp_path / "run")
    assert again.set_params(seed=5) is again and not again.fitted
    assert again.config == replace(seg.config, seed=5)
    again.fit([image])  # no longer the run's: it fits


def test_a_loaded_segmenters_seed_is_the_runs_as_get_params_gives_it(tmp_path: Path) -> None:
    """Segmenter.load(run).seed was 0 while get_params() gave the run's seed (4 here)."""
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    run = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1, seed=4).fit([image]).save(tmp_path / "run")
    loaded = unseg.Segmenter.load(run)
    assert loaded.seed == loaded.get_params()["seed"] == 4
    assert "seed=4" in repr(loaded)


def _disks(n: int = 3) -> list[np.ndarray]:
    """The ground truth of :func:`_scenes`: each scene's disk ``[64, 96]`` (uint8, 1 inside)."""
    yy, xx = np.mgrid[:64, :96]
    return [((yy - 32) ** 2 + (xx - 30 - 15 * i) ** 2 < 18 ** 2).astype(np.uint8)
            for i in range(n)]


def _scenes(n: int = 3) -> list[np.ndarray]:
    """``n`` small photos-like arrays: a coloured disk on a textured background."""
    rng = np.random.default_rng(1)
    out = []
    for disk in _disks(n):
        image = rng.integers(20, 90, (64, 96, 3), dtype=np.uint8)
        image[disk.astype(bool)] = rng.integers(150, 255, 3, dtype=np.uint8)
        out.append(image)
    return out


@pytest.mark.parametrize(("method", "options"), [
    ("kmeans", {"num_classes": 3, "size": SMALL, "refine": "none", "n_init": 1}),
    ("primaps-em", {"num_classes": 3, "size": SMALL, "steps": 4, "refine": "none",
                    "pseudo_refine": "none"}),
    ("found", {"image_size": SMALL, "steps": 3, "ensemble": 1}),
    ("spectral", {"image_size": SMALL}),
])
def test_a_segmenter_pickles_fitted_or_not(method: str, options: dict, tmp_path: Path) -> None:
    """pickle.dumps(Segmenter(...)) raised TypeError (a lock in its timings, a head's local
    functions): joblib.dump and copy.deepcopy failed too. Its state is now its arguments and,
    fitted, the run save writes; unpickled, it predicts as the original and fits anew."""
    images = _scenes()
    seg = unseg.Segmenter(method, backbone=BACKBONE, **options)
    fresh = pickle.loads(pickle.dumps(seg))
    assert not fresh.fitted and fresh.get_params() == seg.get_params()
    masks = seg.fit_predict(images)
    data = pickle.dumps(seg)
    assert len(data) < 200_000  # the backbone's weights (13 MB) are not in it
    again = pickle.loads(data)
    assert again.fitted and again.get_params() == seg.get_params()
    _equal(again.predict(images), masks)
    if seg.output == "semantic":
        for a, b in zip(again.predict_proba(images), seg.predict_proba(images), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    twice = pickle.loads(pickle.dumps(again))  # an unpickled one pickles again (its run)
    _equal(twice.predict(images), masks)
    again.fit(images[:2])  # not a loaded run's segmenter: it fits, as the constructor's would
    _equal(again.predict(images), unseg.Segmenter(method, backbone=BACKBONE, **options)
           .fit(images[:2]).predict(images))
    if method == "spectral":
        return
    loaded = unseg.Segmenter.load(seg.save(tmp_path / "run"))
    # a loaded run saves as it was (a semantic one failed an assert, then wrote feature_size
    # None), and so does an unpickled segmenter
    def recorded(run: Path) -> dict:  # what the run says, but the seconds of its stages
        return {k: v for k, v in json.loads((run / "config.json").read_text()).items()
                if k != "timings"}

    for source, where in ((loaded, "again"), (twice, "twice")):
        assert recorded(source.save(tmp_path / where)) == recorded(tmp_path / "run")
        _equal(unseg.Segmenter.load(tmp_path / where).predict(images), masks)
    copied = copy.deepcopy(loaded)
    shutil.rmtree(tmp_path / "run")  # the copy keeps nothing in the run folder
    assert copied.get_params() == loaded.get_params()
    _equal(copied.predict(images), masks)
    with pytest.raises(UnsegError, match=r"loaded from the run .*run: it predicts"):
        copied.fit(images)
    with pytest.raises(UnsegError, match="cannot be pickled once its run is gone"):
        pickle.dumps(loaded)


def test_score_is_the_evaluation_of_its_masks() -> None:
    """Segmenter.score (scikit-learn's habit): the mIoU of a semantic method's masks, the IoU
    of a saliency method's, as unseg.score_semantic / score_saliency give them."""
    images = _scenes()
    truth = _disks(3)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit(images)
    miou = seg.score(images, truth)
    assert miou == unseg.score_semantic(seg.predict(images), truth).miou
    assert 0 < miou <= 1
    finder = unseg.Segmenter("spectral", backbone=BACKBONE, image_size=SMALL).fit(images)
    masks = [t * 255 for t in truth]
    assert finder.score(images, masks) == unseg.score_saliency(finder.predict(images), masks).iou
    with pytest.raises(UnsegError, match="one label map or file per image"):
        seg.score(images, "gt/")


def test_set_progress_shows_the_commands_bars_in_a_program(capsys) -> None:
    """A program's fit was silent for its whole length (bars were the CLI's only)."""
    images = _scenes(2)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1)
    seg.fit(images)
    assert "features:" not in capsys.readouterr().err  # silent by default
    unseg.set_progress()
    try:
        seg.fit(images)
    finally:
        unseg.set_progress(False)
    assert "features:" in capsys.readouterr().err  # a tqdm bar counting images


def test_grey_and_rgba_arrays_give_the_masks_of_their_files(tmp_path: Path) -> None:
    """An H×W grey or H×W×4 RGBA array was refused ("expected an H×W×3 uint8 array") while
    the same image as a file is taken (grey to RGB, alpha composited on white)."""
    scenes = _scenes()
    rng = np.random.default_rng(3)
    grey = scenes[0][..., 1]
    rgba = np.dstack([scenes[1], rng.integers(0, 256, scenes[1].shape[:2], dtype=np.uint8)])
    files = [tmp_path / "grey.png", tmp_path / "rgba.png"]
    Image.fromarray(grey).save(files[0])
    Image.fromarray(rgba).save(files[1])
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit(scenes)
    _equal(seg.predict([grey, rgba]), seg.predict(files))
    _equal(seg.predict([grey[..., None]]), seg.predict(files[:1]))


@pytest.mark.parametrize("method", ["kmeans", "primaps-em"])
def test_a_fitted_segmenter_keeps_no_features_of_its_images(method: str,
                                                           tmp_path: Path) -> None:
    """A semantic Segmenter kept every fit image's features (and extras) and the in-memory
    images for its whole life, for fit_predict's reuse only: a large folder's gigabytes
    held by a notebook. fit and fit_predict now drop them; the masks and the run are as
    before."""
    import weakref

    images = _scenes()
    options = {"num_classes": 3, "size": SMALL, "refine": "none", "n_init": 1}
    if method == "primaps-em":
        options = {**options, "steps": 4, "pseudo_refine": "none"}
        del options["n_init"]
    seg = unseg.Segmenter(method, backbone=BACKBONE, **options).fit(images)
    assert seg._fitted.feats is None and seg._fit_inputs is None
    masks = seg.fit_predict(images)
    assert seg._fitted.feats is None and seg._fit_inputs is None
    _equal(seg.predict(images), masks)
    seg._fit(images)  # as fit runs it, before the release: nothing else holds the features
    feats = weakref.ref(seg._fitted.feats)
    seg._release()
    assert feats() is None
    meta = json.loads((seg.save(tmp_path / "run") / "config.json").read_text())
    assert meta["feature_dim"] == seg._fitted.backbone.dim


def test_joblib_process_workers_predict_files_as_one_process_does(tmp_path: Path) -> None:
    """In a joblib (loky) worker, predicting files started the DataLoader's decoding workers
    with loky's process class: "'Process' object has no attribute 'env'"."""
    import joblib

    files = []
    for i, image in enumerate(_scenes(3) + _scenes(3)[::-1]):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(np.roll(image, 7 * i, axis=1)).save(files[-1])
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit(files)
    chunks = [files[:3], files[3:]]  # three files each: the extraction starts its workers
    got = joblib.Parallel(n_jobs=2)(joblib.delayed(seg.predict)(c) for c in chunks)
    _equal(got[0] + got[1], seg.predict(files))


def test_a_device_this_machine_lacks_is_refused_when_made() -> None:
    """Segmenter(device="gpu") was taken and refused only at the first fit."""
    import torch

    with pytest.raises(UnsegError, match="device 'gpu' is not a torch device"):
        unseg.Segmenter("kmeans", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UnsegError, match="device 'cuda'"):
            unseg.Segmenter("kmeans", device="cuda")
    assert unseg.Segmenter("kmeans", device="cpu").device == "cpu"


def test_a_pickled_segmenter_of_another_state_version_is_refused() -> None:
    seg = unseg.Segmenter("kmeans", backbone=BACKBONE)
    state = seg.__getstate__()
    state["version"] = 0
    with pytest.raises(UnsegError, match="another version of unseg"):
        unseg.Segmenter.__new__(unseg.Segmenter).__setstate__(state)


def test_the_package_lists_what_exists_and_imports_light() -> None:
    names = unseg.list_methods()
    assert [s.name for s in list_methods()] + ["spectral"] == names
    assert {"kmeans", "primaps-em", "found", "saliency-head", "maskcontrast"} <= set(names)
    assert BACKBONE in unseg.list_backbones()
    code = "import sys, unseg; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


def test_the_example_script_runs(tmp_path: Path) -> None:
    """examples/segment_in_python.py, as the README shows it, on the bundled photos."""
    script = Path(__file__).resolve().parents[2] / "examples" / "segment_in_python.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--backbone", BACKBONE,
         "--size", str(SMALL)], capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("object box") == 4
    for photo in ("astronaut", "chelsea", "coffee", "rocket"):
        classes = np.asarray(Image.open(tmp_path / f"classes-{photo}.png"))
        photo_size = Image.open(script.parent / "images" / f"{photo}.jpg").size
        assert classes.shape == photo_size[::-1]
        assert (tmp_path / f"object-{photo}.png").is_file()


def test_score_takes_one_image_checks_its_options_and_counts_before_predicting(
        tmp_path: Path) -> None:
    """score(image, its_label_map) paired one prediction with the map's rows ("1 predictions
    for 64 ground-truth maps"); a single label file was refused as a folder; an unknown option
    was a TypeError from inside; a ground-truth list of the wrong length was found only after
    predicting every image."""
    images = _scenes()
    truth = _disks(3)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit(images)
    one = unseg.score_semantic(seg.predict(images[:1]), truth[:1]).miou
    Image.fromarray(truth[0]).save(tmp_path / "gt.png")
    for gt in (truth[0], Image.fromarray(truth[0]), tmp_path / "gt.png", str(tmp_path / "gt.png"),
               [tmp_path / "gt.png"]):
        assert seg.score(images[0], gt) == one
    assert seg.score(np.stack(images), np.stack(truth)) == seg.score(images, truth)
    with pytest.raises(UnsegError, match="score has no option 'foo' for a semantic method; it "
                                         "takes num_classes, ignore_index, match"):
        seg.score(images, truth, foo=1)
    with pytest.raises(UnsegError, match="3 images for 2 ground-truth maps"):
        unseg.Segmenter("kmeans", backbone=BACKBONE).score(images, truth[:2])  # not fitted
    finder = unseg.Segmenter("spectral", backbone=BACKBONE, image_size=SMALL).fit(images)
    with pytest.raises(UnsegError, match="score has no option 'match' for a saliency method; "
                                         "it takes fbeta_mode, beta2"):
        finder.score(images, [t * 255 for t in truth], match="iou")


def test_an_array_stack_is_its_images_and_a_bad_one_is_named() -> None:
    """A [N, H, W, 3] stack (scikit-learn's X) was refused as "images[0]: ... got uint8 of
    shape (3, 64, 96, 3)"; it is N images, as their list."""
    images = _scenes()
    seg = unseg.Segmenter("kmeans", num_classes=3, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1)
    masks = seg.fit_predict(np.stack(images))
    _equal(masks, unseg.Segmenter(**seg.get_params()).fit_predict(images))
    _equal(seg.predict(np.stack(images)), seg.predict(images))
    _equal(seg.predict(tuple(images)), seg.predict(images))
    grey = np.stack([im[..., 1] for im in images])
    _equal(seg.predict(grey[..., None]), seg.predict(list(grey)))
    with pytest.raises(UnsegError, match=r"^images: expected .*shape \(3, 64, 96\).*; a stack "
                                         r"of N grey images is \[N, H, W, 1\]"):
        seg.predict(grey)
    with pytest.raises(UnsegError, match=r"images\[0\]: .*shape \(3, 64, 96\) \(channels first, "
                                         r"as torch has them\? image.transpose\(1, 2, 0\)\)"):
        seg.predict([images[0].transpose(2, 0, 1)])


def test_scikit_learns_model_selection_runs_it() -> None:
    """cross_val_score / GridSearchCV failed: sklearn asks for __sklearn_tags__ and calls
    fit(X, y). Their scores equal the loop a user would write by hand."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
    from sklearn.utils.validation import check_is_fitted

    images = _scenes(4)
    truth = _disks(4)
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1)
    folds = KFold(2)
    got = cross_val_score(seg, images, truth, cv=folds, error_score="raise")
    want = []
    for train, test in folds.split(images):
        fold = clone(seg).fit([images[i] for i in train])
        want.append(fold.score([images[i] for i in test], [truth[i] for i in test]))
    np.testing.assert_array_equal(got, want)
    search = GridSearchCV(seg, {"num_classes": [2, 3]}, cv=folds, error_score="raise")
    search.fit(images, truth)
    assert search.cv_results_["mean_test_score"][0] == pytest.approx(np.mean(want))
    assert search.best_estimator_.fitted
    check_is_fitted(search.best_estimator_)
    with pytest.raises(sklearn.exceptions.NotFittedError):
        check_is_fitted(seg)


def test_numpy_scalars_from_a_parameter_grid_fit_save_and_pickle(tmp_path: Path) -> None:
    """ParameterGrid({"num_classes": np.arange(2, 4)}) hands np.int64: the constructor took it,
    then fit failed in random.seed ("The only supported seed types are ...") for a numpy seed,
    and save / pickle.dumps of a fit with numpy options in json ("int64 is not JSON
    serializable"). The pipeline gets Python's scalars; the attributes keep what was given,
    as sklearn.base.clone checks."""
    from sklearn.base import clone

    images = _scenes(2)
    given = {"num_classes": np.int64(2), "seed": np.int64(3), "size": np.int64(SMALL),
             "n_init": np.int64(1), "refine": "none"}
    seg = unseg.Segmenter("kmeans", backbone=BACKBONE, **given)
    assert seg.get_params()["num_classes"] is given["num_classes"]
    clone(seg)  # sklearn's identity check of the constructor's arguments
    masks = seg.fit_predict(images)
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in given.items()}
    _equal(masks, unseg.Segmenter("kmeans", backbone=BACKBONE, **plain).fit_predict(images))
    _equal(unseg.Segmenter.load(seg.save(tmp_path / "run")).predict(images), masks)
    _equal(pickle.loads(pickle.dumps(seg)).predict(images), masks)
    head = unseg.Segmenter("found", backbone=BACKBONE, image_size=np.int64(SMALL),
                           steps=np.int64(2), ensemble=1, lr=np.float64(0.01),
                           guided_filter=np.bool_(False)).fit(images)
    assert head.config.guided_filter is False
    _equal(unseg.Segmenter.load(head.save(tmp_path / "head")).predict(images),
           head.predict(images))


class _PathLike:
    """An os.PathLike that is no pathlib.Path (py.path.local, a DirEntry, a library's own)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_any_os_pathlike_is_a_path_for_images_and_ground_truth(tmp_path: Path) -> None:
    """Only str and pathlib.Path were paths: another os.PathLike was refused ("expected a
    path, a PIL image or an H×W×3 uint8 array, got _PathLike"), though path options take it."""
    images = _scenes(2)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(image).save(files[-1])
    truth = (images[0][..., 0] > 100).astype(np.uint8)
    Image.fromarray(truth).save(tmp_path / "gt.png")
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1).fit(files)
    _equal(seg.predict([_PathLike(f) for f in files]), seg.predict(files))
    _equal(seg.predict(_PathLike(files[0])), seg.predict(files[:1]))
    assert (seg.score(_PathLike(files[0]), _PathLike(tmp_path / "gt.png"))
            == seg.score(files[0], truth))
    assert (unseg.score_semantic([truth], [_PathLike(tmp_path / "gt.png")])
            == unseg.score_semantic([truth], [truth]))


def test_score_of_faint_saliency_maps_is_not_refused_as_binary(monkeypatch) -> None:
    """score_saliency refuses uint8 maps that all hold only 0 and 1 (binary masks mistaken
    for probabilities); a saliency segmenter's own 8-bit maps may all be that faint and are
    scored, as unseg evaluate scores its PNGs."""
    import unseg.segmenter as module

    images = _scenes(2)
    truth = [np.zeros(images[0].shape[:2], bool)] * 2
    finder = unseg.Segmenter("spectral", backbone=BACKBONE, image_size=SMALL).fit(images)
    monkeypatch.setattr(module, "_mask", lambda p: (  # a faint checkerboard of 0 and 1
        np.indices(np.shape(p.mask)).sum(0) % 2).astype(np.uint8))
    faint = finder.predict(images)
    assert max(int(m.max()) for m in faint) == 1  # the planted faint maps
    with pytest.raises(UnsegError, match="only the values 0 and 1"):
        unseg.score_saliency(faint, truth)
    assert finder.score(images, truth) == 1.0  # below 0.5 everywhere, as the empty truth


def test_a_folders_masks_come_in_the_order_list_images_gives(tmp_path: Path) -> None:
    """A folder in category folders whose names repeat (cats/001.png, dogs/001.jpg): the masks
    came back as a bare list, and nothing public said which file each is (a user's own
    sorted glob can list another order, or files the commands skip). unseg.list_images gives
    the files in the masks' order, and score takes ground truth in that order."""
    scenes = _scenes()
    files = [tmp_path / "pets" / "cats" / "001.png", tmp_path / "pets" / "cats" / "002.png",
             tmp_path / "pets" / "dogs" / "001.jpg"]
    for i, (path, image) in enumerate(zip(files, scenes, strict=True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[: 64 - 8 * i]).save(path, quality=95)  # each its own size
    (tmp_path / "pets" / ".hidden.png").write_bytes(b"")  # skipped, as the commands do
    folder = tmp_path / "pets"
    assert unseg.list_images(folder) == files
    assert unseg.list_images(str(folder)) == files
    seg = unseg.Segmenter("kmeans", num_classes=2, backbone=BACKBONE, size=SMALL,
                          refine="none", n_init=1)
    masks = seg.fit_predict(folder)
    assert [m.shape for m in masks] == [Image.open(f).size[::-1] for f in unseg.list_images(folder)]
    truth = [(m > 0).astype(np.uint8) for m in masks]
    assert seg.score(folder, truth) == 1.0
    (tmp_path / "pets" / "dogs" / "003.png").write_bytes(b"")
    with pytest.raises(UnsegError, match=r"003\.png: empty file"):
        unseg.list_images(folder)
