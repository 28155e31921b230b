"""MaskContrast through the CLI: fit with a saliency folder, predict by clustering, segment,
resume after a kill, bad input, and PriMaPs-EM chained on its embeddings."""

from __future__ import annotations

import argparse
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unseg
from unseg.backbones import create_backbone
from unseg.cli.main import main
from unseg.cli.options import add_method_options, given_options
from unseg.errors import UnsegError
from unseg.feature_store import FeatureRecord, FeatureSet
from unseg.methods.base import FitInputs
from unseg.methods.maskcontrast import (
    MaskContrast,
    MaskContrastConfig,
    PrototypeClusters,
    cluster_prototypes,
    pca_whiten,
)
from unseg.pipelines.embeddings import EmbeddedFeatures
from unseg.pipelines.fitting import build_config
from unseg.pipelines.maskcontrast import salient_pixels
from unseg.registry import get_method
from unseg.utils.batch import BatchReport

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
# a small real backbone at stride 16 on 96-pixel images: 6x8 feature grids
BACKBONE = ["--backbone", "efficientnet_lite0", "--tap", "s16", "--size", "96"]
TINY = [*BACKBONE, "--width", "16", "--aspp-rates", "1", "2", "--view-size", "64",
        "--loss-size", "16", "--batch-size", "6"]


def write_set(
    folder: Path, n: int = 12, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((96, 128),)
) -> tuple[Path, Path]:
    """``n`` grey images (``sizes`` in turn, default 96x128) each with one coloured box (three
    colours in turn), and their 8-bit saliency masks (255 in the box) under the same stems."""
    rng = np.random.default_rng(seed)
    images, masks = folder / "images", folder / "saliency"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = np.full((h, w, 3), 128, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        t, left = int(rng.integers(8, 48)), int(rng.integers(8, 64))
        img[t : t + 40, left : left + 56] = COLOURS[i % 3]
        mask[t : t + 40, left : left + 56] = 255
        noisy = img.astype(int) + rng.integers(-12, 12, img.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(images / f"im{i:02d}.png")
        Image.fromarray(mask).save(masks / f"im{i:02d}.png")
    return images, masks


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(images, saliency folder, run) of a short fit that learns the saliency."""
    root = tmp_path_factory.mktemp("mc")
    images, masks = write_set(root)
    run = root / "run"
    code = main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(run), *TINY, "--epochs", "10", "--lr", "0.05"])
    assert code == 0
    return images, masks, run


def _labels(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            assert im.mode == "P"  # palette PNG, pixel value = class id
            out[p.stem] = np.array(im)
    return out


def test_fit_writes_a_run_with_checkpoint_and_training_prototypes(fitted):
    _, masks, run = fitted
    meta = json.loads((run / "config.json").read_text())
    assert meta["method"] == "maskcontrast" and meta["n_images"] == 12
    assert meta["backbone"] == "efficientnet_lite0" and meta["tap"] == "s16"
    assert meta["config"]["epochs"] == 10 and meta["config"]["aspp_rates"] == [1, 2]
    assert meta["fit"]["masks"] == {"kept": 12, "dropped": 0, "bad": 0}
    assert meta["fit"]["saliency"] == str(masks.resolve())
    assert int(load_file(run / "checkpoint.safetensors")["epoch"]) == 10
    assert load_file(run / "train_prototypes.safetensors")["prototypes"].shape == (12, 32)


def test_predict_writes_per_image_clusters_on_the_salient_pixels(fitted, tmp_path):
    images, masks, run = fitted
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "p"),
                 "-k", "4"]) == 0
    labels = _labels(tmp_path / "p" / "masks")
    assert len(labels) == 12
    ious = []
    for stem, lab in labels.items():
        assert lab.shape == (96, 128)
        ids = set(np.unique(lab).tolist())
        assert ids <= {0, 1, 2, 3} and len(ids - {0}) <= 1  # one cluster per image
        truth = np.array(Image.open(masks / f"{stem}.png")) > 0
        ious.append(((lab > 0) & truth).sum() / max(((lab > 0) | truth).sum(), 1))
    assert np.mean(ious) > 0.4  # the learnt saliency finds the boxes
    again = tmp_path / "again"
    assert main(["-q", "predict", str(run), str(images), "--out", str(again), "-k", "4"]) == 0
    assert all(np.array_equal(labels[s], v) for s, v in _labels(again / "masks").items())
    other = tmp_path / "seed1"
    assert main(["-q", "predict", str(run), str(images), "--out", str(other), "-k", "4",
                 "--seed", "1", "--clusters", "training"]) == 0
    assert {s: (v > 0) for s, v in _labels(other / "masks").items()}.keys() == labels.keys()
    for s, v in _labels(other / "masks").items():  # the same salient pixels, whatever the clusters
        assert np.array_equal(v > 0, labels[s] > 0)


def test_predict_refuses_missing_or_impossible_cluster_counts(fitted, tmp_path, capsys):
    images, _, run = fitted
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "a")]) == 2
    assert "give --num-classes K" in capsys.readouterr().err
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "b"),
                 "-k", "21"]) == 2
    assert "20 clusters fitted on the predicted images need at least 20" in capsys.readouterr().err
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "c"),
                 "-k", "21", "--clusters", "training"]) == 2
    assert "12 training images cannot make 20 clusters" in capsys.readouterr().err


def test_resume_after_a_kill_equals_an_uninterrupted_run(fitted, tmp_path):
    images, masks, _ = fitted
    cache = tmp_path / "cache"
    args = ["fit", "maskcontrast", str(images), "--saliency", str(masks), *TINY,
            "--epochs", "60", "--cache-dir", str(cache)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "unseg.cli.main", "-q", *args, "--out",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint.safetensors").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = int(load_file(killed / "checkpoint.safetensors")["epoch"])
    assert 1 <= done < 60 and not (killed / "weights.safetensors").exists()
    assert main(["-q", *args, "--out", str(killed), "--resume"]) == 0  # the same command resumes
    whole = tmp_path / "whole"
    assert main(["-q", *args, "--out", str(whole)]) == 0
    a, b = load_file(killed / "weights.safetensors"), load_file(whole / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_bad_masks_are_skipped_and_counted(tmp_path, capsys):
    images, masks = write_set(tmp_path / "d", n=4)
    (masks / "im00.png").unlink()  # an image with no mask
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(masks / "im01.png")  # another size
    code = main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(tmp_path / "run"), *TINY, "--epochs", "1"])
    captured = capsys.readouterr()
    assert code == 1  # some inputs were skipped
    assert "2 image(s) with a mask proposal, 0 dropped" in captured.out
    assert "2 skipped (bad or missing mask)" in captured.out
    assert "no saliency mask named im00.png" in captured.err
    assert "im01.png: mask is 50x50 (HxW) but its image im01.png is 96x128" in captured.err
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["n_images"] == 2 and meta["fit"]["masks"] == {"kept": 2, "dropped": 0, "bad": 2}


def test_images_of_different_sizes_train_in_one_batch(tmp_path):
    """Views of every image have the same feature grid whatever the image's size (the masks
    follow the resized images), so a batch of mixed sizes stacks."""
    images, masks = write_set(tmp_path / "d", n=6, sizes=((96, 128), (120, 130), (100, 190)))
    run = tmp_path / "run"
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(run), *TINY, "--epochs", "1"]) == 0
    assert json.loads((run / "config.json").read_text())["n_images"] == 6


def test_empty_and_colour_map_mask_folders_are_refused(tmp_path, capsys):
    images, masks = write_set(tmp_path / "d", n=3)
    for p in masks.iterdir():
        Image.fromarray(np.zeros((96, 128), np.uint8)).save(p)
    base = ["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), *TINY]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "all 3 masks are empty" in capsys.readouterr().err
    for p in masks.iterdir():
        rgb = np.zeros((96, 128, 3), np.uint8)
        rgb[10:40, 10:60] = (128, 0, 0)  # VOC's class colours, not a saliency map
        Image.fromarray(rgb).save(p)
    assert main([*base, "--out", str(tmp_path / "b")]) == 2
    assert "the masks are RGB colour maps" in capsys.readouterr().err
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"), *TINY]) == 2
    assert "the saliency mask folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a" / "config.json").exists()


def test_segment_runs_discover_fit_predict(tmp_path):
    images, _ = write_set(tmp_path / "d", n=6)
    out = tmp_path / "out"
    code = main(["-q", "segment", str(images), "--out", str(out), "--method", "maskcontrast",
                 "-k", "3", *TINY, "--epochs", "2"])
    assert code == 0
    assert len(list((out / "discover" / "masks").glob("*.png"))) == 6  # spectral masks
    assert json.loads((out / "run" / "config.json").read_text())["method"] == "maskcontrast"
    labels = _labels(out / "masks")
    assert len(labels) == 6 and all(set(np.unique(v)) <= {0, 1, 2} for v in labels.values())
    assert len(list((out / "overlays").glob("*.jpg"))) == 6


def test_the_segmenter_gives_the_commands_masks(tmp_path):
    """`unseg segment --method maskcontrast` (fit → predict into folders) and
    `Segmenter("maskcontrast").fit_predict` on the same images, masks and settings: the same
    class ids in every pixel (one kind's fit and prediction behind both), and not all
    background (a fit long enough to learn the planted saliency)."""
    images, masks = write_set(tmp_path / "d")
    out = tmp_path / "out"
    assert main(["-q", "segment", str(images), "--out", str(out), "--method", "maskcontrast",
                 "-k", "3", "--saliency", str(masks), *TINY, "--epochs", "10",
                 "--lr", "0.05"]) == 0
    seg = unseg.Segmenter("maskcontrast", num_classes=3, backbone="efficientnet_lite0",
                          tap="s16", size=96, width=16, aspp_rates=(1, 2), view_size=64,
                          loss_size=16, batch_size=6, epochs=10, lr=0.05,
                          saliency=str(masks))
    got = seg.fit_predict(images)
    want = _labels(out / "masks")
    assert len(got) == len(want) == 12
    for mask, name in zip(got, sorted(want), strict=True):
        np.testing.assert_array_equal(mask, want[name])
    assert len(np.unique(np.concatenate([m.ravel() for m in got]))) >= 2  # not all background
    with pytest.raises(UnsegError, match="no class probabilities"):
        seg.predict_proba(images)
    # pickled (its run's bytes, the clustering's options with it), it predicts the same
    unpickled = pickle.loads(pickle.dumps(seg))
    twice = pickle.loads(pickle.dumps(unpickled))  # its run kept: "nothing to save" before
    for mask, again in zip(got, twice.predict(images), strict=True):
        np.testing.assert_array_equal(again, mask)


def test_primaps_em_chained_on_the_embeddings(fitted, tmp_path, capsys):
    images, _, run = fitted
    em = tmp_path / "em"
    fast = ["-k", "3", "--steps", "4", "--refine", "none", "--pseudo-refine", "none",
            "--workers", "1", "--no-student-augs"]
    assert main(["-q", "fit", "primaps-em", str(images), "--embeddings", str(run), "--out",
                 str(em), *fast]) == 0
    meta = json.loads((em / "config.json").read_text())
    assert meta["embeddings"]["run"] == str(run.resolve())
    assert meta["feature_dim"] == 32 and meta["backbone"] == "efficientnet_lite0"
    assert meta["tap"] == "s16" and meta["feature_size"] == 96
    assert meta["config"]["center"] is False
    first, second = tmp_path / "p1", tmp_path / "p2"
    assert main(["-q", "predict", str(em), str(images), "--out", str(first)]) == 0
    assert main(["-q", "predict", str(em), str(images), "--out", str(second)]) == 0
    a, b = _labels(first / "masks"), _labels(second / "masks")
    assert len(a) == 12 and all(np.array_equal(a[s], b[s]) for s in a)
    assert all(set(np.unique(v)) <= {0, 1, 2} for v in a.values())
    capsys.readouterr()
    assert main(["-q", "fit", "primaps-em", str(images), "--embeddings", str(run), "--out",
                 str(tmp_path / "x"), "--backbone", "efficientnet_lite1", *fast]) == 2
    assert "come from backbone efficientnet_lite0" in capsys.readouterr().err
    # the embedding run changes: the chained run refuses to predict with other embeddings
    copy = tmp_path / "mc-copy"
    copy.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (copy / name).write_bytes((run / name).read_bytes())
    assert main(["-q", "fit", "primaps-em", str(images), "--embeddings", str(copy), "--out",
                 str(tmp_path / "em2"), *fast]) == 0
    state = load_file(copy / "weights.safetensors")
    state["head.embed.bias"] = state["head.embed.bias"] + 1
    save_file(state, str(copy / "weights.safetensors"))
    capsys.readouterr()
    assert main(["-q", "predict", str(tmp_path / "em2"), str(images), "--out",
                 str(tmp_path / "p3")]) == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_a_run_predicts_with_its_own_seed_unless_given_another(tmp_path):
    """A run fitted with --seed 3 clustered its images with k-means seed 3, but `unseg
    predict` and Segmenter.load(run) clustered with 0 (so load → predict differed from the
    fit's masks) while the loaded segmenter's get_params() said 3: both now use the run's seed,
    and a seed given to either replaces it."""
    from unseg.pipelines.kinds import run_kind

    images, masks = write_set(tmp_path / "d", n=6)
    run = tmp_path / "run"
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(run), *TINY, "--epochs", "1", "--seed", "3"]) == 0
    assert run_kind(run, {"num_classes": 3}).settings.seed == 3  # unseg predict's
    assert run_kind(run, {"num_classes": 3, "seed": 0}).settings.seed == 0
    loaded = unseg.Segmenter.load(run, num_classes=3)
    assert loaded.seed == loaded.get_params()["seed"] == loaded._kind.settings.seed == 3
    given = unseg.Segmenter.load(run, num_classes=3, seed=1)
    assert given.seed == given.get_params()["seed"] == given._kind.settings.seed == 1


def test_a_refusal_of_the_chained_discovery_comes_before_overwrite_empties_the_folder(
    tmp_path, monkeypatch, capsys
):
    """`segment --method maskcontrast` checked MaskContrast's options before claiming --out,
    but its discovery's only once it ran: an option the discovery refuses (a --max-side under
    its backbone/tap's two feature rows, for one) deleted the previous run's files first."""
    import unseg.pipelines.saliency as saliency

    images, masks = write_set(tmp_path / "d", n=6)
    out = tmp_path / "out"
    base = ["-q", "segment", str(images), "--out", str(out), "--method", "maskcontrast",
            "-k", "3", *TINY, "--epochs", "1"]
    assert main([*base, "--saliency", str(masks)]) == 0
    before = sorted(p.name for p in (out / "masks").iterdir())

    def refuse(*args, **kwargs):
        raise UnsegError("--max-side 40: refused by the discovery")

    monkeypatch.setattr(saliency.SaliencyKind, "create", classmethod(refuse))
    capsys.readouterr()
    assert main([*base, "--overwrite", "--discover", "spectral"]) == 2
    assert "--max-side 40: refused by the discovery" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "masks").iterdir()) == before and before
    assert main([*base, "--overwrite", "--saliency", str(masks)]) == 0  # no discovery: none


def test_embedded_features_are_the_heads_normalised_embeddings():
    est = MaskContrast(MaskContrastConfig(width=8, aspp_rates=(1,), embed_dim=5))
    est.model_ = est._build(6).eval()
    feats = {Path("a.png"): torch.randn(6, 3, 4), Path("b.png"): torch.randn(6, 2, 2)}
    image = torch.zeros(3, 48, 64, dtype=torch.uint8)
    tensors = {(f"sha{p.stem}", "features"): f for p, f in feats.items()}
    tensors |= {(f"sha{p.stem}", "flipped"): f.flip(-1) for p, f in feats.items()}
    tensors[("shaa", "image")] = image
    records = {p: FeatureRecord(f"sha{p.stem}", (48, 64), (48, 64), tuple(f.shape))
               for p, f in feats.items()}
    emb = EmbeddedFeatures(FeatureSet(records, BatchReport(), None, tensors), est)
    for p, f in feats.items():
        want = torch.nn.functional.normalize(est.forward(f)[0], dim=0)
        torch.testing.assert_close(emb[p], want)
        torch.testing.assert_close(emb.extra(p, "flipped"),
                                   torch.nn.functional.normalize(est.forward(f.flip(-1))[0],
                                                                 dim=0))
        assert emb.shape_of(p) == (5, *f.shape[1:])
        torch.testing.assert_close(emb[p].norm(dim=0), torch.ones(f.shape[1:]))
    assert emb.extra(Path("a.png"), "image") is image
    assert emb.paths == list(feats)


def test_salient_pixels_follow_the_upsampled_logit():
    logit = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    got = salient_pixels(logit, (4, 4))
    up = torch.nn.functional.interpolate(logit[None, None], size=(4, 4), mode="bilinear",
                                         align_corners=False)[0, 0]
    assert torch.equal(got, up > 0.5)
    assert got[0, 3] and not got[0, 0]


def test_training_set_clusters_assign_like_the_protocol():
    """Clusters fitted on one set and applied to it give the protocol's partition; new points
    go to the centre nearest in the training set's whitened space."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 5
    x = torch.cat([c + 0.3 * torch.randn(20, 8, generator=gen) for c in centres])
    model = PrototypeClusters.fit(x, 3, pca_dim=4, seed=0)
    same = model.assign(x)
    ref = cluster_prototypes(x, 3, pca_dim=4, seed=0)
    # one relabelling maps one partition onto the other
    pairs = {(int(a), int(b)) for a, b in zip(same, ref, strict=True)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    white = pca_whiten(x, 4).double()
    torch.testing.assert_close(((x.double() - model.mean) @ model.projection), white)
    new = centres + 0.1 * torch.randn(3, 8, generator=gen)
    assert len(set(model.assign(new).tolist())) == 3
    brute = torch.cdist((new.double() - model.mean) @ model.projection, model.centres)
    assert torch.equal(model.assign(new), brute.argmin(dim=1))


def test_generated_options_include_the_queue_and_tuple_fields():
    parser = argparse.ArgumentParser()
    spec = get_method("maskcontrast")
    add_method_options(parser, [spec])
    args = parser.parse_args(["--queue", "64", "--aspp-rates", "1", "3", "--jitter", "0.1",
                              "0.2", "0.3", "0.05", "--epochs", "2", "--loss-size", "0"])
    given = given_options(args, spec)
    assert given == {"queue_size": 64, "aspp_rates": (1, 3), "jitter": (0.1, 0.2, 0.3, 0.05),
                     "epochs": 2, "loss_size": 0}
    cfg = build_config(spec, given, {"seed": 3})
    assert cfg.queue_size == 64 and cfg.aspp_rates == (1, 3) and cfg.seed == 3
    assert cfg.batch_size == MaskContrastConfig().batch_size
    with pytest.raises(SystemExit):
        parser.parse_args(["--jitter", "0.1", "0.2"])


def test_masks_at_different_strides_are_refused_before_training():
    est = MaskContrast(MaskContrastConfig(width=8, aspp_rates=(1,), epochs=1, view_size=64))
    feats = [torch.randn(6, 6, 8), torch.randn(6, 6, 8)]
    masks = [torch.ones(96, 128, dtype=torch.bool), torch.ones(192, 256, dtype=torch.bool)]
    with pytest.raises(UnsegError, match="feature grids of \\[2, 4\\] cells"):
        est.fit(FitInputs(feats, masks=masks))


def test_train_last_stage_fits_predicts_and_chains_on_the_earlier_tap(tmp_path, capsys):
    images, masks = write_set(tmp_path / "d", n=6)
    run = tmp_path / "run"
    stage_args = ["--backbone", "efficientnet_lite0", "--tap", "s32", "--size", "96",
                  "--width", "16", "--aspp-rates", "1", "--view-size", "64", "--loss-size",
                  "16", "--batch-size", "6", "--epochs", "2", "--lr", "0.05"]
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(run), *stage_args, "--train-last-stage"]) == 0
    meta = json.loads((run / "config.json").read_text())
    assert (meta["tap"], meta["trained_tap"], meta["feature_dim"]) == ("b14", "s32", 192)
    assert meta["config"]["train_last_stage"] is True
    assert meta["config"]["stage_of"] == "efficientnet_lite0:s32"
    state = load_file(run / "weights.safetensors")
    # the saved stage started from the pretrained last block and was trained
    backbone = create_backbone("efficientnet_lite0", tap="s32")
    pretrained = backbone._blocks[15]._project_conv.weight.detach()
    trained = state["head.stage.0._project_conv.weight"]
    assert trained.shape == pretrained.shape and not torch.equal(trained, pretrained)
    assert (trained - pretrained).abs().max() < 0.1 * pretrained.abs().max()
    out = tmp_path / "p"
    assert main(["-q", "predict", str(run), str(images), "--out", str(out), "-k", "3"]) == 0
    assert len(_labels(out / "masks")) == 6
    em = tmp_path / "em"
    assert main(["-q", "fit", "primaps-em", str(images), "--embeddings", str(run), "--out",
                 str(em), "-k", "3", "--steps", "2", "--refine", "none", "--pseudo-refine",
                 "none", "--workers", "1", "--no-student-augs"]) == 0
    assert json.loads((em / "config.json").read_text())["tap"] == "b14"
    capsys.readouterr()
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(tmp_path / "bad"), *stage_args[:2], "--tap", "s16", *stage_args[4:],
                 "--train-last-stage"]) == 2
    assert "'s16' is the first tap" in capsys.readouterr().err


def test_maskcontrast_masks_come_from_found_at_the_reference_threshold(tmp_path, monkeypatch):
    """The chain's FOUND-style masks keep the 0.3 threshold, the guided filter and one head
    (measured best for MaskContrast), not discover's CNN default, dense CRF and five heads;
    other sources run with discover's own defaults; the run's seed is the discovery's."""
    import unseg.pipelines.folder as folder
    from unseg.methods.collapse import _OVERSIZED_REASON
    from unseg.methods.found import CNN_THRESHOLD
    from unseg.pipelines.kind import Settings
    from unseg.utils.batch import BatchReport

    seen, seeds, expected = {}, set(), {}

    def fake_discover(images, out_dir, method, *, options=None, settings=None, **kw):
        seen[method] = options
        seeds.add(settings.seed)
        expected[method] = _OVERSIZED_REASON.get()
        return BatchReport()

    monkeypatch.setattr(folder, "discover", fake_discover)
    for method in ("found", "spectral", "saliency-head"):
        with pytest.raises(UnsegError, match="discover wrote no mask"):
            folder._discover_masks(tmp_path, tmp_path / "d", Settings(discover=method, seed=3))
    assert seeds == {3}  # the run's seed draws the discovery's heads too
    assert seen == {"found": {"bkg_threshold": 0.3, "dense_crf": False, "ensemble": 1},
                    "spectral": None, "saliency-head": None}
    assert seen["found"]["bkg_threshold"] != CNN_THRESHOLD
    # the raised threshold's large masks are expected (an INFO line, not the seed advice)
    assert "threshold 0.3" in expected["found"] and "MaskContrast" in expected["found"]
    assert expected["spectral"] is None and expected["saliency-head"] is None
    assert _OVERSIZED_REASON.get() is None  # the context ends with the discovery


def test_segmenter_masks_come_from_the_same_source_as_the_command(monkeypatch):
    """``Segmenter("maskcontrast")`` discovers its masks as ``unseg segment --method
    maskcontrast`` does: the FOUND-style head at 0.3 from 150 images on (it used discover's
    CNN default, 0.2, before), spectral below, with the settings and seed it was given."""
    import unseg.segmenter as segmenter_module
    from unseg.data.memory import ImageInputs
    from unseg.methods.collapse import _OVERSIZED_REASON
    from unseg.pipelines.saliency import MIN_TRAIN_IMAGES

    seen = []

    def fake_fit_predict(self, images):
        seen.append((self.method, self.seed, dict(self.options), _OVERSIZED_REASON.get()))
        return [np.zeros((2, 2), np.uint8) for _ in images]

    monkeypatch.setattr(segmenter_module.Segmenter, "fit_predict", fake_fit_predict)
    for n in (MIN_TRAIN_IMAGES, MIN_TRAIN_IMAGES - 1):
        paths = [Path(f"/nowhere/{i}.png") for i in range(n)]
        arrays = {p: np.zeros((4, 4, 3), np.uint8) for p in paths}
        seg = segmenter_module.Segmenter("maskcontrast", tap="s16", seed=4)
        seg._discovered_masks(ImageInputs(paths, arrays))
    from unseg.pipelines.saliency import MASK_SOURCE_LARGE

    assert seen == [
        ("found", 4, {"tap": "s16", "bkg_threshold": 0.3, "dense_crf": False, "ensemble": 1},
         MASK_SOURCE_LARGE),
        ("spectral", 4, {"tap": "s16"}, None),
    ]


def _failed(err: str) -> list[str]:
    """The names of the inputs a command reported as failed (its ``failed: PATH: ...`` lines)."""
    return sorted(Path(line.split(": ")[1]).name for line in err.splitlines()
                  if line.startswith("failed: "))


def test_segment_honours_max_pixels_in_discovery_training_and_prediction(
    tmp_path, monkeypatch, capsys
):
    """An image over ``--max-pixels`` is refused by the chain's discovery, its training and
    its prediction, and used by all three with ``--max-pixels 0`` (here over a lowered
    default limit, so the images stay tiny); ``predict`` on the run takes ``--max-pixels``."""
    import unseg.data.image as image_module

    # im02 and im05 are 120x130 = 15600 pixels, the others 96x128 = 12288
    images, _ = write_set(tmp_path / "d", n=6, sizes=((96, 128), (96, 128), (120, 130)))
    base = ["-q", "segment", str(images), "--method", "maskcontrast", "-k", "3", *TINY,
            "--epochs", "1"]
    small = tmp_path / "small"
    assert main([*base, "--out", str(small), "--max-pixels", "13000"]) == 1
    err = capsys.readouterr().err
    assert _failed(err) == ["im02.png", "im05.png"] and "image too large" in err
    assert sorted(p.stem for p in (small / "discover" / "masks").glob("*.png")) == [
        "im00", "im01", "im03", "im04"]
    assert sorted(_labels(small / "masks")) == ["im00", "im01", "im03", "im04"]
    meta = json.loads((small / "run" / "config.json").read_text())
    assert meta["n_images"] == 4 and meta["max_pixels"] == 13000

    monkeypatch.setattr(image_module, "DEFAULT_MAX_PIXELS", 13000)
    whole = tmp_path / "whole"
    assert main([*base, "--out", str(whole), "--max-pixels", "0"]) == 0
    assert len(list((whole / "discover" / "masks").glob("*.png"))) == 6
    assert len(_labels(whole / "masks")) == 6
    assert json.loads((whole / "run" / "config.json").read_text())["n_images"] == 6
    run = whole / "run"
    capsys.readouterr()
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "p"),
                 "-k", "3"]) == 1  # the lowered default refuses the larger ones
    assert _failed(capsys.readouterr().err) == ["im02.png", "im05.png"]
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "p0"),
                 "-k", "3", "--max-pixels", "0"]) == 0
    assert len(_labels(tmp_path / "p0" / "masks")) == 6


def _spy_feature_grids(monkeypatch, module) -> list[dict[str, tuple[int, int]]]:
    """The feature grids ``{image stem: (h, w)}`` of each call of ``module.extract_features``
    from now on, in call order (the list fills as the calls go through)."""
    grids: list[dict[str, tuple[int, int]]] = []
    extract = module.extract_features

    def spy(*args, **kwargs):
        feats = extract(*args, **kwargs)
        grids.append({p.stem: tuple(feats[p].shape[1:]) for p in feats.paths})
        return feats

    monkeypatch.setattr(module, "extract_features", spy)
    return grids


def test_max_side_sets_the_working_resolution_recorded_in_the_run_and_predicted_at(
    tmp_path, monkeypatch
):
    """``--max-side`` caps the long side the features are extracted at (a 96x400 panorama at
    --size 96: 6x24 feature cells at the default 4 x 96, 3x12 at --max-side 192), in training
    and labelling; the run records it and ``unseg predict`` (and ``Segmenter.load``) works at
    it; a run without it (older ones) predicts without a limit, as before."""
    import unseg.pipelines.maskcontrast as mc

    grids = _spy_feature_grids(monkeypatch, mc)
    images, masks = write_set(tmp_path / "d", n=6, sizes=((96, 128), (96, 400)))
    base = ["-q", "segment", str(images), "--method", "maskcontrast", "-k", "3",
            "--saliency", str(masks), *TINY, "--epochs", "1"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert grids[0]["im00"] == (6, 8) and grids[0]["im01"] == (6, 24)
    assert json.loads((tmp_path / "default" / "run" / "config.json").read_text())[
        "max_side"] == 384
    grids.clear()
    out = tmp_path / "capped"
    assert main([*base, "--out", str(out), "--max-side", "192"]) == 0
    assert grids[0]["im00"] == (6, 8) and grids[0]["im01"] == (3, 12)  # training
    assert all(g["im01"] == (3, 12) for g in grids[1:])  # labelling
    run = out / "run"
    meta = json.loads((run / "config.json").read_text())
    assert meta["max_side"] == 192 and meta["feature_size"] == 96
    assert _labels(out / "masks")["im01"].shape == (96, 400)  # at the image's own size
    grids.clear()
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "p"),
                 "-k", "3"]) == 0
    assert grids and all(g["im01"] == (3, 12) and g["im00"] == (6, 8) for g in grids)
    grids.clear()
    unseg.Segmenter.load(run, num_classes=3, max_pixels=0).predict(
        [images / "im01.png", images / "im03.png"])
    assert grids and grids[0]["im01"] == grids[0]["im03"] == (3, 12)
    del meta["max_side"]  # a run from before MaskContrast recorded it: no limit, as then
    (run / "config.json").write_text(json.dumps(meta))
    grids.clear()
    assert main(["-q", "predict", str(run), str(images), "--out", str(tmp_path / "old"),
                 "-k", "3"]) == 0
    assert grids and all(g["im01"] == (6, 25) for g in grids)


def test_a_run_on_the_embeddings_works_at_their_runs_max_side(tmp_path, monkeypatch, capsys):
    """`fit kmeans --embeddings MC_RUN` took MaskContrast's feature size but its own max_side
    (4 x that size): a panorama's embeddings came from features at another working
    resolution than the head was trained and predicts at (6x24 cells against 3x12 here). It
    now works at the MaskContrast run's max_side; another --max-side is refused."""
    import unseg.pipelines.semantic as semantic

    grids = _spy_feature_grids(monkeypatch, semantic)
    images, masks = write_set(tmp_path / "d", n=6, sizes=((96, 128), (96, 400)))
    mc = tmp_path / "mc"
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(mc), *TINY, "--epochs", "1", "--max-side", "192"]) == 0
    fast = ["kmeans", str(images), "--embeddings", str(mc), "-k", "3", "--refine", "none",
            "--n-init", "1"]
    em = tmp_path / "em"
    assert main(["-q", "fit", *fast, "--out", str(em)]) == 0
    assert grids[0]["im01"] == (3, 12) and grids[0]["im00"] == (6, 8)
    assert json.loads((em / "config.json").read_text())["max_side"] == 192
    assert main(["-q", "fit", *fast, "--out", str(tmp_path / "same"), "--max-side", "192"]) == 0
    capsys.readouterr()
    assert main(["-q", "fit", *fast, "--out", str(tmp_path / "x"), "--max-side", "384"]) == 2
    assert (f"--max-side 384: the embeddings of {mc} were trained at max_side 192"
            in capsys.readouterr().err)
    with pytest.raises(UnsegError, match="--max-side 0: the embeddings"):
        unseg.Segmenter("kmeans", embeddings=mc, max_side=0)


def test_the_segmenter_takes_max_side_and_max_pixels_for_maskcontrast():
    seg = unseg.Segmenter("maskcontrast", backbone="efficientnet_lite0", max_side=192,
                          max_pixels=0)
    assert (seg._kind.settings.max_side, seg._kind.settings.max_pixels) == (192, 0)
    with pytest.raises(UnsegError, match=r"--max-side -1: must be 0 \(no limit\)"):
        unseg.Segmenter("maskcontrast", backbone="efficientnet_lite0", max_side=-1)


def test_fit_takes_max_side_and_max_pixels_and_records_them(tmp_path):
    """``unseg fit maskcontrast`` has the image options too: a panorama worked at a capped
    long side still trains in one batch with the others (its mask follows its resized
    image), and the run records both."""
    images, masks = write_set(tmp_path / "d", n=6, sizes=((96, 128), (100, 400)))
    run = tmp_path / "run"
    assert main(["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), "--out",
                 str(run), *TINY, "--epochs", "1", "--max-side", "160",
                 "--max-pixels", "0"]) == 0
    meta = json.loads((run / "config.json").read_text())
    assert (meta["max_side"], meta["max_pixels"], meta["n_images"]) == (160, 0, 6)


def test_the_chains_discovery_gets_max_side_and_max_pixels(tmp_path, monkeypatch):
    """`segment --method maskcontrast` and `Segmenter("maskcontrast")` pass the long-side and
    pixel limits they were given to the discovery of their masks, as given (None: the
    discovery's own default, 4 x its size), and nothing when none was given."""
    import unseg.pipelines.folder as folder
    import unseg.segmenter as segmenter_module
    from unseg.data.memory import ImageInputs
    from unseg.pipelines.kind import Settings

    seen = []

    def fake_discover(images, out_dir, method, *, options=None, settings=None, **kw):
        seen.append((settings.max_side, settings.max_pixels))
        return BatchReport()

    monkeypatch.setattr(folder, "discover", fake_discover)
    for settings in (Settings(discover="spectral", max_side=256, max_pixels=0),
                     Settings(discover="spectral")):
        with pytest.raises(UnsegError, match="discover wrote no mask"):
            folder._discover_masks(tmp_path, tmp_path / "d", settings)
    assert seen == [(256, 0), (None, None)]

    def fake_fit_predict(self, images):
        seen.append(dict(self.options))
        return [np.zeros((2, 2), np.uint8) for _ in images]

    monkeypatch.setattr(segmenter_module.Segmenter, "fit_predict", fake_fit_predict)
    paths = [Path(f"/nowhere/{i}.png") for i in range(3)]
    arrays = {p: np.zeros((4, 4, 3), np.uint8) for p in paths}
    seg = unseg.Segmenter("maskcontrast", discover="spectral", max_side=0, max_pixels=10**9)
    seg._discovered_masks(ImageInputs(paths, arrays))
    assert seen[-1] == {"max_side": 0, "max_pixels": 10**9}


def test_segment_lists_the_images_once_to_choose_its_discovery(tmp_path, monkeypatch, capsys):
    """`segment --method maskcontrast` with `--discover auto` counts the images to choose the
    mask source: the check before claiming --out did, and the run counted them all again (a
    second pass over every file of a large folder). Reads of each image before the discovery
    starts, against a named method (which counts nothing): one more each, not two."""
    import unseg.data.datasets as datasets
    import unseg.pipelines.folder as folder

    images, _ = write_set(tmp_path / "d", n=6)
    reads: list[Path] = []
    real = datasets.unreadable

    def counting(path):
        reads.append(Path(path))
        return real(path)

    def stop(images, out_dir, method, **kw):
        raise UnsegError(f"stopped before discovering with {method}")

    monkeypatch.setattr(datasets, "unreadable", counting)
    monkeypatch.setattr(folder, "discover", stop)
    per_image = {}
    for discover in ("spectral", "auto"):
        reads.clear()
        assert main(["-q", "segment", str(images), "--out", str(tmp_path / discover),
                     "--method", "maskcontrast", "-k", "3", *TINY, "--epochs", "1",
                     "--discover", discover]) == 2
        assert "stopped before discovering with spectral" in capsys.readouterr().err
        per_image[discover] = {p.name: reads.count(p) for p in sorted(images.iterdir())}
    assert len(per_image["auto"]) == 6
    assert per_image["auto"] == {n: c + 1 for n, c in per_image["spectral"].items()}


def test_a_size_other_than_the_embedding_runs_is_refused(fitted, tmp_path, capsys):
    """`--size 320` with `--embeddings MC_RUN` (trained at 96) was replaced by the run's size
    with an INFO line: the default could not be told from a size given. Another size is now
    refused as another --max-side is, through the CLI and the Segmenter; the same size, or
    none, works at the run's."""
    from unseg.pipelines.semantic import SemanticKind

    images, _, run = fitted
    fast = ["kmeans", str(images), "--embeddings", str(run), "-k", "3", "--refine", "none",
            "--n-init", "1"]
    assert main(["-q", "fit", *fast, "--out", str(tmp_path / "x"), "--size", "320"]) == 2
    err = capsys.readouterr().err
    assert f"--size 320: the embeddings of {run} were trained at feature size 96" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    assert main(["-q", "fit", *fast, "--out", str(tmp_path / "same"), "--size", "96"]) == 0
    assert json.loads((tmp_path / "same" / "config.json").read_text())["feature_size"] == 96
    with pytest.raises(UnsegError, match=r"--size 320: the embeddings of .* feature size 96"):
        unseg.Segmenter("kmeans", embeddings=run, size=320)
    for given in ({"size": 96}, {}):
        kind = unseg.Segmenter("kmeans", embeddings=run, **given)._kind
        assert isinstance(kind, SemanticKind) and kind.settings.size == 96
    assert unseg.Segmenter("kmeans", backbone="efficientnet_lite0")._kind.settings.size == 320


def test_segment_lists_its_images_once_for_discovery_and_fit(tmp_path, listing_reads):
    """`segment --method maskcontrast` listed the folder (every file opened, every header
    read) for the discovery's prediction, again for MaskContrast's fit, and with `auto` a
    third time to choose the discovery. Now one listing serves them all; the other walk is the
    command's check that the folder has images, before --overwrite deletes anything."""
    images, _ = write_set(tmp_path / "d", n=6)
    assert main(["-q", "segment", str(images), "--out", str(tmp_path / "out"), "--method",
                 "maskcontrast", "-k", "3", *TINY, "--epochs", "1", "--discover", "spectral",
                 "--no-report"]) == 0
    files = sorted(images.iterdir())
    assert listing_reads["walks"] == [images, images]
    assert sorted(listing_reads["opened"]) == sorted(listing_reads["headers"]) == files


def test_a_discovery_that_empties_every_mask_loses_no_earlier_output(tmp_path, capsys):
    """`segment --method maskcontrast --overwrite` at a --max-side so small that the
    discovery finds no object (a 2x2 feature grid) failed on its empty masks after --overwrite
    had deleted the previous run's masks, overlays, run and report. Now the failure removes its
    own files and puts the previous ones back, and says so."""
    images, masks = write_set(tmp_path / "d", n=6)
    out = tmp_path / "out"
    base = ["-q", "segment", str(images), "--out", str(out), "--method", "maskcontrast",
            "-k", "3", *TINY, "--epochs", "1"]
    assert main([*base, "--saliency", str(masks)]) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes()
              for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main([*base, "--overwrite", "--discover", "spectral", "--max-side", "32"]) == 2
    err = capsys.readouterr().err
    assert "all 6 masks are empty" in err and "nothing was deleted" in err
    assert "the discovery run before the fit (spectral) gave no usable mask" in err
    assert "larger --max-side" in err
    assert {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert {"masks", "overlays", "run", "report.html"} <= {p.name for p in out.iterdir()}


def test_the_view_cache_removes_the_stale_temp_files_of_a_killed_run(tmp_path):
    """MaskContrast's photometric views, cached beside the features (``--cache-dir``), are
    written as the features are: a run killed mid-write left its temp file there for good; now
    the next run removes the stale ones (:func:`unseg.feature_store.remove_stale_temps`)."""
    import os

    from unseg.feature_store import STALE_TEMP_SECONDS

    images, masks = write_set(tmp_path / "d", n=6)
    cache = tmp_path / "cache"
    fit = ["-q", "fit", "maskcontrast", str(images), "--saliency", str(masks), *TINY,
           "--epochs", "1", "--cache-dir", str(cache)]
    assert main([*fit, "--out", str(tmp_path / "a")]) == 0
    (views,) = (cache / "maskcontrast-views").iterdir()
    stale = views / f".{'ab' * 32}.safetensors.k7x2q9pz.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    assert main([*fit, "--out", str(tmp_path / "b")]) == 0
    assert not stale.exists() and len(list(views.glob("*.safetensors"))) == 6
