"""Dense CRF in torch: against pydensecrf2 (the reference) on real images, its properties, the
label floor, batching, bad input."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from crf_reference import needs_reference
from PIL import Image

from unseg.errors import UnsegError
from unseg.proposals.primaps import PriMaPsConfig, principal_masks, proposal_log_probs
from unseg.refine.crf import (
    CRFConfig,
    CRFPool,
    _row_softmax,
    crf_marginals,
    dense_crf,
    dense_crf_batch,
    dense_crf_reference,
)
from unseg.refine.lattice import build_lattice


def two_region_case(width: int = 64, edge: int = 37) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Image with a colour edge at column ``edge``; a blurred unary whose boundary is off by 7."""
    image = np.full((48, width, 3), 40, dtype=np.uint8)
    image[:, edge:] = (220, 200, 60)
    truth = np.zeros((48, width), dtype=np.int64)
    truth[:, edge:] = 1
    cols = torch.arange(width, dtype=torch.float32)
    ramp = torch.tanh((cols - (edge - 7)) / 12.0)  # soft, and centred at the wrong place
    logits = torch.stack([-ramp, ramp])[:, None, :].expand(2, 48, width).contiguous()
    return np.ascontiguousarray(image), logits, truth


def smooth_logits(shape: tuple[int, int], k: int, seed: int, scale: float = 12.0) -> torch.Tensor:
    """Realistic K-class logits ``[k, H, W]``: noise at 1/8 size, box-smoothed, scaled."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, k, max(1, shape[0] // 8), max(1, shape[1] // 8), generator=gen)
    small = F.avg_pool2d(noise, 5, 1, 2, count_include_pad=False) * scale
    return F.interpolate(small, size=shape, mode="bilinear", align_corners=False)[0]


def voc_images(voc: Path, n: int, short: int = 160) -> list[np.ndarray]:
    """The first ``n`` images of the ``voc`` root, resized to a ``short`` side (a fast test)."""
    root = voc / "VOCdevkit" / "VOC2012" / "JPEGImages"
    out = []
    for path in sorted(root.glob("*.jpg"))[:n]:
        with Image.open(path) as img:
            w, h = img.size
            scale = short / min(w, h)
            out.append(np.asarray(img.convert("RGB").resize((round(w * scale), round(h * scale)))))
    return out


def assert_matches_reference(ours: np.ndarray, ref: np.ndarray) -> None:
    """The issue's tolerance: mean |difference| <= 1e-3, >= 99.9 % identical argmax."""
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() <= 1e-3
    assert (ours.argmax(0) == ref.argmax(0)).mean() >= 0.999


def test_defaults_are_the_specified_values() -> None:
    cfg = CRFConfig()
    assert cfg.iterations == 10
    assert (cfg.gaussian_sxy, cfg.gaussian_compat) == (1.0, 3.0)
    assert (cfg.bilateral_sxy, cfg.bilateral_srgb, cfg.bilateral_compat) == (67.0, 3.0, 4.0)


@needs_reference
def test_matches_pydensecrf_on_a_synthetic_edge() -> None:
    image, logits, _ = two_region_case()
    ours, ref = dense_crf(image, logits), dense_crf_reference(image, logits)
    assert_matches_reference(ours, ref)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@needs_reference
def test_matches_pydensecrf_on_voc_images_at_21_labels(shared_data) -> None:
    for i, image in enumerate(voc_images(shared_data("VOC2012"), 3)):
        logits = smooth_logits(image.shape[:2], 21, seed=i)
        ref = dense_crf_reference(image, logits)
        for floor in (0.0, CRFConfig().label_floor):
            assert_matches_reference(dense_crf(image, logits, CRFConfig(label_floor=floor)), ref)


@needs_reference
def test_matches_pydensecrf_on_primaps_pseudo_labels(shared_data) -> None:
    """The path of :func:`unseg.proposals.primaps.pseudo_labels_one`: proposals on stand-in
    features (patch colours and positions), their log-probabilities upsampled to the image."""
    cfg = PriMaPsConfig()
    for image in voc_images(shared_data("VOC2012"), 2):
        rgb = torch.from_numpy(image.copy()).permute(2, 0, 1).float()[None] / 255
        patches = F.avg_pool2d(rgb, 8)[0]
        gen = torch.Generator().manual_seed(0)
        feats = torch.einsum("chw,cd->dhw", patches, torch.randn(3, 24, generator=gen))
        log_probs = proposal_log_probs(principal_masks(feats, cfg).masks, cfg)
        assert log_probs.shape[0] >= 2
        up = F.interpolate(log_probs[None], size=image.shape[:2], mode="bilinear",
                           align_corners=False)[0]
        assert_matches_reference(dense_crf(image, up), dense_crf_reference(image, up))


def test_crf_sharpens_a_blurred_unary_along_the_colour_edge() -> None:
    image, logits, truth = two_region_case()
    before = (logits.argmax(0).numpy() == truth).mean()
    q = dense_crf(image, logits)
    assert q.shape == (2, 48, 64) and q.dtype == np.float32
    assert before < 0.91
    assert (q.argmax(0) == truth).mean() > 0.98
    p = torch.softmax(logits, 0).numpy()
    assert np.abs(q - 0.5).mean() > np.abs(p - 0.5).mean()  # more confident than the unary


def test_marginals_are_distributions_and_ignore_a_constant_shift(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    logits = smooth_logits((30, 41), 5, seed=3, scale=4.0)
    q = dense_crf(image, logits)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert (q >= 0).all()
    np.testing.assert_allclose(dense_crf(image, logits + 7.5), q, atol=1e-5)


def test_one_label_is_certain_and_labels_are_exchangeable(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(dense_crf(image, torch.randn(1, 5, 6)), 1.0)
    logits = smooth_logits((20, 24), 4, seed=1, scale=4.0)
    perm = torch.tensor([2, 0, 3, 1])
    np.testing.assert_allclose(dense_crf(image, logits[perm]), dense_crf(image, logits)[perm],
                               atol=1e-6)


def test_no_iterations_is_the_softmax(rng: np.random.Generator) -> None:
    image = rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    logits = torch.randn(3, 16, 18)
    q = dense_crf(image, logits, CRFConfig(iterations=0))
    np.testing.assert_allclose(q, torch.softmax(logits, 0).numpy(), atol=1e-6)


def test_a_batch_gives_what_one_image_at_a_time_gives() -> None:
    image, logits, _ = two_region_case()
    images = [image, np.ascontiguousarray(image[:, ::-1]), image[:40, :50].copy()]
    logit_maps = [logits, logits.flip(-1), torch.cat([logits, -logits])[:, :40, :50]]
    batched = dense_crf_batch(images, logit_maps)
    for img, lg, got in zip(images, logit_maps, batched, strict=True):
        np.testing.assert_allclose(got, dense_crf(img, lg), atol=1e-6)
    with CRFPool(2) as pool:  # the in-process runner of the pipelines gives the same
        for a, b in zip(pool.map(images, logit_maps), batched, strict=True):
            np.testing.assert_array_equal(a, b)


def test_images_of_one_size_share_the_gaussian_kernel_and_get_the_same_marginals() -> None:
    from unseg.refine import crf

    image, logits, _ = two_region_case()
    other, other_logits = image[:40, :50].copy(), logits[:, :40, :50].contiguous()
    crf.clear_kernel_cache()
    fresh = dense_crf(image, logits)
    fresh_other = dense_crf(other, other_logits)
    assert crf._gaussian_kernel.cache_info().misses == 2
    again = dense_crf(image, -logits)  # same size, other values: the kernel is reused
    assert crf._gaussian_kernel.cache_info().hits == 1
    crf.clear_kernel_cache()
    assert crf._gaussian_kernel.cache_info().currsize == 0
    np.testing.assert_array_equal(again, dense_crf(image, -logits))
    np.testing.assert_array_equal(fresh, dense_crf(image, logits))
    np.testing.assert_array_equal(fresh_other, dense_crf(other, other_logits))


def test_the_label_floor_leaves_unused_labels_their_unary_probability() -> None:
    image, logits, _ = two_region_case()
    faint = torch.full((3, 48, 64), -20.0)  # three labels at probability ~1e-9 everywhere
    all_logits = torch.cat([logits, faint])
    full = dense_crf(image, all_logits, CRFConfig(label_floor=0.0))
    kept = dense_crf(image, all_logits, CRFConfig(label_floor=0.01))
    np.testing.assert_allclose(kept.sum(0), 1.0, atol=1e-5)
    unary = torch.softmax(all_logits, 0).numpy()
    np.testing.assert_allclose(kept[2:], unary[2:], rtol=1e-5)
    np.testing.assert_allclose(kept, full, atol=1e-6)
    np.testing.assert_array_equal(kept.argmax(0), full.argmax(0))


def test_a_floor_above_every_label_keeps_the_most_probable_one() -> None:
    image, logits, _ = two_region_case()
    logits = logits + torch.tensor([0.5, 0.0])[:, None, None]  # label 0 peaks higher
    q = dense_crf(image, logits, CRFConfig(label_floor=2.0))
    unary = torch.softmax(logits, 0).numpy()
    np.testing.assert_allclose(q[1], unary[1], rtol=1e-5)  # left out: its unary probability
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 15, 16, 21])
def test_the_row_softmax_is_scipys(k: int, rng: np.random.Generator) -> None:
    """Both of its branches (spelled out below 16 labels, torch's from 16), with an infinite
    energy (a padding label) in every row."""
    from scipy.special import softmax

    x = rng.normal(0, 20, (300, k)).astype(np.float32)
    if k > 1:
        x[:, -1] = -np.inf
    got = _row_softmax(torch.from_numpy(x.copy()))
    np.testing.assert_allclose(got.numpy(), softmax(x.astype(np.float64), axis=1), atol=1e-6)


def test_the_lattice_blurs_like_a_gaussian_of_unit_width() -> None:
    """The permutohedral filter of an impulse on a dense 1-D grid against the Gaussian
    ``exp(-x^2 / 2)`` it approximates (independent of densecrf): the same shape, in range."""
    x = torch.arange(-12.0, 13.0)[:, None] / 2.0  # points half a unit apart
    lattice = build_lattice(x)
    impulse = (x[:, 0] == 0).float()[:, None]
    response = lattice.filter(impulse)[:, 0]
    gauss = torch.exp(-x[:, 0] ** 2 / 2)
    corr = torch.corrcoef(torch.stack([response, gauss]))[0, 1]
    assert corr > 0.98
    assert response.argmax() == 12 and torch.all(response >= 0)
    torch.testing.assert_close(lattice.filter(2 * impulse)[:, 0], 2 * response)  # linear


def test_images_never_share_lattice_vertices() -> None:
    feats = torch.rand(50, 3)
    batch = torch.cat([torch.zeros(25), torch.ones(25)]).long()
    lattice = build_lattice(feats, batch)
    values = torch.cat([torch.ones(25, 1), torch.zeros(25, 1)])
    out = lattice.filter(values)
    assert torch.all(out[25:] == 0) and torch.all(out[:25] > 0)


def test_gradients_reach_the_unary() -> None:
    image, logits, _ = two_region_case(width=24, edge=12)
    unary = (-torch.log_softmax(logits[:, :20, :24], 0)).requires_grad_(True)
    q = crf_marginals([image[:20, :24]], [unary], CRFConfig(iterations=3))[0]
    (q[1] * torch.linspace(0, 1, 24)).sum().backward()
    assert unary.grad is not None and torch.isfinite(unary.grad).all()
    assert unary.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_what_the_cpu_gives() -> None:
    image, logits, _ = two_region_case()
    unary = -torch.log_softmax(logits, 0)
    cpu = crf_marginals([image], [unary])[0]
    gpu = crf_marginals([image], [unary.cuda()])[0]
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_clear_errors() -> None:
    image, logits, _ = two_region_case()
    with pytest.raises(UnsegError, match="uint8"):
        dense_crf(image.astype(np.float32), logits)
    with pytest.raises(UnsegError, match=r"\[K, h, w\]"):
        dense_crf(image, logits[0])
    with pytest.raises(UnsegError, match="2 images but 1"):
        dense_crf_batch([image, image], [logits])
    with pytest.raises(UnsegError, match="image's size"):
        crf_marginals([image], [logits[:, :10]])


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Python's own Ctrl-C handler for the test, whatever the runner started with: a background
    job of a non-interactive shell (``make test &`` in a script, ``nohup``) starts with SIGINT
    ignored, and then a SIGINT to ourselves would do nothing (docs/troubleshooting.md)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="no SIGINT here")
def test_an_interrupt_during_a_map_starts_no_more_items(ctrl_c: None) -> None:
    """Ctrl-C while the threads work: the caller gets the KeyboardInterrupt, the items not yet
    started never start, and the threads are left (each finishes the one item it runs)."""
    started: list[int] = []
    release = threading.Event()

    def slow(i: int) -> int:
        started.append(i)
        release.wait(30)
        return i

    def interrupt() -> None:
        while len(started) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), CRFPool(2) as pool:
        pool.map_fn(slow, list(range(20)))
    release.set()
    time.sleep(0.2)
    assert sorted(started) == [0, 1]


def test_an_error_in_one_item_is_raised_and_the_rest_are_dropped() -> None:
    def fail_on_three(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with CRFPool(2) as pool:
        with pytest.raises(ValueError, match="item 3"):
            pool.map_fn(fail_on_three, list(range(8)))
        assert pool.map_fn(fail_on_three, [0, 1, 2]) == [0, 1, 2]  # the pool goes on


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="no SIGINT here")
def test_leaving_the_pool_by_an_exception_stops_a_running_crf(ctrl_c: None) -> None:
    """The CRF a thread runs stops at its next iteration once the pool is left by an
    exception (a Ctrl-C exits promptly, not after the images in flight)."""
    image, logits, _ = two_region_case()
    seen: list[BaseException] = []

    def crf_until_stopped(_: int) -> None:
        try:
            dense_crf(image, logits, CRFConfig(iterations=10**6))
        except BaseException as exc:
            seen.append(exc)
            raise

    with pytest.raises(KeyboardInterrupt), CRFPool(2) as pool:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        pool.map_fn(crf_until_stopped, [0, 1])
    for _ in range(600):
        if len(seen) == 2:
            break
        time.sleep(0.1)
    assert len(seen) == 2 and all(type(e).__name__ == "_Stopped" for e in seen)
