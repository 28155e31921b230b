"""PriMaPs pseudo-labels of a training set, cached per image (one safetensors file named by the
image's sha256, under a folder named by the settings they depend on), shared across ranks.

Each image's proposals come from its features and its resized uint8 image (the ``"image"``
extra of the extraction: the features' 320 short side, the reference's resolution), so nothing
is decoded again. Both are taken once to the features' device (``FeatureSet.device``, the
backbone's), where the proposals and their refinement run; only what is cached on disk comes
back to the host.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unseg.feature_store import remove_stale_temps
from unseg.features import FeatureSet
from unseg.proposals.primaps import PriMaPsConfig, primaps_pseudo_labels
from unseg.refine.crf import CRFConfig, CRFPool
from unseg.utils import dist
from unseg.utils.allocator import release_freed_memory
from unseg.utils.hashing import settings_key
from unseg.utils.io import atomic_write
from unseg.utils.progress import chunked
from unseg.utils.timing import Timings

CHUNK = 16  # images per round of the worker pool


def hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 ``[3, H, W]`` → contiguous uint8 ``[H, W, 3]`` (what the CRF and OpenCV take)."""
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _inputs(
    feats: FeatureSet, chunk: list[Path]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The resized images ``[H, W, 3]`` and features ``[C, h, w]`` of ``chunk`` on
    ``feats.device``."""
    images = [feats.extra(p, "image").to(feats.device).permute(1, 2, 0) for p in chunk]
    return images, [feats[p].to(feats.device) for p in chunk]


def pseudo_label_dir(cache: Path, feats: FeatureSet, cfg: PriMaPsConfig, crf: CRFConfig) -> Path:
    """Cache folder of the pseudo-labels under ``cache``: named by the feature setting, PriMaPs
    and the CRF."""
    key = settings_key(
        {"features": feats.cache_dir.name if feats.cache_dir else None, "primaps": asdict(cfg),
         "crf": asdict(crf)}
    )
    return cache / "primaps" / key


def compute_pseudo_labels(
    paths: list[Path],
    feats: FeatureSet,
    out_dir: Path | None,
    config: PriMaPsConfig,
    pool: CRFPool,
    timings: Timings,
) -> list[torch.Tensor]:
    """PriMaPs pseudo-labels ``[H', W']`` (int16, as stored) of ``paths`` at their resized size,
    cached in ``out_dir`` (None: computed in memory, in one process, and left on
    ``feats.device``); ``feats`` must hold the ``"image"`` extra. Refinement runs in ``pool``.

    Under torchrun each rank computes its share of the missing ones; all ranks return all.
    """
    if out_dir is None:
        out: list[torch.Tensor] = []
        for chunk in chunked(paths, CHUNK, desc="PriMaPs"):
            with timings.stage("proposals"):
                images, features = _inputs(feats, chunk)
                out += [lab.to(torch.int16) for lab in primaps_pseudo_labels(
                    images, features, config, pool.config, pool=pool)]
            release_freed_memory()  # the chunk's buffers: see unseg.utils.allocator
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.rank() == 0:
        remove_stale_temps(out_dir)  # those of a run killed mid-write

    def file(p: Path) -> Path:
        return out_dir / f"{feats.record(p).sha256}.safetensors"

    todo = [p for p in paths if not file(p).is_file()]
    # every rank lists the missing files before any rank writes one: a rank that looked after
    # another had written would shard a shorter list, and some image would fall to no rank
    dist.barrier()
    mine = dist.shard(todo, dist.rank(), dist.world_size())
    for chunk in chunked(mine, CHUNK, desc="PriMaPs"):
        with timings.stage("proposals"):
            images, features = _inputs(feats, chunk)
            labels = primaps_pseudo_labels(images, features, config, pool.config, pool=pool)
        with timings.stage("writing"):
            for p, lab in zip(chunk, labels, strict=True):
                tensor = {"labels": lab.to("cpu", torch.int16).contiguous()}
                atomic_write(file(p), lambda t, tensor=tensor: save_file(tensor, str(t)))
        release_freed_memory()  # the chunk's buffers: see unseg.utils.allocator
    dist.barrier()
    return [load_file(str(file(p)))["labels"] for p in paths]
