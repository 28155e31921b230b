"""Benchmark feature extraction at 320x320: the full pipeline against the model alone.

For each backbone (random weights): images/s and peak memory of
- ``pipeline``: ``unseg.features.extract_features`` on image files (hashing, JPEG decoding and
  resizing in DataLoader workers, batching, the model, writing the safetensors cache);
- ``model``: the backbone alone on the same images already decoded, resized and on the device;
and the ratio pipeline / model (target: at least 0.9, the loader is never the bottleneck).
Each measurement runs in its own subprocess so that its peak RSS is its own. Images: ECSSD when
``../shared/data/ECSSD`` exists, else ``examples/images`` repeated. Prints JSON.

Usage: python bench/features.py [--backbones efficientnet_lite0,dino_vits16,dino_vits8]
       [--images N] [--batch-size 32] [--device auto] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine

from unseg.backbones import create_backbone
from unseg.data.image import list_images, load_image
from unseg.data.resize import prepare_image
from unseg.features import extract_features
from unseg.utils.device import resolve_device

REPO = Path(__file__).resolve().parents[1]
ECSSD = REPO.parent / "shared" / "data" / "ECSSD" / "images"
EXAMPLES = REPO / "examples" / "images"
SIZE = 320
# images per backbone on CPU (a ViT-S/8 at 320x320 takes about a second per image there)
CPU_IMAGES = {"efficientnet_lite0": 128, "dino_vits16": 64, "dino_vits8": 16}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def images_from() -> str:
    """Where :func:`image_paths` takes the images from."""
    return str(ECSSD) if ECSSD.is_dir() else f"{EXAMPLES} repeated"


def image_paths(n: int, tmp: Path) -> list[Path]:
    """``n`` image files: ECSSD's first ``n``, else the examples repeated (as copies in
    ``tmp``)."""
    if ECSSD.is_dir():
        return list_images(ECSSD)[:n]
    base = list_images(EXAMPLES)
    paths = []
    for i in range(n):
        src = base[i % len(base)]
        dst = tmp / f"{i:05d}{src.suffix}"
        # a distinct byte so that every copy has its own content hash (no cache hits)
        dst.write_bytes(src.read_bytes() + i.to_bytes(4, "little"))
        paths.append(dst)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@torch.inference_mode()
def measure(
    name: str, mode: str, n: int, batch_size: int, device: str, dtype: str, workers: int | None
) -> dict:
    """One measurement (run in a subprocess): images/s and peak memory of ``mode``."""
    with tempfile.TemporaryDirectory(prefix="unseg-bench-img-") as tmp:
        return _measure(name, mode, n, batch_size, device, dtype, workers, Path(tmp))


def _measure(
    name: str, mode: str, n: int, batch_size: int, device: str, dtype: str, workers: int | None,
    tmp: Path,
) -> dict:
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = create_backbone(name, device=dev, pretrained=False)
    paths = image_paths(n, tmp)
    dt = DTYPES[dtype]
    autocast = dev.type == "cuda" and dt != torch.float32
    warm = torch.rand(min(batch_size, n), 3, SIZE, SIZE, device=dev)
    with torch.autocast(dev.type, dtype=dt, enabled=autocast):
        model.forward_features(warm)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if mode == "model":
        prepared = [prepare_image(load_image(p), SIZE, model.stride, True) for p in paths]
        images = torch.stack(prepared).to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            with torch.autocast(dev.type, dtype=dt, enabled=autocast):
                model.forward_features(images[i : i + batch_size]).to("cpu", dt)
        _sync(dev)
        seconds = time.perf_counter() - t0
    else:
        with tempfile.TemporaryDirectory(prefix="unseg-bench-cache-") as cache:
            t0 = time.perf_counter()
            fs = extract_features(
                paths, model, size=SIZE, crop=True, batch_size=batch_size, cache_dir=cache,
                dtype=dt, num_workers=workers,
            )
            _sync(dev)
            seconds = time.perf_counter() - t0
            if fs.stats["computed"] != n:
                raise RuntimeError(f"pipeline computed {fs.stats['computed']} of {n} images")
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            **_peak(dev)}


def _run_child(args: argparse.Namespace, name: str, mode: str, n: int) -> dict:
    cmd = [
        sys.executable, __file__, "--child", name, mode, str(n),
        "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
    ]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0,dino_vits16,dino_vits8")
    parser.add_argument("--images", type=int, default=None, help="images per backbone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs; best kept")
    parser.add_argument(
        "--child", nargs=3, metavar=("BACKBONE", "MODE", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        name, mode, n = args.child
        print(json.dumps(measure(name, mode, int(n), args.batch_size, args.device, args.dtype,
                                 args.workers)))
        return

    dev = resolve_device(args.device)
    results = {}
    for name in args.backbones.split(","):
        n = args.images or (1000 if dev.type == "cuda" else CPU_IMAGES.get(name, 64))
        runs: dict[str, list[dict]] = {"model": [], "pipeline": []}
        for _ in range(args.repeat):  # alternate, so that a busy spell hurts both alike
            for mode in runs:
                runs[mode].append(_run_child(args, name, mode, n))
        model, pipeline = (max(runs[m], key=lambda r: r["images_per_s"]) for m in runs)
        results[name] = {
            "model_alone": model,
            "pipeline": pipeline,
            "pipeline_over_model": round(pipeline["images_per_s"] / model["images_per_s"], 3),
        }
    print(json.dumps({
        "benchmark": "feature extraction, 320x320 (short side 320, centre crop), random weights",
        "images_from": images_from(),
        "batch_size": args.batch_size,
        "repeat": f"best of {args.repeat} alternating runs per mode, each in its own process",
        "dtype": args.dtype,
        "target": "pipeline_over_model >= 0.9",
        "machine": machine(dev),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
