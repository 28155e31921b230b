"""Issue 19 item 2: the CRF's label floor against no floor, on whole `unseg segment` runs.

Runs ``bench/semantic_results.py`` (its options, in this process) with every label of every image
taking part in both CRFs (the pseudo-labels' and the prediction's), and counts on the way how
many labels the default floor (``CRFConfig.label_floor``) would have dropped. Compare the masks
with those of the same command run without this wrapper (the default floor): identical masks
mean the floor changed nothing. Writes the count beside ``--out`` (``NAME.floor.json``).

    python bench/crf_floor.py --work W --refines crf --in-process --variants --datasets VOC2012 \
        --seeds 0 1 2 --variant "em-lr1e-3=--method primaps-em --lr 0.001" --out W/VOC2012.json

Give it a ``--work`` of its own (pseudo-labels are cached under the CRF's settings, which the
wrapper does not change); the feature cache (``W/<set>/cache/features``) may be linked in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import semantic_results

from unseg.refine import crf

KEPT_LABELS = crf._kept_labels  # the default rule, before the patch replaces it
TALLY = {"crf_calls": 0, "labels": 0, "floor_would_drop": 0, "images_with_a_drop": 0}


def every_label(probs: torch.Tensor, floor: float) -> torch.Tensor:
    """All ``K`` label indices of ``probs [K, H, W]``, counting what ``floor`` would drop."""
    kept = KEPT_LABELS(probs, floor)
    k = probs.shape[0]
    TALLY["crf_calls"] += 1
    TALLY["labels"] += k
    TALLY["floor_would_drop"] += k - int(kept.numel())
    TALLY["images_with_a_drop"] += int(kept.numel() < k)
    return torch.arange(k, device=probs.device)


def main() -> None:
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    with mock.patch.object(crf, "_kept_labels", every_label):
        semantic_results.main()
    result = {**TALLY, "floor": crf.CRFConfig().label_floor}
    json.dump(result, sys.stderr)
    if out is not None:
        out.with_suffix(".floor.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
