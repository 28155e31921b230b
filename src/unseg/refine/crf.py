"""Fully connected CRF (Krähenbühl & Koltun) through ``pydensecrf2``, one image or many in parallel.

The parameters are those of methods.md section 7 (the PriMaPs / MaskContrast reference code):
unary = −log softmax of the logits upsampled bilinearly to the image size, 10 mean-field
iterations, a Gaussian kernel (sxy 1, compatibility 3) and a bilateral kernel (sxy 67, srgb 3,
compatibility 4) on the uint8 RGB image. The reference feeds the image in BGR order; the bilateral
kernel uses one ``srgb`` for all three channels, so the channel order does not change the result.

Many images run in a :class:`CRFPool` of spawn-started worker processes. Ctrl-C, SIGTERM or any
error leaving the pool terminates its workers at once (an interrupted pool is never joined); the
workers ignore SIGINT and die with their parent even on ``kill -9``; a worker killed mid-task
(out of memory) is an :class:`UnsegError`, not a hang.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from unseg.errors import UnsegError
from unseg.utils.signals import children_start_without_sigint, die_with_parent, ignore_sigint

log = logging.getLogger(__name__)
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


def _worker_main(conn: Connection, parent_pid: int) -> None:
    """A pool worker: ``(index, fn, item)`` in, ``(index, ok, fn(item) or the error)`` out, until
    ``None`` or a closed pipe."""
    ignore_sigint()
    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    import pydensecrf.densecrf  # noqa: F401  (load the extension before the first task)

    while True:
        try:
            task = _recv_value(conn)
        except (EOFError, OSError):  # the parent closed the pipe or is gone
            return
        if task is None:
            return
        index, fn, item = task
        try:
            reply = (index, True, fn(item))
        except Exception as exc:
            reply = (index, False, (exc, traceback.format_exc()))
        try:
            try:
                _send_value(conn, reply)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                _send_value(conn, (index, False, (UnsegError(f"unpicklable result: {exc}"), "")))
        except OSError:  # the parent is gone
            return


def _crf_task(args: tuple[np.ndarray, np.ndarray, CRFConfig]) -> np.ndarray:
    image, logits, config = args
    return dense_crf(image, logits, config)


def _send_value(conn: Connection, obj: object) -> None:
    """Send ``obj`` pickled by value.

    ``Connection.send`` pickles with multiprocessing's pickler, for which torch registers
    tensors as shared-memory file descriptors handed over by a background thread of the sender;
    a peer killed in that hand-over makes the thread print a traceback. By value, nothing is
    shared and no such thread runs.
    """
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv_value(conn: Connection) -> Any:
    """The next object sent by :func:`_send_value`."""
    return pickle.loads(conn.recv_bytes())


class _RemoteTraceback(Exception):
    """The traceback text of an error raised in a worker (the ``__cause__`` of the re-raise)."""


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Child processes started in the block run torch, OpenMP and BLAS on one thread."""
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update(dict.fromkeys(_SINGLE_THREAD_ENV, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _died(proc: BaseProcess) -> UnsegError:
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (out of memory?)"
    return UnsegError(f"a CRF/refinement worker process died ({how})")


class CRFPool:
    """A reusable pool of ``num_workers`` spawn-started processes that run :func:`dense_crf`.

    Use as a context manager; with ``num_workers <= 1`` everything runs in this process. Each
    worker runs single-threaded (torch, OpenMP and BLAS), so that the processes do not fight
    over the cores.

    Shutdown: leaving the block normally stops the idle workers and joins them. Leaving it by an
    exception (``KeyboardInterrupt`` from Ctrl-C, ``Terminated`` from SIGTERM, any error)
    terminates them at once (SIGTERM, then SIGKILL after :attr:`GRACE_S`), whatever they are
    running: an interrupted pool is never waited for. Workers ignore SIGINT (a terminal's Ctrl-C
    reaches the whole process group: the parent decides) and die with the parent, even on
    ``kill -9`` (:func:`unseg.utils.signals.die_with_parent`). A worker that dies mid-task (the
    kernel's out-of-memory killer) is a clear :class:`UnsegError`, never a hang. The pool must
    be entered and left in the same thread, one that outlives it (on Linux a worker dies with
    the thread that started it).
    """

    GRACE_S = 5.0

    def __init__(self, num_workers: int = 1, config: CRFConfig | None = None) -> None:
        self.num_workers = max(1, int(num_workers))
        self.config = config or CRFConfig()
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []

    def __enter__(self) -> CRFPool:
        if self.num_workers > 1:
            ctx = multiprocessing.get_context("spawn")
            try:
                with _single_threaded_children(), children_start_without_sigint():
                    for _ in range(self.num_workers):
                        mine, theirs = ctx.Pipe()
                        proc = ctx.Process(target=_worker_main, args=(theirs, os.getpid()),
                                           daemon=True, name="unseg-crf")
                        self._conns.append(mine)
                        self._procs.append(proc)
                        proc.start()
                        theirs.close()
            except BaseException:
                self._stop(now=True)
                raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._stop(now=exc_type is not None)

    def _stop(self, now: bool) -> None:
        """Stop the workers: idle ones by a ``None`` task, or, with ``now`` (and for those still
        running :attr:`GRACE_S` later), by SIGTERM, then by SIGKILL; every wait is bounded."""
        procs, conns = self._procs, self._conns
        self._procs, self._conns = [], []
        started = [p for p in procs if p.pid is not None]
        if not now:
            for conn in conns:
                try:
                    _send_value(conn, None)
                except OSError:
                    pass
            self._join(started)
        for stop in (BaseProcess.terminate, BaseProcess.kill):
            running = [p for p in started if p.exitcode is None]
            if not running:
                break
            log.debug("CRF pool: %s %s", stop.__name__, [p.pid for p in running])
            for proc in running:
                stop(proc)
            self._join(running)
        for conn in conns:
            conn.close()
        for proc in started:
            if proc.exitcode is not None:
                proc.close()

    def _join(self, procs: Sequence[BaseProcess]) -> None:
        """Join ``procs`` for at most :attr:`GRACE_S` seconds in all."""
        deadline = time.monotonic() + self.GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty when everything runs in this process)."""
        return [p.pid for p in self._procs if p.pid is not None]

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
        """``[fn(item) for item in items]`` across the workers (``fn`` a module-level function).

        One item at a time per worker, results in order. An error raised by ``fn`` in a worker
        is raised here once the other workers' items are done (the worker's traceback text as
        its ``__cause__``). Anything else that interrupts the map (Ctrl-C, SIGTERM, a worker
        that died) terminates the workers at once; the pool then runs in this process.
        """
        if not self._procs:
            return [fn(item) for item in items]
        log.debug("CRF pool: %s on %d item(s), %d worker(s)", getattr(fn, "__name__", fn),
                  len(items), len(self._procs))
        results: dict[int, T] = {}
        failure: tuple[Exception, str] | None = None
        pending = iter(enumerate(items))
        busy: dict[int, int] = {}  # worker -> index of its item
        try:
            for w in range(len(self._procs)):
                self._send(w, fn, pending, busy)
            while busy:
                for w, (index, ok, value) in self._replies(busy):
                    del busy[w]
                    if ok:
                        results[index] = value
                    elif failure is None:
                        failure = value
                    if failure is None:
                        self._send(w, fn, pending, busy)
        except BaseException:
            self._stop(now=True)
            raise
        if failure is not None:
            raise failure[0] from _RemoteTraceback(failure[1])
        return [results[i] for i in range(len(items))]

    def _replies(self, busy: dict[int, int]) -> list[tuple[int, tuple[int, bool, Any]]]:
        """Wait for replies of the ``busy`` workers: ``(worker, (index, ok, value))`` of each
        that answered; a worker that died instead is an :class:`UnsegError`."""
        conns = {self._conns[w]: w for w in busy}
        sentinels = {self._procs[w].sentinel: w for w in busy}
        ready = wait([*conns, *sentinels])
        replies = []
        for w in sorted({conns[r] if r in conns else sentinels[r] for r in ready}):
            conn, proc = self._conns[w], self._procs[w]
            if not conn.poll():  # its sentinel fired and it left no reply
                proc.join(self.GRACE_S)
                raise _died(proc)
            try:
                replies.append((w, _recv_value(conn)))
            except (EOFError, OSError) as exc:  # it died while answering
                proc.join(self.GRACE_S)
                raise _died(proc) from exc
        return replies

    def _send(
        self,
        worker: int,
        fn: Callable[[Any], Any],
        pending: Iterator[tuple[int, Any]],
        busy: dict[int, int],
    ) -> None:
        """Give ``worker`` ``fn`` and the next item of ``pending``, if any; note it in ``busy``."""
        nxt = next(pending, None)
        if nxt is None:
            return
        index, item = nxt
        try:
            _send_value(self._conns[worker], (index, fn, item))
        except OSError as exc:
            raise _died(self._procs[worker]) from exc
        busy[worker] = index


def dense_crf_batch(
    images: Sequence[np.ndarray],
    logits: Sequence[torch.Tensor | np.ndarray],
    config: CRFConfig | None = None,
    num_workers: int = 1,
) -> list[np.ndarray]:
    """:func:`dense_crf` for many images, spread over ``num_workers`` processes."""
    with CRFPool(num_workers, config) as pool:
        return pool.map(images, logits)
