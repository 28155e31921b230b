"""The feature cache: one folder per setting, one safetensors file per image and tensor.

``cache_dir/<key>/`` where ``key`` hashes :func:`cache_setting` (backbone, tap, weights sha256,
size, max_side, crop, kind, dtype); each image's features are ``<sha256>.safetensors`` (the
sha256 of the image file's bytes) and its extras ``<sha256>.<extra>.safetensors``
(:func:`file_name`), written atomically; ``index.json`` maps image paths to their
:class:`FeatureRecord`. A writer killed mid-write (SIGKILL, power loss) leaves its temp file
(``.<file>.<random>.tmp``); the next run on the folder removes the stale ones
(:func:`remove_stale_temps`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unseg.backbones import backbone_weights_sha256
from unseg.backbones.base import Backbone, FeatureKind
from unseg.errors import UnsegError
from unseg.utils.batch import BatchReport
from unseg.utils.hashing import settings_key
from unseg.utils.io import atomic_temp_pattern, atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: images resized in uint8; 3: big JPEGs decoded at a reduced DCT scale
EXTRAS: tuple[str, ...] = ("flipped", "image", "student")
# the temp files unseg.utils.io.atomic_path makes for the store's files: ".<sha256>[.<extra>]
# .safetensors.<mkstemp's random part>.tmp" and ".index.json.<random>.tmp"
TEMP_FILE = atomic_temp_pattern(r"[0-9a-f]{64}(?:\.[A-Za-z0-9_-]+)?\.safetensors|index\.json")
STALE_TEMP_SECONDS = 3600  # a temp file untouched this long has no live writer (see below)


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
    ``device``: where the backbone that computed them ran, so where the stages that use them
    (proposals, refinement) run; the tensors themselves are held on the host or on disk.
    """

    def __init__(
        self,
        records: dict[Path, FeatureRecord],
        report: BatchReport,
        cache_dir: Path | None = None,
        tensors: dict[tuple[str, str], torch.Tensor] | None = None,
        stats: dict[str, int] | None = None,
        student_seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self._records = records
        self.report = report
        self.cache_dir = cache_dir
        self._tensors = tensors or {}
        self.stats = stats or {}
        self.student_seed = student_seed
        self.device = torch.device(device)

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
        return self.extra(path, "features")

    def extra(self, path: str | Path, name: str) -> torch.Tensor:
        """``"features"`` or one of the :data:`EXTRAS` computed for ``path``."""
        rec = self._records[Path(path)]
        if (rec.sha256, name) in self._tensors:
            return self._tensors[(rec.sha256, name)]
        if self.cache_dir is None:
            raise KeyError(f"{path}: no {name!r} computed")
        file = self.cache_dir / file_name(rec.sha256, name, self.student_seed)
        if not file.is_file():
            raise KeyError(f"{path}: no {name!r} computed")
        return load_file(file)[name]

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


def file_name(sha256: str, name: str, student_seed: int) -> str:
    """The cache file of tensor ``name`` (``"features"`` or an extra) of one image."""
    if name == "features":
        return f"{sha256}.safetensors"
    if name == "student":
        return f"{sha256}.student-{student_seed}.safetensors"
    return f"{sha256}.{name}.safetensors"


def cache_setting(
    backbone: Backbone, size: int, crop: bool, kind: FeatureKind, dtype: torch.dtype,
    max_side: int | None = None,
) -> dict:
    """What the features depend on besides the image: backbone, its tap and weights, size, the
    working resolution's long-side limit ``max_side`` (None: none), crop, kind, dtype."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone.spec.name,
        "tap": getattr(backbone, "tap", None),
        "weights_sha256": backbone_weights_sha256(backbone),
        "size": size,
        "max_side": max_side,
        "crop": crop,
        "kind": kind,
        "dtype": str(dtype).removeprefix("torch."),
    }


def cache_key(setting: dict) -> str:
    """Short hash of a :func:`cache_setting`, naming its cache folder."""
    return settings_key(setting)


def save_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Write ``{name: tensor}`` to ``path`` as safetensors, atomically."""
    atomic_write(path, lambda p: save_file({name: tensor.contiguous()}, str(p)))


def merge_index(index_path: Path, key_info: dict, records: dict[Path, FeatureRecord]) -> None:
    """Add ``records`` to the cache folder's ``index.json`` (rewritten if unreadable)."""
    entries: dict[str, dict] = {}
    if index_path.is_file():
        try:
            entries = json.loads(index_path.read_text(encoding="utf-8")).get("images", {})
        except (OSError, ValueError):
            logger.warning("%s unreadable; rewriting it", index_path)
    entries.update({str(p): r.to_json() for p, r in records.items()})
    write_json_atomic(index_path, {**key_info, "images": entries})


def cached_shape(cache: Path | None, sha: str) -> tuple[int, int, int]:
    """Feature shape ``(C, h, w)`` of a cached image, from the file header."""
    if cache is None:
        raise RuntimeError("no cache to read a shape from")
    with safe_open(str(cache / f"{sha}.safetensors"), framework="pt") as f:
        return tuple(f.get_slice("features").get_shape())


def remove_stale_temps(folder: str | Path, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove the temp files a killed writer left in the cache folder ``folder`` (a features
    folder ``cache_dir/<key>``, a pseudo-label or MaskContrast view one); returns those
    removed.

    Only the store's own (:data:`TEMP_FILE`: the names :func:`~unseg.utils.io.atomic_path`
    gives its tensors and index), only plain files, and only those not modified for
    ``older_than`` seconds. Age, not the writer's pid, tells a dead writer's: runs sharing a
    cache may run on other machines (a network folder), where a pid names nothing and would
    delete a live writer's file, and pids are reused; a live writer writes its temp file
    in one go and renames it at once (seconds, for the largest tensors), so one untouched for an
    hour has none (a writer stopped that long, e.g. by Ctrl-Z, would lose its file and fail). A
    file another process removes first, or that cannot be removed (another user's), is left.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet (nothing cached) or unreadable: nothing to clean
        return removed
    now = time.time()
    for entry in entries:
        if not TEMP_FILE.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except OSError as exc:  # removed meanwhile, or not ours to remove
            logger.debug("%s: stale temp file left (%s)", entry.path, exc)
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("%s: removed %d temp file(s) a killed run left", folder, len(removed))
    return removed
