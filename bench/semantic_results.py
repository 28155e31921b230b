"""k-means vs PriMaPs-EM (and ablations of the EM) x refinement, on VOC2012, VOC2007 and CamVid.

Runs the CLI exactly as a user would — `unseg segment --refine` (fit and predict in one pass)
and `unseg evaluate semantic` — for every dataset, variant, seed and refinement, with one
feature/pseudo-label cache per dataset (`--cache-dir`, so the backbone and PriMaPs run once per
dataset and pseudo-label setting), and prints JSON: every command, the per-run scores with
per-class IoU, and mean ± std over the seeds for each (dataset, variant, refinement), plus the
machine and its load at the start and the end. Resumable: a step whose output exists is not run
again (delete --work to start over). Cheap refinements run first for every seed, the dense CRF
last.

A variant is a name and the `unseg segment` options that make it: the built-in ones below, or
`--variant NAME="--method primaps-em --focal-gamma 0"` (repeatable) for an ablation.

Usage: python bench/semantic_results.py [--work DIR] [--seeds 0 1 2]
       [--datasets VOC2012 VOC2007 CamVid] [--variants kmeans primaps-em]
       [--variant NAME=OPTIONS ...] [--refines none guided crf] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import load_average, machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class DevSet:
    """A labelled dev set: images for `segment`, ground truth for `evaluate`, K, ignore id."""

    images: Path
    gt: Path
    k: int
    ignore_index: int | None = None


DATASETS = {
    "VOC2012": DevSet(DATA / "VOC2012", DATA / "VOC2012" / "VOCdevkit" / "VOC2012", 21),
    "VOC2007": DevSet(DATA / "VOC2007", DATA / "VOC2007" / "VOCdevkit" / "VOC2007", 21),
    "CamVid": DevSet(DATA / "CamVid" / "val", DATA / "CamVid" / "valannot", 11, 11),
}
VARIANTS = {
    "kmeans": "--method kmeans",
    "primaps-em": "--method primaps-em",  # the defaults
    "primaps-em-reference": "--method primaps-em --classifier reference",
    "primaps-em-cosine": "--method primaps-em --classifier cosine",
}


def run(cmd: list[str], log: list[dict], in_process: bool = False) -> None:
    """Run ``unseg`` with ``cmd`` (in a new process, or in this one through the CLI's own
    ``main``); record the command line and its wall time. What the command prints goes to
    stderr: stdout is this script's JSON alone."""
    t = time.perf_counter()
    if in_process:
        from unseg.cli.main import main as unseg_main

        with contextlib.redirect_stdout(sys.stderr):
            code = unseg_main(["-q", *cmd])
        if code != 0:
            sys.exit(f"unseg {shlex.join(cmd)} exited with status {code}")
    else:
        subprocess.run([sys.executable, "-m", "unseg.cli.main", "-q", *cmd], check=True,
                       stdout=sys.stderr)
    log.append({"cmd": "unseg " + shlex.join(cmd), "seconds": round(time.perf_counter() - t, 1)})


def summary(values: list[float]) -> dict[str, float]:
    """Mean and (sample) standard deviation, in percent."""
    pct = [100 * v for v in values]
    return {
        "mean": round(statistics.fmean(pct), 2),
        "std": round(statistics.stdev(pct), 2) if len(pct) > 1 else 0.0,
        "n": len(pct),
    }


def class_means(runs: list[list[float | None]]) -> list[float | None]:
    """Per-class IoU (%) averaged over runs; ``None`` where a class is absent from the labels."""
    out: list[float | None] = []
    for values in zip(*runs, strict=True):
        got = [v for v in values if v is not None]
        out.append(round(100 * statistics.fmean(got), 1) if got else None)
    return out


def parse_variants(base: list[str], extra: list[str]) -> dict[str, list[str]]:
    """The chosen built-in variants plus ``NAME=OPTIONS`` ones, as option lists."""
    variants = {name: shlex.split(VARIANTS[name]) for name in base}
    for item in extra:
        name, sep, options = item.partition("=")
        if not sep or not name or "/" in name:
            sys.exit(f"--variant {item!r}: expected NAME=OPTIONS")
        variants[name] = shlex.split(options)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "out" / "semantic-results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="*", default=["kmeans", "primaps-em"],
                        choices=list(VARIANTS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="an extra variant: its name and `unseg segment` options")
    parser.add_argument("--refines", nargs="+", default=["none", "crf"])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--in-process", action="store_true",
                        help="run the CLI in this process (no interpreter start per command: "
                        "on a loaded machine that start can take a minute)")
    args = parser.parse_args()
    missing = [d for d in args.datasets if not DATASETS[d].images.is_dir()]
    if missing:
        sys.exit(f"skipped: {', '.join(str(DATASETS[d].images) for d in missing)} absent")
    variants = parse_variants(args.variants, args.variant)
    work = Path(args.work)
    start = machine()
    log: list[dict] = []
    scores: dict[str, dict] = {}
    for refine in args.refines:  # cheap refinements for every run first, the CRF last
        for ds in args.datasets:
            dev = DATASETS[ds]
            for name, options in variants.items():
                for seed in args.seeds:
                    out = work / ds / f"{name}-s{seed}-{refine}"
                    result = out / "scores.json"
                    if not result.is_file():
                        # --resume: a run killed midway continues (same configuration);
                        # no refinement: no worker processes to start
                        workers = (["--workers", "1"] if refine == "none"
                                   and "--workers" not in options else [])
                        run(["segment", str(dev.images), *options, "--num-classes", str(dev.k),
                             "--seed", str(seed), "--refine", refine, "--cache-dir",
                             str(work / ds / "cache"), "--out", str(out), "--resume",
                             "--no-report", *workers], log, args.in_process)
                        ignore = [] if dev.ignore_index is None else [
                            "--ignore-index", str(dev.ignore_index)]
                        run(["evaluate", "semantic", "--pred", str(out / "masks"), "--gt",
                             str(dev.gt), "--num-classes", str(dev.k), *ignore, "--json",
                             str(result)], log, args.in_process)
                    got = json.loads(result.read_text())
                    key = f"{ds}/{name}/{refine}"
                    entry = scores.setdefault(key, {"acc": [], "miou": [], "per_class": [],
                                                    "options": shlex.join(options)})
                    entry["acc"].append(got["acc"])
                    entry["miou"].append(got["miou"])
                    entry["per_class"].append(got["per_class_iou"])
    table = {
        key: {
            "options": v["options"],
            "acc": summary(v["acc"]),
            "miou": summary(v["miou"]),
            "miou_per_seed": [round(100 * m, 2) for m in v["miou"]],
            "acc_per_seed": [round(100 * a, 2) for a in v["acc"]],
            "per_class_iou_mean": class_means(v["per_class"]),
        }
        for key, v in scores.items()
    }
    report = {
        "machine": start,
        "load_average_end": load_average(),
        "sets": {ds: {"k": DATASETS[ds].k, "ignore_index": DATASETS[ds].ignore_index}
                 for ds in args.datasets},
        "seeds": args.seeds,
        "table_percent": table,
        "commands": log,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
