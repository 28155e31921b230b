"""The cheapest benchmark scripts under ``bench/`` run end to end in their smallest setting.

``test_bench_imports.py`` only imports the scripts; these run a few of them (each a few seconds:
random weights or the packaged ones, no network) as ``python bench/x.py`` runs them, and check
that stdout is one JSON document stating the machine and that no temporary folder is left
behind. The scripts that read the real data skip with a message when ``../shared/data`` is
absent (``shared_data``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = {  # script and its smallest options; the ../shared/data folders it reads
    "boosting": (["bench/boosting.py", "--repeats", "1", "--threads", "1", "--device", "cpu"],
                 []),
    "primaps_em": (["bench/primaps.py", "--only", "em", "--em-batch", "2", "--em-steps", "1",
                    "--em-dim", "16"], []),
    "found_threshold": (["bench/found_threshold.py", "--ecssd", "2", "--voc", "2"],
                        ["ECSSD", "VOC2007"]),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=[pytest.mark.realdata] if data else []) for name, (_, data) in
    CASES.items()
])
def test_bench_script_runs_small(
    case: str, shared_data: Callable[[str], Path], tmp_path: Path
) -> None:
    args, data = CASES[case]
    for sub in data:
        shared_data(sub)  # skips when absent
    # this checkout's library first, as `PYTHONPATH=src python bench/x.py`
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    scratch = tmp_path / "tmp"  # the script's temporary folders, to see that none is left
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert result["machine"]["device"] == "cpu"  # boosting: --device cpu; the others: CPU only
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []  # (torch's own compile cache may stay: it is shared by design)


def test_vit_mutations_rows_say_how_far_each_mistake_moves() -> None:
    """bench/vit_mutations.py printed text lines; its JSON has a row per mistake and backbone:
    the baseline within the reference test's tolerance, a mistake far outside it."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/vit_mutations.py", "--backbone", "dino_vits16", "--mutation",
         "q / k swapped", "--mutation", "none (baseline)"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # one document, the progress on stderr
    assert result["machine"]["cpu_count"] == os.cpu_count()
    rows = {r["mutation"]: r for r in result["rows"]}
    assert set(rows) == {"q / k swapped", "none (baseline)"}
    assert {r["backbone"] for r in rows.values()} == {"dino_vits16"}
    assert rows["none (baseline)"]["max_diff"] < 1e-5 < 1e-2 < rows["q / k swapped"]["max_diff"]
    assert len(proc.stderr.strip().splitlines()) >= 2  # a progress line per row


def test_features_bench_removes_its_image_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ECSSD, bench/features.py copies the example images into a temporary folder in
    each measurement, and left every one of them behind."""
    import tempfile

    monkeypatch.setattr(sys, "path", [str(REPO / "bench"), *sys.path])
    spec = importlib.util.spec_from_file_location("_bench_features", REPO / "bench/features.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_bench_features", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ECSSD", tmp_path / "no-ecssd")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = module.measure("efficientnet_lite0", "model", 3, 3, "cpu", "float32", None)
    assert result["images"] == 3
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_scratch_folder_keeps_the_users_and_removes_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench/_scratch.py``: the folder a script was given (``--cache``) stays with what was
    written in it; the temporary one it made otherwise is gone, also after an error."""
    import tempfile

    monkeypatch.setattr(sys, "path", [str(REPO / "bench"), *sys.path])
    monkeypatch.delitem(sys.modules, "_scratch", raising=False)
    from _scratch import scratch_folder

    given = tmp_path / "cache"
    with scratch_folder(str(given), "unseg-x-") as folder:
        assert folder == given
        given.mkdir()
        (folder / "kept").write_text("x")
    assert (given / "kept").read_text() == "x"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(RuntimeError, match="interrupted"), scratch_folder(None, "unseg-x-") as f:
        assert f.parent == tmp_path / "tmp" and f.name.startswith("unseg-x-")
        (f / "made").write_text("x")
        raise RuntimeError("interrupted")
    assert list((tmp_path / "tmp").iterdir()) == []
