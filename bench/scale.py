"""Peak memory of ``unseg segment`` against the number of images and against one image's size.

Runs ``unseg segment`` (defaults; ``--backbone`` picks the offline backbone, default
efficientnet_lite0) as a subprocess and samples the resident memory of its whole process tree
(the command, its refinement workers and DataLoader workers) every ``--interval`` seconds:
psutil when it is installed, else ``/proc``. Prints one JSON object: the machine, per run the
images, seconds, peak RSS (sum over the tree, and of the main process alone) and peak PSS (the
tree's proportional set size, which counts shared pages once), then the ratios and whether the
targets of issue 11 hold: the 1000-image peak at most 1.3x the 100-image peak, and the
synthetic 8000x6000 photo under 4 GB.

The ECSSD runs read ``../shared/data/ECSSD`` (the first N images, linked into a temporary
folder); they are skipped with a message in the JSON when it is absent. The 48 MP image is a
smooth random picture written by the bench.

    nice -n 5 .venv/bin/python bench/scale.py                # 100, 1000 ECSSD images, 48 MP
    nice -n 5 .venv/bin/python bench/scale.py --counts 100 --no-big
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from _machine import machine
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ECSSD = REPO.parent / "shared" / "data" / "ECSSD"
PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1024**3
TARGET_RATIO = 1.3
TARGET_BIG_GB = 4.0

try:
    import psutil
except ImportError:  # /proc is read instead
    psutil = None


def _children_map() -> dict[int, list[int]]:
    """Parent pid → child pids of every process, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return [pid, *(c.pid for c in proc.children(recursive=True))]
        except psutil.Error:
            return []
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    """Resident and proportional set size of one process in bytes (0, 0 once it is gone)."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreeSampler(threading.Thread):
    """Samples a process tree's memory until :meth:`stop`; keeps the peaks."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_main = self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = _tree(self.pid)
            sizes = [_rss_pss(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in sizes))
            if sizes:
                self.peak_main = max(self.peak_main, sizes[0][0])
            self.max_procs = max(self.max_procs, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_segment(images: Path, out: Path, args: argparse.Namespace) -> dict:
    """``unseg segment images --out out`` with the tree sampled; the run's facts."""
    cmd = [sys.executable, "-m", "unseg.cli.main", "segment", str(images), "--out", str(out),
           "--backbone", args.backbone, *args.segment_args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sampler = TreeSampler(proc.pid, args.interval)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop()
    config = out / "run" / "config.json"
    timings = json.loads(config.read_text()).get("timings") if config.is_file() else None
    return {
        "command": " ".join(cmd[1:]),
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": round(sampler.peak_rss / GB, 3),
        "peak_pss_gb": round(sampler.peak_pss / GB, 3),
        "peak_main_rss_gb": round(sampler.peak_main / GB, 3),
        "max_processes": sampler.max_procs,
        "masks": len(list((out / "masks").rglob("*.png"))),
        "timings": timings,
        "last_line": (stdout.strip().splitlines() or [""])[-1],
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }


def first_images(n: int, folder: Path) -> Path:
    """A folder of links to the first ``n`` ECSSD images (sorted by name)."""
    files = sorted((ECSSD / "images").glob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"{ECSSD}: {len(files)} images, {n} asked for")
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


def big_photo(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A smooth random RGB picture ``height x width`` (bicubic noise, soft edges) as JPEG q90."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 200 + 2, width // 200 + 2, 3)).astype(np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(img).save(path, format="JPEG", quality=90)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="*", default=[100, 1000],
                    help="ECSSD image counts (default 100 1000; none: skip)")
    ap.add_argument("--no-big", action="store_true", help="skip the synthetic big photo")
    ap.add_argument("--big", type=int, nargs=2, default=[6000, 8000], metavar=("H", "W"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period (s)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("segment_args", nargs="*", help="more `unseg segment` options, after --")
    args = ap.parse_args()
    sampler = "psutil" if psutil is not None else "/proc"
    result: dict = {"bench": "scale", "machine": {**machine(), "sampler": sampler}, "runs": {}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.counts and not (ECSSD / "images").is_dir():
            result["ecssd"] = f"skipped: {ECSSD} not found (the real-data runs need it)"
        else:
            for n in args.counts:
                folder = first_images(n, work / f"ecssd-{n}")
                result["runs"][f"ecssd_{n}"] = {"images": n, **run_segment(
                    folder, work / f"out-{n}", args)}
        if not args.no_big:
            h, w = args.big
            folder = work / "big"
            folder.mkdir()
            photo = big_photo(folder / f"synthetic_{w}x{h}.jpg", h, w)
            mb = round(photo.stat().st_size / 1e6, 1)
            result["runs"]["big"] = {"size": [h, w], "file_mb": mb,
                                     **run_segment(folder, work / "out-big", args)}
    runs = result["runs"]
    verdict: dict = {}
    counts = sorted(n for n in args.counts if f"ecssd_{n}" in runs)
    if len(counts) >= 2:
        lo, hi = runs[f"ecssd_{counts[0]}"], runs[f"ecssd_{counts[-1]}"]
        ratio = hi["peak_rss_gb"] / max(lo["peak_rss_gb"], 1e-9)
        verdict[f"rss_ratio_{counts[-1]}_vs_{counts[0]}"] = round(ratio, 3)
        verdict[f"pss_ratio_{counts[-1]}_vs_{counts[0]}"] = round(
            hi["peak_pss_gb"] / max(lo["peak_pss_gb"], 1e-9), 3)
        verdict["count_target_met"] = ratio <= TARGET_RATIO
    if "big" in runs:
        verdict["big_peak_rss_gb"] = runs["big"]["peak_rss_gb"]
        verdict["big_target_met"] = runs["big"]["peak_rss_gb"] < TARGET_BIG_GB
    result["targets"] = {"count_ratio_at_most": TARGET_RATIO, "big_under_gb": TARGET_BIG_GB}
    result["verdict"] = verdict
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
