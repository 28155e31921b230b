"""Ctrl-C, SIGTERM and killed parents: the CLI's exit statuses, no orphans, no temp files.

The tests marked ``slow`` run ``python -m unseg.cli.main segment`` for real in a subprocess (the
offline efficientnet_lite0 backbone, 22 small images, ``--refine crf``), wait until
it is in the dense CRF of the prediction with some masks already written, send the signal and
check what a user sees. They take tens of seconds each on a loaded 2-core machine: model start-up,
features, PriMaPs-EM and a first round of CRFs come before the signal. The bounds on waiting are
guards against hanging, not timings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unseg.cli.main import main
from unseg.errors import UnsegError
from unseg.utils import io as unseg_io
from unseg.utils.signals import Terminated, sigterm_raises

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find child processes (Linux)"
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "images"
BOUND_S = 60.0  # a hang guard: generous for a loaded machine, far below "forever"
N_IMAGES = 22  # more than one 16-image prediction round, so masks exist before the last CRFs
CRF_MARKER = "CRF: _refine_task"  # the debug line as a prediction CRF round starts


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (None when it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    return _state(pid) not in (None, "Z", "X")


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by the parent pids in ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _wait_gone(pids: set[int], bound: float = BOUND_S) -> set[int]:
    """Wait up to ``bound`` seconds for ``pids`` to end; the ones still alive."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        alive = {p for p in pids if _alive(p)}
        if not alive:
            return alive
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


# ---------------------------------------------------------------- the handlers alone


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(BOUND_S)  # the handler raises before this ends
    assert issubclass(Terminated, KeyboardInterrupt)  # the path of a Ctrl-C
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_child_forked_inside_the_block_dies_of_sigterm_quietly():
    ready_r, ready_w = os.pipe()
    with sigterm_raises():
        pid = os.fork()
        if pid == 0:  # the child: say it runs (a signal before that is lost), sleep
            os.write(ready_w, b"1")
            time.sleep(BOUND_S)
            os._exit(0)
        assert os.read(ready_r, 1) == b"1"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(ready_w)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def _sigterm_then(error: Exception | None):
    """A command that receives SIGTERM, then (when ``error``) fails with ``error`` while the stack
    unwinds, as when a worker killed by the same signal is noticed."""

    def command(args: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(BOUND_S)
        finally:
            if error is not None:
                raise error
        return 0

    return command


@pytest.mark.parametrize("error", [None, RuntimeError("worker killed"), UnsegError("dead")])
def test_the_cli_turns_sigterm_into_status_143(monkeypatch, capsys, error):
    import unseg.cli.backbones

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(unseg.cli.backbones, "run", _sigterm_then(error))
    assert main(["backbones"]) == 143
    assert capsys.readouterr().err == "unseg: terminated; finished outputs are kept\n"
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_error_without_sigterm_is_not_taken_for_one(monkeypatch, capsys):
    import unseg.cli.backbones

    def broken(args: object) -> int:
        raise UnsegError("broken")

    monkeypatch.setattr(unseg.cli.backbones, "run", broken)
    assert main(["backbones"]) == 2
    assert capsys.readouterr().err == "unseg: error: broken\n"


def test_an_interrupted_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """A Ctrl-C right after the temp file is created (here: as its descriptor is closed)."""
    real_close = os.close

    def close_then_interrupt(fd: int) -> None:
        real_close(fd)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(unseg_io.os, "close", close_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            unseg_io.write_bytes_atomic(tmp_path / "mask.png", b"never")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------- the real command in a subprocess (slow)


@dataclass
class _Run:
    """A ``segment`` subprocess whose stderr a thread collects line by line."""

    proc: subprocess.Popen
    out: Path
    lines: list[str] = field(default_factory=list)
    marker: threading.Event = field(default_factory=threading.Event)
    masks_before: int = 0

    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """22 small photos (crops of the bundled examples) and a feature cache the runs share."""
    root = tmp_path_factory.mktemp("interrupts")
    folder = root / "images"
    folder.mkdir()
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(EXAMPLES.glob("*.jpg"))]
    if not photos:
        pytest.skip(f"no bundled example images in {EXAMPLES}")
    for i in range(N_IMAGES):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = (i * 7) % (h // 4), (i * 11) % (w // 4)
        crop = photo[top : top + 3 * h // 4, left : left + 3 * w // 4]
        Image.fromarray(crop).resize((160, 120)).save(folder / f"im{i:02d}.png")
    return folder, root / "cache"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(images: tuple[Path, Path], out: Path, torchrun: bool = False) -> _Run:
    """``unseg -vv segment`` on the images, in its own session (process group); the marker is
    set at the first prediction CRF round that starts after some masks were written (under
    ``torchrun``, 2 CPU ranks: at the first prediction CRF round)."""
    folder, cache = images
    # --size 512: the 160x120 photos are worked on at 683x512, so the CRF round the signal
    # lands in lasts about a second even on an idle machine (at --size 256 the last round of
    # 6 images could finish before the signal arrived, and the run exit 0)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    cmd = [*launcher, "-m", "unseg.cli.main", "-vv", "segment", str(folder), "--out",
           str(out), "--backbone", "efficientnet_lite0", "-k", "3", "--size", "512",
           "--refine", "crf", "--pseudo-refine", "none", "--cache-dir",
           str(cache), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a test run started in the background (nohup,
    # `cmd &` in a script, some CI runners) ignores SIGINT, and the child would inherit that
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=_default_sigint)
    run = _Run(proc, out)

    def collect() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            run.lines.append(line)
            if CRF_MARKER in line and not run.marker.is_set():
                written = len(list((out / "masks").glob("*.png")))
                if written or torchrun:
                    run.masks_before = written
                    run.marker.set()

    threading.Thread(target=collect, daemon=True).start()
    return run


def _wait_for_crf(run: _Run) -> set[int]:
    """Wait until ``run`` is in a prediction CRF round with masks written; its processes."""
    deadline = time.monotonic() + 15 * BOUND_S  # the whole run before the signal, loaded
    while not run.marker.wait(0.05):
        if run.proc.poll() is not None or time.monotonic() > deadline:
            run.proc.kill()
            pytest.fail("the run never reached a CRF round after its first masks "
                        f"(exit {run.proc.poll()}):\n{run.stderr()[-3000:]}")
    return _descendants(run.proc.pid)


def _check_masks(out: Path, at_least: int) -> None:
    """The masks on disk are whole palette PNGs of the inputs' size."""
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) >= at_least
    for mask in masks:
        with Image.open(mask) as img:
            img.load()
            assert img.mode == "P" and img.size == (160, 120)


def _finish(run: _Run) -> int:
    try:
        return run.proc.wait(BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        pytest.fail(f"no exit within {BOUND_S:.0f} s of the signal:\n{run.stderr()[-3000:]}")


@pytest.mark.slow  # a real segment run up to its CRF stage
@pytest.mark.parametrize(
    ("name", "code", "message"),
    [("SIGINT", 130, "unseg: interrupted; finished outputs are kept"),
     ("SIGTERM", 143, "unseg: terminated; finished outputs are kept")],
)
def test_a_signal_in_the_crf_stage_exits_cleanly(images, tmp_path, name, code, message):
    """Ctrl-C as a terminal sends it (to the whole process group), SIGTERM as ``kill PID``."""
    run = _start(images, tmp_path / "out")
    children = _wait_for_crf(run)
    if name == "SIGINT":
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGTERM)
    assert _finish(run) == code
    time.sleep(0.2)  # the collecting thread reads the last lines
    err = run.stderr()
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert err.rstrip().endswith(message)
    assert _wait_gone(children) == set()
    _check_masks(run.out, run.masks_before)
    assert [p for p in run.out.rglob("*") if p.name.endswith(".tmp")] == []


@pytest.mark.slow  # two real segment ranks under torchrun up to their CRF stage
def test_kill_9_of_torchrun_ends_its_ranks_and_their_workers(images, tmp_path):
    """torchrun arms no death signal for its ranks: each rank notices the launcher is gone and
    takes the SIGTERM path (one line each, no traceback)."""
    run = _start(images, tmp_path / "out", torchrun=True)
    children = _wait_for_crf(run)
    assert len(children) >= 2  # the 2 ranks
    run.proc.kill()
    run.proc.wait(BOUND_S)
    assert _wait_gone(children) == set()
    time.sleep(0.2)  # the collecting thread reads the last lines
    err = run.stderr()
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert err.count("unseg: terminated; finished outputs are kept") == 2
