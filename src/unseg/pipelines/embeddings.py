"""Chaining: the pixel embeddings of a MaskContrast run in place of a backbone's features
(``unseg fit primaps-em --embeddings RUN``), for the semantic pipeline and the Segmenter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unseg.errors import UnsegError
from unseg.feature_store import FeatureSet
from unseg.layout import WEIGHTS_FILE
from unseg.methods.maskcontrast import MaskContrast
from unseg.runs import load_fitted
from unseg.utils.hashing import file_sha256

METHOD = "maskcontrast"


@dataclass(frozen=True)
class EmbeddingSource:
    """A MaskContrast run whose embeddings replace the backbone's features, and what a chained
    run records of it (``record``: its resolved path and weights sha256)."""

    estimator: MaskContrast
    meta: dict[str, Any]
    record: dict[str, str]


def open_embeddings(
    run_dir: str | Path, device: torch.device, sha256: str | None = None
) -> EmbeddingSource:
    """The MaskContrast run ``run_dir`` as an :class:`EmbeddingSource`; with ``sha256`` (what a
    chained run recorded) its weights must be those."""
    run_dir = Path(run_dir)
    spec, estimator, meta = load_fitted(run_dir, "embedding", device)
    if spec.name != METHOD:
        raise UnsegError(f"{run_dir}: --embeddings needs a maskcontrast run, not {spec.name}")
    digest = file_sha256(run_dir / WEIGHTS_FILE)
    if sha256 is not None and digest != sha256:
        raise UnsegError(f"{run_dir}: the MaskContrast run's weights changed since this run was "
                         "fitted on its embeddings (sha256 differs); refit")
    return EmbeddingSource(estimator, meta, {"run": str(run_dir.resolve()), "sha256": digest})


class EmbeddedFeatures(FeatureSet):
    """``feats`` seen through a MaskContrast head: ``"features"``, ``"flipped"`` and
    ``"student"`` are the head's L2-normalised embeddings ``[D, h, w]`` at the feature grid
    (computed once per image and extra); other extras (the image) are ``feats``' own."""

    EMBEDDED = ("features", "flipped", "student")

    def __init__(self, feats: FeatureSet, estimator: MaskContrast) -> None:
        super().__init__({p: feats.record(p) for p in feats.paths}, feats.report,
                         feats.cache_dir, None, feats.stats, feats.student_seed, feats.device)
        self._source = feats
        self._estimator = estimator
        self._embedded: dict[tuple[Path, str], torch.Tensor] = {}

    def shape_of(self, path: str | Path) -> tuple[int, int, int]:
        """Embedding shape ``(D, h, w)`` of ``path``."""
        _, h, w = self._source.shape_of(path)
        return self._estimator.config.embed_dim, h, w

    def extra(self, path: str | Path, name: str) -> torch.Tensor:
        """The embedding of ``"features"``/``"flipped"``/``"student"``, else ``feats``' extra."""
        if name not in self.EMBEDDED:
            return self._source.extra(path, name)
        key = (Path(path), name)
        if key not in self._embedded:
            f = self._source.extra(path, name).float()
            self._embedded[key] = self._estimator.embed(f).cpu()
        return self._embedded[key]
