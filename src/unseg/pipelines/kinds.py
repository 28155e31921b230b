"""Which :class:`~unseg.pipelines.kind.Kind` serves a method or a run: the registry's output kind
(``spec.output``) picks it, ``spectral`` (training-free, unregistered) is a saliency one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unseg.pipelines.kind import Kind, Settings
from unseg.pipelines.maskcontrast import MaskContrastKind
from unseg.pipelines.saliency import SPECTRAL, SaliencyKind
from unseg.pipelines.semantic import SemanticKind
from unseg.registry import get_method
from unseg.runs import load_run

KINDS: dict[str, type[Kind]] = {
    kind.output: kind for kind in (SemanticKind, SaliencyKind, MaskContrastKind)
}


def output_of(method: str) -> str:
    """The output kind of ``method`` (a registered name or alias, or ``spectral``)."""
    return SaliencyKind.output if method == SPECTRAL else get_method(method).output


def create_kind(
    method: str, num_classes: int | None, options: Mapping[str, Any] | None, settings: Settings
) -> Kind:
    """The kind that fits ``method`` with ``options`` (config fields by name) and ``settings``,
    checked with the commands' messages."""
    return KINDS[output_of(method)].create(method, num_classes, options, settings)


def run_kind(run_dir: str | Path, overrides: Mapping[str, Any] | None = None,
             device: str | None = None) -> Kind:
    """The kind that predicts with the run folder ``run_dir`` (its method from ``config.json``);
    ``overrides``: what ``unseg predict`` may change."""
    meta, _ = load_run(run_dir)
    output = get_method(meta["method"]).output
    return KINDS[output].from_run(Path(run_dir), meta, dict(overrides or {}), device)
