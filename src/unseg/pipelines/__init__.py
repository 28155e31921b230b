"""Top-level pipelines: the only library code that knows the file layout of runs and outputs.

:func:`predict_run` reads the method recorded in a run's ``config.json``, looks it up in the
method registry (:mod:`unseg.registry`) and predicts with the pipeline of its output kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unseg.registry import get_method
from unseg.runs import load_run
from unseg.utils.batch import BatchReport

# output kind → module providing ``predict_run(run_dir, images, out_dir, overrides, device)``
_PIPELINES = {
    "semantic": "unseg.pipelines.semantic",
    "saliency": "unseg.pipelines.saliency",
    "embedding": "unseg.pipelines.maskcontrast",
}


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> BatchReport:
    """Predict a mask for every image of ``images`` with the run in ``run_dir``.

    ``overrides`` may hold ``refine`` (semantic runs), ``guided_filter`` and ``guide``
    (saliency runs), and ``weights``: the backbone weights file, when the run's own is not found.
    """
    meta, _ = load_run(run_dir)
    spec = get_method(meta["method"])
    predict = importlib.import_module(_PIPELINES[spec.output]).predict_run
    return predict(run_dir, images, out_dir, dict(overrides or {}), device)
