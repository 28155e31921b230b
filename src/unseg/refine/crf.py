"""Fully connected CRF (Krähenbühl & Koltun 2011) in torch, batched, on the tensors' device.

The parameters are those of methods.md section 7 (the PriMaPs / MaskContrast reference code):
unary = −log softmax of the logits upsampled bilinearly to the image size, 10 mean-field
iterations, a Gaussian kernel (sxy 1, compatibility 3) and a bilateral kernel (sxy 67, srgb 3,
compatibility 4) on the uint8 RGB image (the bilateral kernel uses one ``srgb`` for all three
channels, so the channel order does not change the result).

The model and its discretisation are those of ``densecrf`` (the C++ library behind
``pydensecrf``, the reference): each kernel is a permutohedral-lattice filter
(:mod:`unseg.refine.lattice`) that includes a pixel's own value, normalised symmetrically
(``n = 1/sqrt(k * 1)``, message ``n * k(n * Q)``), with Potts compatibility (the message of
label ``l`` is ``w * filtered Q_l``, added to ``−unary``); each iteration is a softmax. Both
lattices are built once per image and reused for every iteration and label.

Only the labels that carry probability in an image take part (:attr:`CRFConfig.label_floor`):
a label whose probability stays below the floor at every pixel keeps its unary probability, and
the others share the rest of each pixel's mass as the CRF over them says.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.refine.lattice import Lattice, build_lattice
from unseg.utils.device import load_cuda_linalg

log = logging.getLogger(__name__)
T = TypeVar("T")
_VECTOR_LABELS = 16  # from this many labels on, torch's own row softmax is the faster
_runner = threading.local()  # .stop: the Event of the CRFPool whose thread this is


class _Stopped(Exception):
    """The CRFPool this thread works for was left by an exception (Ctrl-C, SIGTERM, an error):
    the CRF it runs stops at its next iteration."""


def _check_stopped() -> None:
    stop = getattr(_runner, "stop", None)
    if stop is not None and stop.is_set():
        raise _Stopped


@dataclass(frozen=True)
class CRFConfig:
    """Dense CRF parameters; the defaults are the reference values.

    ``label_floor``: an image's CRF runs over the labels whose probability reaches this value
    at some pixel (0 = every label, exactly the reference). 0.01: k-means' soft probabilities
    on VOC keep every label there (at 0.05 the argmax moved on 1-4 % of pixels; measured in
    docs/pipeline-cost.md); confident maps drop the labels they do not use.
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    label_floor: float = 0.01


def _check_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3:
        raise UnsegError(f"CRF image must be [H, W, 3], got {tuple(image.shape)}")
    if image.dtype not in (np.uint8, torch.uint8):
        raise UnsegError(f"CRF image must be uint8 RGB, got {image.dtype}")
    if isinstance(image, np.ndarray):
        image = np.ascontiguousarray(image)
        return torch.from_numpy(image if image.flags.writeable else image.copy())
    return image


def _pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``[H*W, 2]`` float32 ``(x, y)`` of every pixel, row-major."""
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([xx, yy], -1).reshape(-1, 2)


def _batch_index(sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """``[N]`` int64: the index of the image each pixel of a batch of ``sizes`` belongs to."""
    counts = torch.tensor([h * w for h, w in sizes], device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def _bilateral_features(
    images: Sequence[torch.Tensor], config: CRFConfig, device: torch.device
) -> torch.Tensor:
    """Bilateral features ``[N, 5]`` (``x, y`` over ``sxy``, ``RGB`` over ``srgb``) of all
    pixels of ``images``, row-major, image after image."""
    return torch.cat([
        torch.cat([_pixel_grid(*image.shape[:2], device) / config.bilateral_sxy,
                   image.to(device).reshape(-1, 3).float() / config.bilateral_srgb], 1)
        for image in images
    ])


def _normalised(lattice: Lattice, compat: float) -> Lattice:
    """``compat * n * k(n * Q)`` with ``n = 1 / sqrt(k * 1)`` (densecrf's NORMALIZE_SYMMETRIC
    and Potts weight) as one lattice filter."""
    ones = torch.ones(lattice.num_points, 1, device=lattice.slice_weight.device)
    norm = torch.rsqrt(lattice.filter(ones) + 1e-20)[:, 0]
    return lattice.scaled(norm, compat * norm)


@functools.lru_cache(maxsize=4)
def _gaussian_kernel(
    sizes: tuple[tuple[int, int], ...], sxy: float, compat: float, device: torch.device
) -> Lattice:
    """The normalised Gaussian kernel of a batch of images of ``sizes``: it depends on the
    pixel grid only, so images of one size (a folder of photos from one camera, the features'
    fixed short side) share it; built once per size and kept for the next images."""
    grid = torch.cat([_pixel_grid(h, w, device) for h, w in sizes]) / sxy
    return _normalised(build_lattice(grid, _batch_index(sizes, device)), compat)


def clear_kernel_cache() -> None:
    """Forget the Gaussian kernels kept per image size (their memory; a benchmark's cold start)."""
    _gaussian_kernel.cache_clear()


def _row_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax of each row of ``x [N, K]``. Below 16 labels spelled out: torch's CPU softmax
    over a last dimension shorter than its vector width runs scalar, e.g. at ``[140k, K]`` on
    one thread 13 / 36 ms for K = 5 / 15 against 3 / 7 ms here (about a quarter of a 15-label
    CRF), while from K = 16 on its 3-8 ms beat the spelled-out 7-12 ms."""
    if x.shape[1] >= _VECTOR_LABELS:
        return torch.softmax(x, 1)
    e = (x - x.amax(1, keepdim=True)).exp_()  # exp_ keeps its output for the gradient
    return e / e.sum(1, keepdim=True)


def _kept_labels(probs: torch.Tensor, floor: float) -> torch.Tensor:
    """Indices of the labels of ``probs [K, H, W]`` that reach ``floor`` somewhere (never
    none: the labels at the image's highest probability always take part)."""
    peak = probs.detach().flatten(1).amax(1)
    return torch.nonzero(peak >= min(floor, float(peak.max()))).flatten()


def crf_marginals(
    images: Sequence[np.ndarray | torch.Tensor],
    unaries: Sequence[torch.Tensor],
    config: CRFConfig | None = None,
) -> list[torch.Tensor]:
    """Mean-field marginals ``[K_i, H_i, W_i]`` for each image ``[H_i, W_i, 3]`` (uint8 RGB)
    and unary ``[K_i, H_i, W_i]`` (``−log p``, float), all images in one batch.

    Runs on the unaries' device (the first one's); each pixel's marginals sum to 1.
    """
    config = config or CRFConfig()
    _check_stopped()  # a pool thread left running after an interrupt starts no new CRF
    if len(images) != len(unaries):
        raise UnsegError(f"{len(images)} images but {len(unaries)} unaries")
    if not images:
        return []
    device = unaries[0].device
    imgs = [_check_image(im) for im in images]
    for im, un in zip(imgs, unaries, strict=True):
        if un.ndim != 3 or tuple(un.shape[1:]) != tuple(im.shape[:2]) or un.shape[0] < 1:
            raise UnsegError(
                f"unary {tuple(un.shape)} must be [K, H, W] at the image's size {tuple(im.shape)}"
            )
    # each image's labels that take part; the others keep their unary probability
    probs0 = [torch.softmax(-un.to(device).float(), 0) for un in unaries]
    kept = [_kept_labels(p, config.label_floor) for p in probs0]
    log.debug("CRF labels per image: %s of %s", [int(k.numel()) for k in kept],
              [int(p.shape[0]) for p in probs0])
    width = max(int(k.numel()) for k in kept)
    rows = []
    for un, k in zip(unaries, kept, strict=True):
        u = un.to(device).float()[k].flatten(1).T  # [H*W, K_kept]
        rows.append(F.pad(u, (0, width - u.shape[1]), value=float("inf")))
    unary = torch.cat(rows)  # [N, width]; padding labels have probability 0

    sizes = tuple((int(im.shape[0]), int(im.shape[1])) for im in imgs)
    gauss = _gaussian_kernel(sizes, config.gaussian_sxy, config.gaussian_compat, device)
    _check_stopped()
    bilateral = build_lattice(_bilateral_features(imgs, config, device),
                              _batch_index(sizes, device))
    kernels = [gauss, _normalised(bilateral, config.bilateral_compat)]
    q = _row_softmax(-unary)
    for _ in range(config.iterations):
        _check_stopped()
        energy = kernels[0].filter(q) - unary
        for kernel in kernels[1:]:
            energy += kernel.filter(q)
        q = _row_softmax(energy)

    out = []
    start = 0
    for p0, k in zip(probs0, kept, strict=True):
        height, width_i = p0.shape[1:]
        qi = q[start : start + height * width_i, : k.numel()].T.reshape(-1, height, width_i)
        start += height * width_i
        if k.numel() == p0.shape[0]:
            out.append(qi)
            continue
        marg = p0.clone()
        rest = 1.0 - p0[k].sum(0, keepdim=True)  # the dropped labels' unary mass
        marg[k] = qi * (1.0 - rest)
        out.append(marg)
    return out


def _unary(logits: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``−log softmax`` of ``logits [K, h, w]`` upsampled bilinearly to ``size``."""
    logits_t = torch.as_tensor(logits, dtype=torch.float32)
    if logits_t.ndim != 3 or logits_t.shape[0] < 1:
        raise UnsegError(f"CRF logits must be [K, h, w], got {tuple(logits_t.shape)}")
    up = F.interpolate(logits_t[None], size=size, mode="bilinear", align_corners=False)[0]
    return -torch.log_softmax(up, dim=0)


def crf_probabilities(
    image: np.ndarray | torch.Tensor,
    logits: torch.Tensor | np.ndarray,
    config: CRFConfig | None = None,
) -> torch.Tensor:
    """Refine per-class ``logits [K, h, w]`` on ``image`` (uint8 RGB ``[H, W, 3]``, an array
    or a tensor on any device).

    Returns the CRF's marginals ``[K, H, W]`` (float32, each pixel sums to 1) on the logits'
    device (the CPU for an array): nothing goes through the host.
    """
    img = _check_image(image)
    unary = _unary(logits, tuple(img.shape[:2]))
    return crf_marginals([img], [unary], config)[0]


def dense_crf(
    image: np.ndarray | torch.Tensor,
    logits: torch.Tensor | np.ndarray,
    config: CRFConfig | None = None,
) -> np.ndarray:
    """:func:`crf_probabilities` as a float32 array ``[K, H, W]`` (each pixel sums to 1)."""
    return crf_probabilities(image, logits, config).cpu().numpy()


def dense_crf_reference(
    image: np.ndarray, logits: torch.Tensor | np.ndarray, config: CRFConfig | None = None
) -> np.ndarray:
    """:func:`dense_crf` computed by ``pydensecrf`` (the reference; a dev/test dependency).

    Every label takes part (``label_floor`` is not applied).
    """
    import pydensecrf.densecrf as dcrf

    config = config or CRFConfig()
    img = np.require(_check_image(image).numpy(), np.uint8, ["C", "W"])
    height, width = img.shape[:2]
    unary = _unary(logits, (height, width))
    num_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(num_labels, -1).numpy()))
    crf.addPairwiseGaussian(sxy=config.gaussian_sxy, compat=config.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.bilateral_sxy,
        srgb=config.bilateral_srgb,
        rgbim=img,
        compat=config.bilateral_compat,
    )
    marginals = crf.inference(config.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def _runner_thread(stop: threading.Event) -> None:
    """A runner thread: torch on one thread (the setting is per thread), and ``stop``."""
    torch.set_num_threads(1)
    _runner.stop = stop


def _crf_task(args: tuple[np.ndarray, torch.Tensor | np.ndarray, CRFConfig]) -> np.ndarray:
    return dense_crf(*args)


class CRFPool:
    """Runs per-image refinement (:func:`dense_crf`, or any function) on ``num_workers``
    threads of this process, each running torch on one thread.

    Why threads with one torch thread each rather than one image on all of torch's threads:
    the CRF is many mid-sized ops, and torch's intra-op threads meet at a barrier after each;
    on a machine busier than its cores those barriers cost more than the work (measured: 2
    intra-op threads 7x slower than 1 at load 19 on 2 cores; docs/pipeline-cost.md). No
    processes: nothing to orphan, and Ctrl-C is an ordinary ``KeyboardInterrupt`` in the
    calling thread. Leaving the block by an exception drops the items not started and stops
    the CRFs running at their next mean-field iteration.
    """

    def __init__(self, num_workers: int = 1, config: CRFConfig | None = None) -> None:
        self.num_workers = max(1, int(num_workers))
        self.config = config or CRFConfig()
        self._executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def __enter__(self) -> CRFPool:
        if self.num_workers > 1:
            self._stop = threading.Event()
            self._executor = ThreadPoolExecutor(self.num_workers, "unseg-crf",
                                                initializer=_runner_thread,
                                                initargs=(self._stop,))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            if exc_type is not None:
                self._stop.set()
            # wait even when leaving by an exception: the running CRFs stop at their next
            # iteration, and a thread still running after the caller's exit message would
            # log (or write) after it
            executor.shutdown(wait=True, cancel_futures=True)

    def map(
        self, images: Sequence[np.ndarray], logits: Sequence[torch.Tensor | np.ndarray]
    ) -> list[np.ndarray]:
        """Marginals ``[K_i, H_i, W_i]`` for each ``(image, logits)`` pair, in order."""
        if len(images) != len(logits):
            raise UnsegError(f"{len(images)} images but {len(logits)} logit maps")
        return self.map_fn(_crf_task, [(im, lg, self.config)
                                       for im, lg in zip(images, logits, strict=True)])

    def map_fn(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(item) for item in items]``, across the threads; the first error is raised
        once the items already running are done (the rest are not started)."""
        log.debug("CRF: %s on %d item(s)", getattr(fn, "__name__", fn), len(items))
        if self._executor is None or len(items) <= 1:
            return [fn(item) for item in items]
        load_cuda_linalg()  # the items may call torch.linalg on a GPU, each in its own thread
        futures = [self._executor.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def dense_crf_batch(
    images: Sequence[np.ndarray],
    logits: Sequence[torch.Tensor | np.ndarray],
    config: CRFConfig | None = None,
    num_workers: int = 1,
) -> list[np.ndarray]:
    """:func:`dense_crf` for many images: one batch (``num_workers <= 1``), or one image at a
    time on ``num_workers`` threads (:class:`CRFPool`)."""
    if len(images) != len(logits):
        raise UnsegError(f"{len(images)} images but {len(logits)} logit maps")
    if num_workers > 1:
        with CRFPool(num_workers, config) as pool:
            return pool.map(images, logits)
    imgs = [_check_image(im) for im in images]
    unaries = [_unary(lg, tuple(im.shape[:2])) for im, lg in zip(imgs, logits, strict=True)]
    return [q.cpu().numpy() for q in crf_marginals(imgs, unaries, config)]
