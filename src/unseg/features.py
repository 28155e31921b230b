"""Batched dense-feature extraction with a content-addressed on-disk cache and torchrun sharding.

Images are resized to the working resolution :mod:`unseg.data.resize` defines (short side
``size``, long side at most ``max_side``, sides multiples of the backbone stride; ``crop=True``:
a centre square); a big JPEG is decoded at a reduced DCT scale that is still at least that size,
so no image is ever held at full resolution here. Files over ``max_pixels`` (see
:func:`unseg.data.image.pixel_limit`) are reported as failures.
Decoding and resizing run in DataLoader workers; images of the same resized shape are batched.

The cache (:mod:`unseg.feature_store`) lives in ``cache_dir/<key>/``, ``key`` hashing the
setting (backbone, tap, weights sha256, size, max_side, crop, kind, dtype); each image's tensors are
safetensors files named by the sha256 of the image file's bytes, written atomically, so an
interrupted run resumes where it stopped and a second run computes nothing.

What later stages need of an image is computed in the same pass (``extras``), so the image is
decoded once: ``"flipped"``, the features of its mirror image flipped back (flip-averaged
prediction); ``"image"``, the resized uint8 image ``[3, H', W']`` (PriMaPs, CRF, guided filter,
the saliency head); ``"student"``, the features of PriMaPs-EM's student view
(:func:`unseg.data.transforms.student_view`, seeded by ``student_seed`` and the image's hash).
Each is cached as ``<sha256>.<extra>.safetensors`` beside the features; a batch runs through
the backbone only for the tensors its images' cache lacks (a new ``student_seed`` on a cached
folder computes the student views alone, not the features and mirror images again). The
batches are planned over all the images, cached or not, and a batch computes what any of its
images lacks, since a backbone's results depend on the batch: a run resumed after a kill
recomputes the batch the kill cut short whole, and gets the features of an uninterrupted run to
the last bit.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unseg.backbones import create_backbone
from unseg.backbones.base import Backbone, FeatureKind
from unseg.data.datasets import resolve_inputs
from unseg.data.image import image_size, load_image
from unseg.data.memory import pixels_sha256
from unseg.data.resize import decode_size, prepare_image, resize_image, target_size
from unseg.data.transforms import student_view
from unseg.errors import InputFileError, UnsegError
from unseg.feature_store import (
    EXTRAS,
    FeatureRecord,
    FeatureSet,
    cache_key,
    cache_setting,
    cached_shape,
    file_name,
    load_cache,
    merge_index,
    remove_stale_temps,
    save_tensor,
)
from unseg.utils import dist
from unseg.utils.allocator import release_freed_memory
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, resolve_device
from unseg.utils.hashing import file_sha256
from unseg.utils.progress import progress_bar
from unseg.utils.timing import Timings

logger = logging.getLogger(__name__)

# the cache's types and the image-resizing helpers stay importable from here, where callers
# have long found them
__all__ = [
    "EXTRAS",
    "FeatureRecord", "FeatureSet", "cache_key", "cache_setting", "extract_dataset",
    "extract_features", "load_cache", "prepare_image", "resize_image", "target_size",
]

@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    sha256: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    pixels: np.ndarray | None = None  # an in-memory image (uint8 [H, W, 3]) instead of a file


@dataclass(frozen=True)
class _Resize:
    """The working resolution's settings (see :mod:`unseg.data.resize`) and the pixel limit."""

    size: int
    stride: int
    crop: bool
    max_side: int | None
    max_pixels: int | None

    def target(self, height: int, width: int) -> tuple[int, int]:
        """The working ``(H, W)`` of an ``height x width`` image."""
        return target_size(height, width, self.size, self.stride, self.crop, self.max_side)


class _ImageDataset(Dataset):
    """Decodes and resizes the images of ``items``; bad files come back as an error string."""

    def __init__(self, items: list[_Item], resize: _Resize) -> None:
        self.items = items
        self.resize = resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item, r = self.items[i], self.resize
        if item.pixels is not None:
            return i, resize_image(item.pixels, r.size, r.stride, r.crop, r.max_side), None
        need = decode_size(*item.original_size, r.size, r.stride, r.crop, r.max_side)
        try:
            decoded = load_image(item.path, r.max_pixels, need)
        except UnsegError as exc:
            return i, None, getattr(exc, "problem", str(exc))
        if not _scaled_from(decoded.shape[:2], item.original_size):
            return i, None, f"decoded size {decoded.shape[:2]} differs from its header"
        image = resize_image(decoded, r.size, r.stride, r.crop, r.max_side,
                             source_size=item.original_size)
        return i, image, None


def _scaled_from(decoded: tuple[int, int], original: tuple[int, int]) -> bool:
    """``decoded`` ``(H, W)`` is ``original`` at one of the JPEG decoder's scales (1 to 1/8)."""
    h, w = original
    return any(decoded == (-(-h // s), -(-w // s)) for s in (1, 2, 4, 8))


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, err in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def _shape_batches(items: list[_Item], batch_size: int) -> list[list[int]]:
    """Indices into ``items`` grouped by resized shape, chunked to ``batch_size``."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[item.image_size].append(i)
    return [
        idx[k : k + batch_size]
        for _, idx in sorted(groups.items())
        for k in range(0, len(idx), batch_size)
    ]


def _default_workers(n_items: int) -> int:
    """No workers for one or two images; else the CPUs this rank may use, less one, at most 8."""
    if n_items <= 2:
        return 0
    return max(1, min(8, cpu_count() // dist.world_size() - 1))


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """The decoding workers' multiprocessing context: the process's default (None), unless a
    pool library made its own the default here (joblib's loky workers, whose processes the
    DataLoader cannot start: "'Process' object has no attribute 'env'"); then the platform's."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method is None or method in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])


def _scan(
    paths: Sequence[Path], resize: _Resize, arrays: Mapping[Path, np.ndarray]
) -> tuple[list[_Item], list[tuple[Path, str]]]:
    """Read the header of each file and hash it (an in-memory image of ``arrays``: its pixels);
    unusable ones are returned as failures."""
    items: list[_Item] = []
    failed: list[tuple[Path, str]] = []
    for i, path in enumerate(paths):
        pixels = arrays.get(path)
        if pixels is not None:
            h, w = pixels.shape[:2]
            items.append(_Item(i, path, pixels_sha256(pixels), (h, w), resize.target(h, w),
                               pixels))
            continue
        try:
            h, w = image_size(path, resize.max_pixels)
            sha = file_sha256(path)
        except InputFileError as exc:
            failed.append((path, exc.problem))
            continue
        except OSError as exc:
            failed.append((path, f"cannot read the file ({exc.strerror or exc})"))
            continue
        items.append(_Item(i, path, sha, (h, w), resize.target(h, w)))
    return items, failed


@torch.inference_mode()
def extract_features(
    paths: Sequence[str | Path],
    backbone: Backbone,
    *,
    size: int = 320,
    kind: FeatureKind = "tokens",
    batch_size: int = 8,
    crop: bool = False,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    num_workers: int | None = None,
    report: BatchReport | None = None,
    extras: Sequence[str] = (),
    student_seed: int = 0,
    shard: bool = True,
    timings: Timings | None = None,
    max_side: int | None = None,
    max_pixels: int | None = None,
    arrays: Mapping[Path, np.ndarray] | None = None,
) -> FeatureSet:
    """Dense features ``[C, H'/stride, W'/stride]`` of every image in ``paths``, and the
    ``extras`` (see the module docstring) computed in the same pass.

    The model runs on the backbone's device (float16 ``dtype`` uses autocast on CUDA; on CPU the
    model runs in float32 and features are stored as ``dtype``). Bad files are recorded in
    ``report`` and skipped. Under torchrun (process group initialised, see
    :mod:`unseg.utils.dist`) each rank computes its shard and all ranks return the same set;
    ``shard=False``: this rank works alone on ``paths`` (already its own share). ``timings``
    receives the seconds spent decoding (hashing, reading, resizing), in the backbone and
    writing the cache. ``max_side``: the working resolution's long-side limit (None: none;
    see :func:`unseg.data.resize.resolve_max_side` for the commands' default); ``max_pixels``:
    the per-file pixel limit (None: Pillow's, 0: none). ``arrays``: in-memory images (uint8
    ``[H, W, 3]``) standing for the entries of ``paths`` they are keyed by (no file is read for
    them; their hash is :func:`unseg.data.memory.pixels_sha256`'s).
    """
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise UnsegError(f"unknown feature extras {unknown}; choose from {', '.join(EXTRAS)}")
    if batch_size < 1:
        raise UnsegError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise UnsegError(f"--workers must be at least 0 (0: load in the main process), got "
                         f"{num_workers}")
    timings = timings if timings is not None else Timings()
    report = report if report is not None else BatchReport()
    paths = [Path(p) for p in paths]
    names = ("features", *extras)
    stride = backbone.stride
    device = next(backbone.parameters()).device
    rank, world = (dist.rank(), dist.world_size()) if shard else (0, 1)
    if world > 1 and cache_dir is None:
        raise UnsegError("a multi-process run needs a cache_dir to share the features through")
    resize = _Resize(size, stride, crop, None if crop else max_side, max_pixels)
    setting = cache_setting(backbone, size, crop, kind, dtype, resize.max_side)
    cache = Path(cache_dir) / cache_key(setting) if cache_dir is not None else None
    if cache is not None and rank == 0:
        remove_stale_temps(cache)  # those of a run killed mid-write

    mine = dist.shard(list(range(len(paths))), rank, world)
    with timings.stage("decode"):
        items, failed = _scan([paths[i] for i in mine], resize, arrays or {})
    items = [
        _Item(mine[it.index], it.path, it.sha256, it.original_size, it.image_size, it.pixels)
        for it in items
    ]
    # planned over all the images, cached or not: a resumed run recomputes the batch a kill cut
    # short whole, as an uninterrupted run computed it (see the module docstring)
    todo: dict[tuple[str, ...], list[list[_Item]]] = defaultdict(list)  # missing -> batches
    lacking: set[int] = set()  # the images with something missing (the others: cached)
    for batch in _shape_batches(items, batch_size):
        lacks = {items[i].index: [
            n for n in names
            if cache is None or not (cache / file_name(items[i].sha256, n, student_seed)).is_file()
        ] for i in batch}
        missing = tuple(n for n in names if any(n in m for m in lacks.values()))
        if missing:
            todo[missing].append([items[i] for i in batch])
            lacking.update(i for i, m in lacks.items() if m)
    feats: dict[int, tuple[dict[str, torch.Tensor], tuple[int, int, int] | None]] = {}
    for missing, batches in todo.items():
        job = _Job(backbone, device, resize, kind, dtype, missing, student_seed)
        done, bad = _compute(batches, job, cache, num_workers, timings)
        feats.update(done)
        failed += bad
    local = {
        "items": [(replace(it, pixels=None), feats[it.index][1] if it.index in feats else None)
                  for it in items],
        "failed": [(str(p), m) for p, m in failed],
        "computed": len(lacking.intersection(feats)),
    }
    gathered = dist.all_gather_objects(local) if shard else [local]

    records: dict[int, tuple[Path, FeatureRecord]] = {}
    failures: dict[Path, str] = {}
    computed = 0
    for part in gathered:
        computed += part["computed"]
        failures.update({Path(p): m for p, m in part["failed"]})
        for it, shape in part["items"]:
            if Path(it.path) in failures:
                continue
            if shape is None:
                shape = cached_shape(cache, it.sha256)
            records[it.index] = (
                it.path, FeatureRecord(it.sha256, it.original_size, it.image_size, shape)
            )
    for p in paths:
        if p in failures:
            report.fail(p, failures[p])
    ordered = {records[i][0]: records[i][1] for i in sorted(records)}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    if cache is None:
        # normal tensors, as the cache's are: a fit may train on them (autograd refuses
        # inference tensors)
        with torch.inference_mode(False):
            for i, (_, rec) in records.items():
                tensors.update({(rec.sha256, n): t.clone() for n, t in feats[i][0].items()})
    else:
        if rank == 0:
            merge_index(cache / "index.json", setting, ordered)
        report.written.extend(cache / f"{r.sha256}.safetensors" for r in ordered.values())
    if shard:
        dist.barrier()
    stats = {
        "images": len(paths),
        "computed": computed,
        "cached": len(ordered) - computed,
        "failed": len(failures),
    }
    return FeatureSet(ordered, report, cache, tensors, stats, student_seed, device)


@dataclass(frozen=True)
class _Job:
    """What one extraction computes: the model and the image settings, and the tensors
    (``"features"`` and extras) to compute."""

    backbone: Backbone
    device: torch.device
    resize: _Resize
    kind: FeatureKind
    dtype: torch.dtype
    names: tuple[str, ...]
    student_seed: int


def _student_views(images: torch.Tensor, items: list[_Item], seed: int) -> torch.Tensor:
    """PriMaPs-EM's student view of each image ``[B, 3, H, W]`` in ``[0, 1]``, seeded by
    ``seed`` and the image's content hash (the same view whatever the batch or the rank)."""
    views = []
    for x, item in zip(images, items, strict=True):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(item.sha256[:12], 16))
        views.append(student_view(x, gen))  # on the images' device: the draws are scalars
    return torch.stack(views)


def _forward(job: _Job, images: torch.Tensor, items: list[_Item]) -> dict[str, torch.Tensor]:
    """``job.names`` of the batch ``images [B, 3, H, W]`` (uint8): the features, those of the
    mirror images and student views (one forward for all), the images."""
    x = images.to(job.device, non_blocking=True).float().div_(255.0)
    views = {"features": lambda: x, "flipped": lambda: x.flip(-1),
             "student": lambda: _student_views(x, items, job.student_seed)}
    wanted = [n for n in views if n in job.names]
    out: dict[str, torch.Tensor] = {}
    if wanted:
        autocast = job.device.type == "cuda" and job.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(job.device.type, dtype=job.dtype, enabled=autocast):
            f = job.backbone.forward_features(torch.cat([views[n]() for n in wanted]), job.kind)
        for name, chunk in zip(wanted, f.to("cpu", job.dtype).split(x.shape[0]), strict=True):
            out[name] = chunk.flip(-1) if name == "flipped" else chunk
    if "image" in job.names:
        out["image"] = images.cpu()
    return out


def _compute(
    batches: list[list[_Item]],
    job: _Job,
    cache: Path | None,
    num_workers: int | None,
    timings: Timings,
) -> tuple[
    dict[int, tuple[dict[str, torch.Tensor], tuple[int, int, int] | None]], list[tuple[Path, str]]
]:
    """Run the backbone over the ``batches`` (:func:`_shape_batches`'); returns the tensors by
    input index with the features' shape (None when only an image was computed: the cached
    features say it), and the failures. A cached file is not written again."""
    todo = [item for batch in batches for item in batch]
    workers = _default_workers(len(todo)) if num_workers is None else num_workers
    ends = list(accumulate(map(len, batches)))
    loader = DataLoader(
        _ImageDataset(todo, job.resize),
        batch_sampler=[list(range(e - len(b), e)) for b, e in zip(batches, ends, strict=True)],
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=job.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context=_worker_context() if workers > 0 else None,
    )
    out: dict[int, tuple[dict[str, torch.Tensor], tuple[int, int, int] | None]] = {}
    failed: list[tuple[Path, str]] = []

    def save(path: Path, name: str, tensor: torch.Tensor) -> None:
        with timings.stage("writing"):
            save_tensor(path, name, tensor)

    # Cache files are written by one background thread while the model runs on the next batch.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="unseg-cache") as writer,
        progress_bar(len(todo), "features", show=dist.is_main()) as bar,
    ):
        pending: list[Future] = []
        batch_iter = iter(loader)
        while True:
            with timings.stage("decode"):
                batch = next(batch_iter, None)
            if batch is None:
                break
            idx, images, bad = batch
            failed += [(todo[i].path, problem) for i, problem in bad]
            bar.update(len(idx) + len(bad))
            if images is None:
                continue
            with timings.stage("backbone"):
                tensors = _forward(job, images, [todo[i] for i in idx])
            for j, i in enumerate(idx):
                item = todo[i]
                mine = {name: t[j].clone() for name, t in tensors.items()}
                if cache is not None:
                    for name, t in mine.items():
                        path = cache / file_name(item.sha256, name, job.student_seed)
                        if not path.is_file():
                            pending.append(writer.submit(save, path, name, t))
                shape = next((tuple(t.shape) for n, t in mine.items() if n != "image"), None)
                out[item.index] = ({} if cache is not None else mine, shape)
            pending = [p for p in pending if not _done(p)]
            del tensors
            release_freed_memory()
        for p in pending:
            p.result()
    return out, failed


def _done(job: Future) -> bool:
    """True once ``job`` finished; re-raises its exception (a failed cache write stops the run)."""
    if job.done():
        job.result()
        return True
    return False


def extract_dataset(
    data: str | Path,
    out: str | Path,
    *,
    backbone: str,
    weights: str | Path | None = None,
    size: int = 320,
    kind: FeatureKind = "tokens",
    batch_size: int = 8,
    crop: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    num_workers: int | None = None,
    tap: str | None = None,
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> FeatureSet:
    """Cache the features of the images of ``data`` (dataset root, folder or file) under ``out``
    (``tap``: the backbone's feature tap, ``None`` for its default; ``max_side``,
    ``max_pixels``: see :func:`extract_features`).

    Joins the torchrun process group when launched by torchrun (each rank on its own GPU when
    CUDA is used) and leaves it at the end; a single process needs no launcher.
    """
    with dist.joined(resolve_device(device)) as dev:
        model = create_backbone(backbone, weights=weights, device=dev,
                                **({} if tap is None else {"tap": tap}))
        report = BatchReport()
        paths = resolve_inputs(data, report, model.stride)
        refused = len(report.failed)  # by the input rules, before extraction
        fs = extract_features(
            paths, model, size=size, kind=kind, batch_size=batch_size, crop=crop,
            cache_dir=out, dtype=dtype, num_workers=num_workers, max_side=max_side,
            max_pixels=max_pixels, report=report,
        )
        fs.stats.update(images=fs.stats["images"] + refused, failed=fs.stats["failed"] + refused)
        return fs
