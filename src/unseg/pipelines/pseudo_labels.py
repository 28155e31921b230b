"""PriMaPs pseudo-labels of a training set, cached per image (one safetensors file named by the
image's sha256, under a folder named by the settings they depend on), shared across ranks."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unseg.data.image import load_image
from unseg.data.resize import prepare_image
from unseg.features import FeatureSet
from unseg.proposals.primaps import PriMaPsConfig, primaps_pseudo_labels
from unseg.refine.crf import CRFConfig, CRFPool
from unseg.utils import dist
from unseg.utils.hashing import settings_key
from unseg.utils.io import atomic_write
from unseg.utils.progress import progress

CHUNK = 16  # images per CRF round


def _image_for_features(path: Path, size: int, stride: int) -> np.ndarray:
    """uint8 RGB ``[H', W', 3]`` of ``path`` resized exactly as for its features."""
    x = prepare_image(load_image(path), size, stride)
    return np.ascontiguousarray((x * 255.0).round().byte().permute(1, 2, 0).numpy())


def pseudo_label_dir(run_dir: Path, feats: FeatureSet, cfg: PriMaPsConfig, crf: CRFConfig) -> Path:
    """Cache folder of the pseudo-labels: named by the feature setting, PriMaPs and the CRF."""
    key = settings_key(
        {"features": feats.cache_dir.name if feats.cache_dir else None, "primaps": asdict(cfg),
         "crf": asdict(crf)}
    )
    return run_dir / "cache" / "primaps" / key


def compute_pseudo_labels(
    paths: list[Path],
    feats: FeatureSet,
    out_dir: Path,
    size: int,
    stride: int,
    config: PriMaPsConfig,
    crf_config: CRFConfig,
    num_workers: int,
) -> list[torch.Tensor]:
    """PriMaPs pseudo-labels ``[H', W']`` (int64) of ``paths``, cached in ``out_dir``.

    Under torchrun each rank computes its share of the missing ones; all ranks return all.
    """
    out_dir.mkdir(parents=True, exist_ok=True)

    def file(p: Path) -> Path:
        return out_dir / f"{feats.record(p).sha256}.safetensors"

    todo = [p for p in paths if not file(p).is_file()]
    mine = dist.shard(todo, dist.rank(), dist.world_size())
    with CRFPool(num_workers, crf_config) as pool:
        for start in progress(range(0, len(mine), CHUNK), desc="PriMaPs"):
            chunk = mine[start : start + CHUNK]
            images = [_image_for_features(p, size, stride) for p in chunk]
            labels = primaps_pseudo_labels(
                images, [feats[p] for p in chunk], config, crf_config, pool=pool
            )
            for p, lab in zip(chunk, labels, strict=True):
                tensor = {"labels": lab.to(torch.int16).contiguous()}
                atomic_write(file(p), lambda t, tensor=tensor: save_file(tensor, str(t)))
    dist.barrier()
    return [load_file(str(file(p)))["labels"].long() for p in paths]
