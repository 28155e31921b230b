"""Top-level pipelines: the only library code that knows the file layout of runs and outputs.

Each pipeline module registers the run methods it can predict with; :func:`predict_run`
dispatches on the ``method`` recorded in the run's ``config.json``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from unseg.errors import UnsegError
from unseg.runs import load_run
from unseg.utils.batch import BatchReport

# run method → module providing ``predict_run(run_dir, images, out_dir, overrides, device)``
PREDICTORS = {
    "primaps-em": "unseg.pipelines.semantic",
    "kmeans": "unseg.pipelines.semantic",
    "saliency-head": "unseg.pipelines.saliency",
}


def predict_run(
    run_dir: str | Path,
    images: str | Path,
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
) -> BatchReport:
    """Predict a mask for every image under ``images`` with the run in ``run_dir``.

    ``overrides`` may hold ``crf`` (semantic runs), ``guided_filter`` and ``guide`` (saliency
    runs), and ``weights``: the backbone weights file, when the run's own is not found.
    """
    meta, _ = load_run(run_dir)
    module = PREDICTORS.get(meta["method"])
    if module is None:
        raise UnsegError(
            f"{run_dir}: unknown run method {meta['method']!r}; "
            f"this unseg predicts with: {', '.join(sorted(PREDICTORS))}"
        )
    predict = importlib.import_module(module).predict_run
    return predict(run_dir, images, out_dir, overrides or {}, device)
