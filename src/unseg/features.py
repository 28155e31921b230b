"""Batched dense-feature extraction with a content-addressed on-disk cache and torchrun sharding.

Images are resized as :mod:`unseg.data.resize` says (short side ``size``, sides multiples of
the backbone stride; ``crop=True``: a centre square).
Decoding and resizing run in DataLoader workers; images of the same resized shape are batched.

The cache lives in ``cache_dir/<key>/`` where ``key`` hashes (backbone name, weights sha256,
size, crop, kind, dtype); each image's features are one safetensors file named by the sha256 of
the image file's bytes, written atomically, so an interrupted run resumes where it stopped and a
second run computes nothing. ``index.json`` beside them maps image paths to their entries.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from unseg.backbones import backbone_weights_sha256, create_backbone
from unseg.backbones.base import Backbone, FeatureKind
from unseg.data.datasets import dataset_images
from unseg.data.image import load_image
from unseg.data.resize import prepare_image, resize_image, target_size
from unseg.errors import UnsegError
from unseg.utils import dist
from unseg.utils.batch import BatchReport
from unseg.utils.device import cpu_count, resolve_device
from unseg.utils.hashing import file_sha256, settings_key
from unseg.utils.io import atomic_write, write_json_atomic
from unseg.utils.progress import progress

logger = logging.getLogger(__name__)

# the image-resizing helpers stay importable from here, where callers have long found them
__all__ = [
    "FeatureRecord", "FeatureSet", "cache_key", "cache_setting", "extract_dataset",
    "extract_features", "load_cache", "prepare_image", "resize_image", "target_size",
]

CACHE_FORMAT = 2  # 2: images resized in uint8
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FeatureRecord:
    """One image's entry: content hash, original and resized image size, feature shape."""

    sha256: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]
    feature_shape: tuple[int, int, int]

    def to_json(self) -> dict:
        """A JSON-friendly dict."""
        return {
            "sha256": self.sha256,
            "original_size": list(self.original_size),
            "image_size": list(self.image_size),
            "feature_shape": list(self.feature_shape),
        }

    @classmethod
    def from_json(cls, d: dict) -> FeatureRecord:
        """Inverse of :meth:`to_json`."""
        return cls(
            d["sha256"],
            tuple(d["original_size"]),
            tuple(d["image_size"]),
            tuple(d["feature_shape"]),
        )


class FeatureSet(Mapping[Path, torch.Tensor]):
    """Mapping image path → features ``[C, h, w]``, loaded lazily from the cache when cached.

    ``paths`` are the images that succeeded, in input order; ``report`` lists the failures.
    """

    def __init__(
        self,
        records: dict[Path, FeatureRecord],
        report: BatchReport,
        cache_dir: Path | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        stats: dict[str, int] | None = None,
    ) -> None:
        self._records = records
        self.report = report
        self.cache_dir = cache_dir
        self._tensors = tensors or {}
        self.stats = stats or {}

    @property
    def paths(self) -> list[Path]:
        """Images with features, in input order."""
        return list(self._records)

    def record(self, path: str | Path) -> FeatureRecord:
        """The entry of ``path`` (KeyError if it failed or was not requested)."""
        return self._records[Path(path)]

    def shape_of(self, path: str | Path) -> tuple[int, int, int]:
        """Feature shape ``(C, h, w)`` of ``path`` without loading it."""
        return self.record(path).feature_shape

    def image_size(self, path: str | Path) -> tuple[int, int]:
        """``(H, W)`` of the resized image the features were computed on."""
        return self.record(path).image_size

    def original_size(self, path: str | Path) -> tuple[int, int]:
        """``(H, W)`` of the image file (after EXIF orientation)."""
        return self.record(path).original_size

    def __getitem__(self, path: str | Path) -> torch.Tensor:
        rec = self._records[Path(path)]
        if rec.sha256 in self._tensors:
            return self._tensors[rec.sha256]
        if self.cache_dir is None:
            raise KeyError(path)
        return load_file(self.cache_dir / f"{rec.sha256}.safetensors")["features"]

    def __iter__(self) -> Iterator[Path]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


def load_cache(folder: str | Path) -> FeatureSet:
    """The features stored in one cache folder (``cache_dir/<key>``, read from its index.json)."""
    folder = Path(folder)
    index = folder / "index.json"
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError) as exc:
        raise UnsegError(f"{index}: not a readable feature-cache index ({exc})") from None
    records = {Path(p): FeatureRecord.from_json(d) for p, d in entries.items()}
    stats = {"images": len(records), "computed": 0, "cached": len(records), "failed": 0}
    return FeatureSet(records, BatchReport(), folder, stats=stats)


def _header_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` after EXIF orientation, from the header only (no decoding)."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def cache_setting(
    backbone: Backbone, size: int, crop: bool, kind: FeatureKind, dtype: torch.dtype
) -> dict:
    """What the features depend on besides the image: backbone, weights, size, crop, kind, dtype."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone.spec.name,
        "weights_sha256": backbone_weights_sha256(backbone),
        "size": size,
        "crop": crop,
        "kind": kind,
        "dtype": str(dtype).removeprefix("torch."),
    }


def cache_key(setting: dict) -> str:
    """Short hash of a :func:`cache_setting`, naming its cache folder."""
    return settings_key(setting)


@dataclass(frozen=True)
class _Item:
    index: int
    path: Path
    sha256: str
    original_size: tuple[int, int]
    image_size: tuple[int, int]


class _ImageDataset(Dataset):
    """Decodes and resizes the images of ``items``; bad files come back as an error string."""

    def __init__(self, items: list[_Item], size: int, stride: int, crop: bool) -> None:
        self.items = items
        self.size, self.stride, self.crop = size, stride, crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            image = resize_image(load_image(item.path), self.size, self.stride, self.crop)
        except UnsegError as exc:
            return i, None, getattr(exc, "problem", str(exc))
        if tuple(image.shape[1:]) != item.image_size:
            return i, None, f"decoded size {tuple(image.shape[1:])} differs from its header"
        return i, image, None


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


def _scan(
    paths: Sequence[Path], size: int, stride: int, crop: bool
) -> tuple[list[_Item], list[tuple[Path, str]]]:
    """Hash and read the header of each file; unreadable ones are returned as failures."""
    items: list[_Item] = []
    failed: list[tuple[Path, str]] = []
    for i, path in enumerate(paths):
        if not path.is_file():
            failed.append((path, "no such file"))
            continue
        if path.stat().st_size == 0:
            failed.append((path, "empty file (0 bytes)"))
            continue
        try:
            sha = file_sha256(path)
            h, w = _header_size(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            failed.append((path, f"not an image file Pillow can read ({exc})"))
            continue
        items.append(_Item(i, path, sha, (h, w), target_size(h, w, size, stride, crop)))
    return items, failed


def _save_features(path: Path, features: torch.Tensor) -> None:
    atomic_write(path, lambda p: save_file({"features": features.contiguous()}, str(p)))


def _merge_index(index_path: Path, key_info: dict, records: dict[Path, FeatureRecord]) -> None:
    entries: dict[str, dict] = {}
    if index_path.is_file():
        try:
            entries = json.loads(index_path.read_text(encoding="utf-8")).get("images", {})
        except (OSError, ValueError):
            logger.warning("%s unreadable; rewriting it", index_path)
    entries.update({str(p): r.to_json() for p, r in records.items()})
    write_json_atomic(index_path, {**key_info, "images": entries})


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
) -> FeatureSet:
    """Dense features ``[C, H'/stride, W'/stride]`` of every image in ``paths``.

    The model runs on the backbone's device (float16 ``dtype`` uses autocast on CUDA; on CPU the
    model runs in float32 and features are stored as ``dtype``). Bad files are recorded in
    ``report`` and skipped. Under torchrun (process group initialised, see
    :mod:`unseg.utils.dist`) each rank computes its shard; all ranks return the same set.
    """
    report = report if report is not None else BatchReport()
    paths = [Path(p) for p in paths]
    stride = backbone.stride
    device = next(backbone.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    if world > 1 and cache_dir is None:
        raise UnsegError("a multi-process run needs a cache_dir to share the features through")
    setting = cache_setting(backbone, size, crop, kind, dtype)
    cache = Path(cache_dir) / cache_key(setting) if cache_dir is not None else None

    mine = dist.shard(list(range(len(paths))), rank, world)
    items, failed = _scan([paths[i] for i in mine], size, stride, crop)
    items = [
        _Item(mine[it.index], it.path, it.sha256, it.original_size, it.image_size) for it in items
    ]
    todo = [
        it for it in items
        if cache is None or not (cache / f"{it.sha256}.safetensors").is_file()
    ]
    feats: dict[int, tuple[torch.Tensor, tuple[int, int, int]]] = {}
    if todo:
        feats, bad = _compute(
            todo, backbone, device, size, stride, crop, kind, dtype, batch_size, cache,
            num_workers,
        )
        failed += bad
    local = {
        "items": [(it, feats[it.index][1] if it.index in feats else None) for it in items],
        "failed": [(str(p), m) for p, m in failed],
        "computed": len(feats),
    }
    gathered = dist.all_gather_objects(local)

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
                shape = _cached_shape(cache, it.sha256)
            records[it.index] = (
                it.path, FeatureRecord(it.sha256, it.original_size, it.image_size, shape)
            )
    for p in paths:
        if p in failures:
            report.fail(p, failures[p])
    ordered = {records[i][0]: records[i][1] for i in sorted(records)}
    tensors = {}
    if cache is None:
        tensors = {rec.sha256: feats[i][0] for i, (_, rec) in records.items()}
    else:
        if rank == 0:
            _merge_index(cache / "index.json", setting, ordered)
        report.written.extend(cache / f"{r.sha256}.safetensors" for r in ordered.values())
    dist.barrier()
    stats = {
        "images": len(paths),
        "computed": computed,
        "cached": len(ordered) - computed,
        "failed": len(failures),
    }
    return FeatureSet(ordered, report, cache, tensors, stats)


def _cached_shape(cache: Path | None, sha: str) -> tuple[int, int, int]:
    if cache is None:
        raise RuntimeError("no cache to read a shape from")
    with safe_open(str(cache / f"{sha}.safetensors"), framework="pt") as f:
        return tuple(f.get_slice("features").get_shape())


def _compute(
    todo: list[_Item],
    backbone: Backbone,
    device: torch.device,
    size: int,
    stride: int,
    crop: bool,
    kind: FeatureKind,
    dtype: torch.dtype,
    batch_size: int,
    cache: Path | None,
    num_workers: int | None,
) -> tuple[dict[int, tuple[torch.Tensor, tuple[int, int, int]]], list[tuple[Path, str]]]:
    """Run the backbone over ``todo``; returns features by input index and the failures."""
    workers = _default_workers(len(todo)) if num_workers is None else num_workers
    batches = _shape_batches(todo, batch_size)
    loader = DataLoader(
        _ImageDataset(todo, size, stride, crop),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    autocast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    out: dict[int, tuple[torch.Tensor, tuple[int, int, int]]] = {}
    failed: list[tuple[Path, str]] = []
    steps = progress(loader, total=len(batches), desc="features") if dist.is_main() else loader
    # Cache files are written by one background thread while the model runs on the next batch.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unseg-cache") as writer:
        pending: list[Future] = []
        for idx, images, bad in steps:
            failed += [(todo[i].path, problem) for i, problem in bad]
            if images is None:
                continue
            images = images.to(device, non_blocking=True).float().div_(255.0)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                f = backbone.forward_features(images, kind)
            f = f.to("cpu", dtype)
            for j, i in enumerate(idx):
                item = todo[i]
                fi = f[j].clone()
                if cache is not None:
                    path = cache / f"{item.sha256}.safetensors"
                    pending.append(writer.submit(_save_features, path, fi))
                out[item.index] = (fi if cache is None else torch.empty(0), tuple(fi.shape))
            pending = [job for job in pending if not _done(job)]
        for job in pending:
            job.result()
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
) -> FeatureSet:
    """Cache the features of the images of ``data`` (dataset root, folder or file) under ``out``.

    Joins the torchrun process group when launched by torchrun (each rank on its own GPU when
    CUDA is used) and leaves it at the end; a single process needs no launcher.
    """
    with dist.joined(resolve_device(device)) as dev:
        paths = dataset_images(data)
        model = create_backbone(backbone, weights=weights, device=dev)
        return extract_features(
            paths, model, size=size, kind=kind, batch_size=batch_size, crop=crop,
            cache_dir=out, dtype=dtype, num_workers=num_workers,
        )
