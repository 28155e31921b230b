"""Which :class:`~unseg.pipelines.kind.Kind` serves a method or a run: the registry's output kind
(``spec.output``) picks it, ``spectral`` (training-free, unregistered) is a saliency one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unseg.errors import UnsegError
from unseg.pipelines.kind import Kind, Settings
from unseg.pipelines.maskcontrast import MaskContrastKind
from unseg.pipelines.saliency import SPECTRAL, SaliencyKind
from unseg.pipelines.semantic import SemanticKind
from unseg.registry import get_method
from unseg.runs import load_run

KINDS: dict[str, type[Kind]] = {
    kind.output: kind for kind in (SemanticKind, SaliencyKind, MaskContrastKind)
}
RUN_WORDS = {"embedding": "maskcontrast"}  # a kind of run as the options' help names it
# every override some kind of run uses: what `unseg predict` and Segmenter.load may change
RUN_OPTIONS = tuple(dict.fromkeys(o for kind in KINDS.values() for o in kind.run_options))


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
    kind = KINDS[get_method(meta["method"]).output]
    overrides = dict(overrides or {})
    _refuse_foreign(kind, overrides, f"{run_dir} is a {meta['method']} run")
    return kind.from_run(Path(run_dir), meta, overrides, device)


def _refuse_foreign(kind: type[Kind], overrides: Mapping[str, Any], what: str) -> None:
    """Refuse an override that only another kind of run uses (``--guided-filter`` for a
    semantic run): ``kind`` would ignore it. ``what``: the run, for the message."""
    for name in overrides:
        users = [RUN_WORDS.get(k.output, k.output) for k in KINDS.values()
                 if name in k.run_options and name not in kind.run_options]
        if users:
            flag = "--" + name.replace("_", "-")
            raise UnsegError(f"{flag} applies to {' and '.join(users)} runs only, and {what}")
