"""Bad options and inputs end in one clear line and exit status 2 (or a listed failure), never a
traceback: out-of-range --size / --max-side, an unavailable --device, a file that is not weights,
animated GIFs, and the output folder's own settings honoured by report and evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unseg.backbones.create import create_backbone
from unseg.cli.main import main
from unseg.data.image import list_images, load_image
from unseg.data.resize import resolve_max_side
from unseg.errors import InputFileError, UnsegError
from unseg.segmenter import Segmenter
from unseg.utils.device import resolve_device


def _one_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(folder / "a.png")
    return folder


def test_cuda_on_a_cpu_only_build_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UnsegError, match="CUDA is not available in this torch build"):
        resolve_device("cuda")


def test_missing_gpu_index_and_unknown_device_are_clear_errors(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UnsegError, match=r"1 CUDA device\(s\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UnsegError, match="'foo' is not a torch device"):
        resolve_device("foo")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cli_device_cuda_without_cuda_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    images = _one_image(tmp_path / "images")
    code = main(["features", str(images), "--out", str(tmp_path / "f"), "--backbone",
                 "efficientnet_lite0", "--size", "64", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CUDA is not available in this torch build" in err
    assert "Traceback" not in err


def _segment_refuses(tmp_path: Path, capsys, flags: list[str], says: str) -> None:
    """`unseg segment` (k-means, one image) with ``flags`` stops with status 2 and ``says``,
    no traceback and no output folder."""
    images = _one_image(tmp_path / "images")
    out = tmp_path / "out"
    code = main(["segment", str(images), "--out", str(out), "-k", "2", "--backbone",
                 "efficientnet_lite0", "--method", "kmeans", "--refine", "none", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("flags", "says"), [
    (["--size", "0"], "--size 0: must be 64 to 2048 with efficientnet_lite0 (stride 32)"),
    (["--size", "7"], "--size 7: must be 64 to 2048"),
    (["--size", "32"], "--size 32: must be 64 to 2048"),
    (["--size", "100000"], "--size 100000: must be 64 to 2048"),
    (["--max-side", "-5"], "--max-side -5: must be 0 (no limit) or at least 64"),
    (["--max-side", "40"], "--max-side 40: must be 0 (no limit) or at least 64"),
])
def test_segment_bounds_size_and_max_side(tmp_path: Path, capsys, flags, says) -> None:
    _segment_refuses(tmp_path, capsys, flags, says)


@pytest.mark.parametrize(("flags", "says"), [
    (["--workers", "-1"], "--workers must be at least 1, got -1"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--max-iter", "0"], "max_iter must be at least 1, got 0"),
    (["--tol", "-1"], "tol must be at least 0, got -1"),
])
def test_segment_refuses_counts_that_make_no_sense(tmp_path: Path, capsys, flags,
                                                   says) -> None:
    """These were taken silently (`--workers -1` ran one thread, `--max-iter 0` no k-means
    iteration); the Segmenter refuses them with the same words."""
    _segment_refuses(tmp_path, capsys, flags, says)
    name, value = flags[0].removeprefix("--").replace("-", "_"), float(flags[1])
    with pytest.raises(UnsegError, match=says):
        Segmenter("kmeans", backbone="efficientnet_lite0", **{name: value if name == "tol"
                                                               else int(value)})


@pytest.mark.parametrize(("flags", "says"), [
    (["--method", "found", "--steps", "0"], "steps must be at least 1, got 0"),
    (["--method", "found", "--lr", "-1"], "lr must be above 0, got -1.0"),
    (["--method", "found", "--crf-eps", "0.7"], "crf.eps must be above 0 and below 0.5, got 0.7"),
    (["--method", "saliency-head", "--heads", "0"], "heads must be at least 1, got 0"),
])
def test_discover_refuses_training_values_out_of_bounds(tmp_path: Path, capsys, flags,
                                                         says) -> None:
    """`--steps 0` wrote untrained masks with exit 0; `--lr -1` ended in torch's ValueError
    traceback after the features were computed."""
    images = _one_image(tmp_path / "in")
    assert main(["discover", str(images), "--out", str(tmp_path / "o"), "--backbone",
                 "efficientnet_lite0", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_report_refuses_a_negative_gallery_size(tmp_path: Path, capsys) -> None:
    """`unseg report OUT --max-images -3` wrote a page with an empty gallery."""
    assert main(["report", str(tmp_path), "--max-images", "-3"]) == 2
    assert "--max-images must be 0 (no gallery) or more, got -3" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["features", "fit-maskcontrast"])
def test_features_and_fit_bound_size_too(tmp_path: Path, capsys, command) -> None:
    images = _one_image(tmp_path / "images")
    argv = (["features", str(images)] if command == "features" else
            ["fit", "maskcontrast", str(images), "--saliency", str(images)])
    code = main([*argv, "--out", str(tmp_path / "out"), "--backbone", "efficientnet_lite0",
                 "--tap", "s16", "--size", "16"])
    assert code == 2
    assert "--size 16: must be 32 to 2048 with efficientnet_lite0 (stride 16)" in (
        capsys.readouterr().err)


@pytest.mark.parametrize(("argv", "says"), [
    # discover and the saliency heads run on s16+s32 (stride 16) when no --tap is given
    (["discover", "--method", "spectral", "--size", "16"], "--size 16: must be 32 to 2048"),
    (["discover", "--method", "spectral", "--size", "0"], "--size 0: must be 32 to 2048"),
    (["discover", "--method", "found", "--size", "100000"], "--size 100000: must be 32"),
    (["discover", "--method", "spectral", "--tap", "head", "--size", "32"],
     "--size 32: must be 64 to 2048 with efficientnet_lite0 (stride 32)"),
    (["fit", "found", "--size", "100000"], "--size 100000: must be 32 to 2048"),
    # the SEMPART-style head runs on the backbone's own tap (stride 32)
    (["fit", "saliency-head", "--size", "-5"], "--size -5: must be 64 to 2048"),
])
def test_discover_and_saliency_fit_bound_size_at_their_tap(tmp_path: Path, capsys, argv,
                                                           says) -> None:
    images = _one_image(tmp_path / "images")
    command = argv[:2] if argv[0] == "fit" else argv[:1]
    out = tmp_path / "out"
    code = main([*command, str(images), *argv[len(command):], "--out", str(out),
                 "--backbone", "efficientnet_lite0"])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert "Traceback" not in err
    assert not (out / "masks").exists()


def test_discover_runs_at_the_smallest_size_its_tap_allows(tmp_path: Path) -> None:
    images = _one_image(tmp_path / "images")
    out = tmp_path / "out"
    code = main(["discover", str(images), "--out", str(out), "--method", "spectral",
                 "--backbone", "efficientnet_lite0", "--size", "32", "--no-report"])
    assert code == 0
    assert (out / "masks" / "a.png").is_file()


@pytest.mark.parametrize(("fit", "tap", "says"), [
    (["found", "--steps", "2"], "s16", "takes 432-channel features, but efficientnet_lite0 at "
     "tap 's16' gives 112"),
    (["saliency-head", "--epochs", "1"], "b14", "takes 320-channel features, but "
     "efficientnet_lite0 at tap 'b14' gives 192"),
])
def test_a_saliency_run_edited_to_a_tap_of_another_width_is_refused(
    tmp_path: Path, capsys, fit: list[str], tap: str, says: str
) -> None:
    """A run's config.json 'tap' edited to one of the same stride but another width ended in a
    conv's RuntimeError traceback at predict: the head's input width is checked at load."""
    images = _one_image(tmp_path / "images")
    run = tmp_path / "run"
    main(["-q", "fit", fit[0], str(images), "--out", str(run), "--backbone",
          "efficientnet_lite0", "--size", "64", *fit[1:]])  # 1: a one-image head may collapse
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "tap": tap}))
    capsys.readouterr()
    code = main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err and "Traceback" not in err


def test_resolve_max_side_refuses_negative() -> None:
    with pytest.raises(UnsegError, match="--max-side must be >= 0"):
        resolve_max_side(320, -5)


def _not_weights(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "jpeg":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format="JPEG")
    else:  # a training checkpoint with its argparse options pickled beside the state dict
        torch.save({"args": argparse.Namespace(lr=0.1), "model": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("text", "not a weights file (expected a PyTorch state dict"),
    ("jpeg", "not a weights file (expected a PyTorch state dict"),
    ("checkpoint", "pickled Python objects (argparse.Namespace) besides tensors"),
])
def test_a_file_that_is_not_weights_is_named_without_torch_s_advice(
    tmp_path: Path, monkeypatch, kind, says
) -> None:
    path = _not_weights(tmp_path, kind)
    calls: list[object] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(InputFileError) as caught:
        create_backbone("efficientnet_lite0", weights=path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read weights: ")
    assert says in message
    assert "weights_only" not in message and "file an issue" not in message
    assert calls == [True]


def test_cli_weights_not_weights_exits_2(tmp_path: Path, capsys) -> None:
    images = _one_image(tmp_path / "images")
    path = _not_weights(tmp_path, "text")
    code = main(["features", str(images), "--out", str(tmp_path / "f"), "--backbone",
                 "efficientnet_lite0", "--size", "64", "--weights", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}: cannot read weights: not a weights file" in err
    assert "Traceback" not in err and "weights_only" not in err


def _animated_gif(path: Path, frames: int = 3) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    imgs = [Image.new("RGB", (96, 64), colours[i % 3]) for i in range(frames)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return path


def test_an_animated_gif_is_read_as_its_first_frame_with_a_warning(tmp_path: Path,
                                                                    caplog) -> None:
    path = _animated_gif(tmp_path / "anim.gif")
    assert Image.open(path).n_frames == 3
    with caplog.at_level(logging.WARNING, logger="unseg.data.image"):
        first = load_image(path)
        again = load_image(path)
    assert first.shape == (64, 96, 3)
    np.testing.assert_array_equal(first, again)
    reference = np.asarray(Image.open(path).convert("RGB"))  # Pillow's frame 0
    np.testing.assert_array_equal(first, reference)
    assert first[0, 0, 0] > 150 and first[0, 0, 1] < 80  # red: the first frame
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [f"{path}: animated GIF (3 frames): the first frame is used"]
    assert list_images(tmp_path) == [path]



def test_an_animated_gif_is_warned_about_once_per_command(tmp_path: Path) -> None:
    """Once per file, as docs/troubleshooting.md says: the data-loader workers that decode it
    (more than two images) and the main process that reads it again for the report do not each
    warn. In a subprocess: the workers' log lines reach its stderr, not pytest's capture."""
    images = _one_image(tmp_path / "images")
    for name in ("b", "c"):
        Image.fromarray(np.full((64, 96, 3), 90 if name == "b" else 160, np.uint8)).save(
            images / f"{name}.png")
    _animated_gif(images / "anim.gif")
    src = str(Path(__file__).resolve().parents[2] / "src")
    done = subprocess.run(
        [sys.executable, "-m", "unseg.cli.main", "segment", str(images), "--out",
         str(tmp_path / "out"), "-k", "2", "--size", "64", "--backbone", "efficientnet_lite0",
         "--method", "kmeans", "--refine", "none"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("anim.gif: animated GIF (3 frames)") == 1, done.stderr

def test_features_processes_an_animated_gif(tmp_path: Path, capsys, caplog) -> None:
    images = _one_image(tmp_path / "images")
    _animated_gif(images / "b.gif")
    code = main(["features", str(images), "--out", str(tmp_path / "f"), "--backbone",
                 "efficientnet_lite0", "--size", "64"])
    captured = capsys.readouterr()
    assert code == 0
    assert "2 images: 2 computed" in captured.out
    assert any(r.getMessage().endswith("b.gif: animated GIF (3 frames): the first frame is used")
               for r in caplog.records)


def test_the_output_folder_remembers_its_max_pixels(tmp_path: Path, monkeypatch,
                                                    capsys) -> None:
    """An image over the pixel limit: ``segment --max-pixels`` accepts it, and its own report,
    ``report --format coco`` and ``evaluate`` on its folder accept it
    and its mask too. The limit is lowered to 40,000 pixels for the test: the same run on a
    90 MP image over Pillow's real 89.5 MP guard took 5 GB and 90 s (the masks are written at
    full size)."""
    import unseg.data.image as image_module

    monkeypatch.setattr(image_module, "DEFAULT_MAX_PIXELS", 40_000)
    images = tmp_path / "images"
    images.mkdir()
    h, w = 200, 300
    pixels = np.full((h, w, 3), (60, 140, 50), np.uint8)
    pixels[: h // 2] = (40, 90, 200)
    pixels[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = (200, 40, 40)
    Image.fromarray(pixels).save(images / "big.png")
    out = tmp_path / "out"
    code = main(["segment", str(images), "--out", str(out), "-k", "3", "--size", "64",
                 "--backbone", "efficientnet_lite0", "--method", "kmeans", "--refine", "none",
                 "--workers", "1", "--max-pixels", str(h * w)])
    assert code == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Showing 0 of 1" not in page and "image too large" not in page
    assert page.count("<figcaption>image") == 1
    assert main(["report", str(out), "--format", "coco"]) == 0
    assert (out / "coco_results.json").is_file()
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "big.png").write_bytes((out / "masks" / "big.png").read_bytes())
    assert main(["evaluate", "semantic", "--pred", str(out), "--gt", str(gt),
                 "--num-classes", "3"]) == 0
    assert "1 image(s) scored" in capsys.readouterr().out
    # evaluate's own option overrides the folder's limit
    assert main(["evaluate", "semantic", "--pred", str(out), "--gt", str(gt),
                 "--num-classes", "3", "--max-pixels", "1000"]) == 2
    assert "pass --max-pixels 60000 or more" in capsys.readouterr().err


def test_report_of_an_existing_output_shows_the_recorded_photos(tmp_path: Path) -> None:
    images = _one_image(tmp_path / "images")
    Image.fromarray(np.full((64, 96, 3), 30, np.uint8)).save(images / "b.png")
    out = tmp_path / "out"
    assert main(["segment", str(images), "--out", str(out), "-k", "2", "--size", "64",
                 "--backbone", "efficientnet_lite0", "--method", "kmeans", "--refine", "none",
                 "--workers", "1", "--no-report"]) == 0
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<figcaption>image") == 2
    assert "Original images not found" not in page


def _saliency_root(root: Path) -> Path:
    """An ECSSD-layout root: images/ and ground_truth_mask/."""
    _one_image(root / "images")
    (root / "ground_truth_mask").mkdir()
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(root / "ground_truth_mask" / "a.png")
    return root


def test_semantic_scoring_of_a_saliency_root_says_what_it_is(tmp_path: Path, capsys) -> None:
    gt = _saliency_root(tmp_path / "sal")
    pred = _one_image(tmp_path / "pred")
    code = main(["evaluate", "semantic", "--pred", str(pred), "--gt", str(gt),
                 "--num-classes", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"{gt}: ECSSD is a saliency dataset (foreground masks): it has no class label "
            "PNGs to score against; use `unseg evaluate saliency`") in err
    assert "no images found" not in err


def test_a_boxes_root_given_for_masks_is_an_object_detection_dataset(tmp_path: Path,
                                                                      capsys) -> None:
    """It said "a object detection dataset"."""
    gt = tmp_path / "VOC2007"
    _one_image(gt / "VOCdevkit" / "VOC2007" / "JPEGImages")
    (gt / "VOCdevkit" / "VOC2007" / "Annotations").mkdir()
    pred = _one_image(tmp_path / "pred")
    assert main(["evaluate", "saliency", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "is an object detection dataset (XML boxes)" in capsys.readouterr().err


def test_the_real_ecssd_and_voc_roots_name_their_task(shared_data, tmp_path: Path, capsys) -> None:
    ecssd, voc = shared_data("ECSSD"), shared_data("VOC2012")
    pred = _one_image(tmp_path / "pred")
    assert main(["evaluate", "semantic", "--pred", str(pred), "--gt", str(ecssd)]) == 2
    assert "ECSSD is a saliency dataset" in capsys.readouterr().err
    assert main(["evaluate", "saliency", "--pred", str(pred), "--gt", str(voc)]) == 2
    assert ("VOC2012 is a semantic segmentation dataset (class label PNGs): it has no "
            "foreground masks to score against; use `unseg evaluate semantic`"
            ) in capsys.readouterr().err
