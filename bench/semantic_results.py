"""k-means vs PriMaPs-EM (reference and cosine classifiers) x refinement, on VOC2012 and VOC2007.

Runs the CLI exactly as a user would — `unseg segment --refine` (fit and predict in one pass)
and `unseg evaluate semantic` — for every dataset, method, seed and refinement, with one
feature/pseudo-label cache per dataset (`--cache-dir`, so the backbone and PriMaPs run once per
dataset; the fit is deterministic, so the refinements of one seed share one model), and prints
JSON: every command, the per-run scores, and mean ± std over the
seeds for each (dataset, method, refinement), plus the machine it ran on. Resumable: a step whose
output exists is not run again (delete --work to start over). Cheap refinements run first for
every seed, the dense CRF last.

Usage: python bench/semantic_results.py [--work DIR] [--seeds 0 1 2] [--datasets VOC2012 VOC2007]
       [--refines none guided crf] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"VOC2012": DATA / "VOC2012", "VOC2007": DATA / "VOC2007"}
METHOD_ARGS = {
    "kmeans": ["--method", "kmeans"],
    "primaps-em-reference": ["--method", "primaps-em", "--classifier", "reference"],
    "primaps-em-cosine": ["--method", "primaps-em", "--classifier", "cosine"],
}
K = 21


def voc_root(dataset: Path, name: str) -> Path:
    """``VOCdevkit/VOCxxxx`` under a dataset folder."""
    return dataset / "VOCdevkit" / name


def run(cmd: list[str], log: list[dict]) -> None:
    """Run ``unseg`` with ``cmd``; record the command line and its wall time."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unseg.cli.main", "-q", *cmd], check=True)
    log.append({"cmd": "unseg " + " ".join(cmd), "seconds": round(time.perf_counter() - t, 1)})


def summary(values: list[float]) -> dict[str, float]:
    """Mean and (sample) standard deviation, in percent."""
    pct = [100 * v for v in values]
    return {
        "mean": round(statistics.fmean(pct), 2),
        "std": round(statistics.stdev(pct), 2) if len(pct) > 1 else 0.0,
        "n": len(pct),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "out" / "semantic-results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    methods = list(METHOD_ARGS)
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--refines", nargs="+", default=["none", "guided", "crf"])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    missing = [d for d in args.datasets if not DATASETS[d].is_dir()]
    if missing:
        sys.exit(f"skipped: {', '.join(str(DATASETS[d]) for d in missing)} absent (real data)")
    work = Path(args.work)
    log: list[dict] = []
    scores: dict[str, dict] = {}
    for refine in args.refines:  # cheap refinements for every run first, the CRF last
        for ds in args.datasets:
            root = voc_root(DATASETS[ds], ds)
            for method in args.methods:
                for seed in args.seeds:
                    out = work / ds / f"{method}-s{seed}-{refine}"
                    result = out / "scores.json"
                    if not result.is_file():
                        # --resume: a run killed midway continues (same configuration)
                        run(["segment", str(DATASETS[ds]), *METHOD_ARGS[method], "--num-classes",
                             str(K), "--seed", str(seed), "--refine", refine, "--cache-dir",
                             str(work / ds / "cache"), "--out", str(out), "--resume",
                             "--no-report"], log)
                        run(["evaluate", "semantic", "--pred", str(out / "masks"), "--gt",
                             str(root), "--num-classes", str(K), "--json", str(result)], log)
                    got = json.loads(result.read_text())
                    key = f"{ds}/{method}/{refine}"
                    scores.setdefault(key, {"acc": [], "miou": []})
                    scores[key]["acc"].append(got["acc"])
                    scores[key]["miou"].append(got["miou"])
    table = {k: {m: summary(v[m]) for m in ("acc", "miou")} for k, v in scores.items()}
    out = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "k": K,
        "seeds": args.seeds,
        "table_percent": table,
        "commands": log,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
