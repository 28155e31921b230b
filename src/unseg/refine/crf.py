"""Fully connected CRF (Krähenbühl & Koltun) through ``pydensecrf2``, one image or many in parallel.

The parameters are those of methods.md section 7 (the PriMaPs / MaskContrast reference code):
unary = −log softmax of the logits upsampled bilinearly to the image size, 10 mean-field
iterations, a Gaussian kernel (sxy 1, compatibility 3) and a bilateral kernel (sxy 67, srgb 3,
compatibility 4) on the uint8 RGB image. The reference feeds the image in BGR order; the bilateral
kernel uses one ``srgb`` for all three channels, so the channel order does not change the result.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError

T = TypeVar("T")
_SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CRFConfig:
    """Dense CRF parameters; the defaults are the reference values."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise UnsegError(f"CRF image must be [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        raise UnsegError(f"CRF image must be uint8 RGB, got {image.dtype}")
    return np.require(image, np.uint8, ["C", "W"])  # pydensecrf needs a writable C array


def dense_crf(
    image: np.ndarray, logits: torch.Tensor | np.ndarray, config: CRFConfig | None = None
) -> np.ndarray:
    """Refine per-class ``logits [K, h, w]`` on ``image`` (uint8 RGB ``[H, W, 3]``).

    Returns the CRF's marginals ``[K, H, W]`` (float32, each pixel sums to 1).
    """
    import pydensecrf.densecrf as dcrf

    config = config or CRFConfig()
    image = _check_image(image)
    height, width = image.shape[:2]
    logits_t = torch.as_tensor(logits, dtype=torch.float32)
    if logits_t.ndim != 3 or logits_t.shape[0] < 1:
        raise UnsegError(f"CRF logits must be [K, h, w], got {tuple(logits_t.shape)}")
    num_labels = logits_t.shape[0]
    up = F.interpolate(logits_t[None], size=(height, width), mode="bilinear", align_corners=False)
    unary = -torch.log_softmax(up[0], dim=0)
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(num_labels, -1).numpy()))
    crf.addPairwiseGaussian(sxy=config.gaussian_sxy, compat=config.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=config.bilateral_sxy,
        srgb=config.bilateral_srgb,
        rgbim=image,
        compat=config.bilateral_compat,
    )
    marginals = crf.inference(config.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def _worker_init() -> None:
    torch.set_num_threads(1)
    import pydensecrf.densecrf  # noqa: F401  (load the extension before the first task)


def _crf_task(args: tuple[np.ndarray, np.ndarray, CRFConfig]) -> np.ndarray:
    image, logits, config = args
    return dense_crf(image, logits, config)


class CRFPool:
    """A reusable pool of ``num_workers`` spawn-started processes that run :func:`dense_crf`.

    Use as a context manager; with ``num_workers <= 1`` everything runs in this process. Each
    worker runs single-threaded (torch, OpenMP and BLAS), so that the processes do not fight
    over the cores.
    """

    def __init__(self, num_workers: int = 1, config: CRFConfig | None = None) -> None:
        self.num_workers = max(1, int(num_workers))
        self.config = config or CRFConfig()
        self._pool: Pool | None = None

    def __enter__(self) -> CRFPool:
        if self.num_workers > 1:
            ctx = multiprocessing.get_context("spawn")
            saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
            os.environ.update(dict.fromkeys(_SINGLE_THREAD_ENV, "1"))
            try:
                self._pool = ctx.Pool(self.num_workers, initializer=_worker_init)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def map(
        self, images: Sequence[np.ndarray], logits: Sequence[torch.Tensor | np.ndarray]
    ) -> list[np.ndarray]:
        """Marginals ``[K_i, H_i, W_i]`` for each ``(image, logits)`` pair, in order."""
        if len(images) != len(logits):
            raise UnsegError(f"{len(images)} images but {len(logits)} logit maps")
        tasks = [
            (_check_image(img), np.asarray(torch.as_tensor(lg, dtype=torch.float32)), self.config)
            for img, lg in zip(images, logits, strict=True)
        ]
        return self.map_fn(_crf_task, tasks)

    def map_fn(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(item) for item in items]`` across the workers (``fn`` a module-level function)."""
        if self._pool is None:
            return [fn(item) for item in items]
        return self._pool.map(fn, items, chunksize=1)


def dense_crf_batch(
    images: Sequence[np.ndarray],
    logits: Sequence[torch.Tensor | np.ndarray],
    config: CRFConfig | None = None,
    num_workers: int = 1,
) -> list[np.ndarray]:
    """:func:`dense_crf` for many images, spread over ``num_workers`` processes."""
    with CRFPool(num_workers, config) as pool:
        return pool.map(images, logits)
