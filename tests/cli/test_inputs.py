"""One behaviour per input across commands: every bad-input case gets the same outcome and the
same message in `features`, `fit`, `predict`, `segment`, `discover` (MaskContrast's paths too)
and `evaluate`, reported exactly once, through the CLI entry point.

Every command runs once on one folder that holds every case (module fixtures); each (case,
command) pair is then its own test. A stand-in backbone (stride 16) keeps the runs fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unseg.cli.main import main
from unseg.data.datasets import resolve_inputs
from unseg.data.inputs import PERMISSION, output_name, unreadable
from unseg.errors import UnsegError
from unseg.utils.batch import BatchReport

BACKBONE = "stand_in16"  # the stand-in every command builds (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("registered_stand_in")
STRIDE = 16
SIZE = ["--size", "64"]
# the MaskContrast head at its smallest (see tests/cli/test_maskcontrast_cli.py)
MASKCONTRAST = ["--epochs", "1", "--width", "16", "--aspp-rates", "1", "2", "--view-size", "32",
                "--loss-size", "16", "--batch-size", "4"]
FAILED = re.compile(r"^failed: (.+?): (.+)$")


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A grey image with one yellow box (what the spectral discovery finds)."""
    rng = np.random.default_rng(seed)
    img = (40 + 20 * rng.random((h, w, 3))).astype(np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : w // 2 + 8] = (230, 220, 40)
    return img


GOOD = ("good0.png", "good1.png", "good2.jpg", "sub/good0.png", "twin.jpg")
IGNORED = (".hidden.png", "notes.txt", "sub/.cache/x.png")
ROOT_ONLY = os.geteuid() == 0


def _messages(cases: Path) -> dict[str, str]:
    """The one message of each bad case (``trunc.png``: its start), whatever the command."""
    return {
        "tiny.png": f"image 1x1 is smaller than one {STRIDE}-pixel patch",
        "twin.png": f"its mask twin.png would overwrite the mask of {cases / 'twin.jpg'} "
        "(same name, another extension)",
        "empty.png": "empty file (0 bytes)",
        "notimage.jpg": "not an image file Pillow can read",
        "trunc.png": "corrupt or truncated image (",
        "broken.png": "broken symbolic link (its target nowhere.png does not exist)",
        "loop.png": "symbolic link loop (the link never reaches a file)",
        "locked.png": PERMISSION,
    }


def _write_cases(cases: Path) -> None:
    (cases / "sub" / ".cache").mkdir(parents=True)
    for i, name in enumerate(GOOD):
        Image.fromarray(_photo(48 + 16 * (i % 2), 64, i)).save(cases / name)
    Image.fromarray(_photo(48, 64, 9)).save(cases / "twin.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(cases / "tiny.png")
    (cases / "empty.png").write_bytes(b"")
    (cases / "notimage.jpg").write_bytes(b"this is not an image")
    whole = (cases / "good0.png").read_bytes()
    (cases / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (cases / "broken.png").symlink_to("nowhere.png")
    (cases / "loop.png").symlink_to("loop.png")
    shutil.copy(cases / "good1.png", cases / "locked.png")
    (cases / "locked.png").chmod(0)
    for name in IGNORED:
        shutil.copy(cases / "good1.png", cases / name)


@contextlib.contextmanager
def _locked(cases: Path) -> Iterator[None]:
    """``locked.png`` unreadable: its mode 000 does it, except for root, who reads any file:
    then opening it raises the error the OS gives everybody else (its real refusal is checked
    in a subprocess as ``nobody``, :func:`test_a_file_without_read_permission_as_a_user`)."""
    if not ROOT_ONLY:
        yield
        return
    locked, real_open = cases / "locked.png", Path.open

    def guarded_open(self: Path, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "open", guarded_open)
        yield


@dataclass
class Ran:
    """One CLI run: exit status, printed streams, failures (path → problem, as printed)."""

    code: int
    out: str
    err: str
    failed: dict[str, str]


@contextlib.contextmanager
def _default_log(stream: io.StringIO) -> Iterator[None]:
    """What the command line shows of the logs by default (WARNING and up), into ``stream``
    (under pytest the CLI's own ``basicConfig`` finds pytest's handlers and adds none)."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _run(args: list[str], cases: Path) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with _locked(cases), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _default_log(err):
        code = main(["-q", *args])
    failed: dict[str, str] = {}
    for line in err.getvalue().splitlines():
        m = FAILED.match(line)
        if m:
            assert m.group(1) not in failed, f"{m.group(1)} reported twice"
            failed[m.group(1)] = m.group(2)
    return Ran(code, out.getvalue(), err.getvalue(), failed)


def _masks(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def _saliency_folder(cases: Path, folder: Path) -> Path:
    """Box masks, named as the images' masks are (sub-folders mirrored), for every image
    with a readable header: MaskContrast's fit then meets each case at the same stage as the
    other commands."""
    for name in (*GOOD, "trunc.png", "twin.png"):
        h, w = (48 + 16 * (GOOD.index(name) % 2), 64) if name in GOOD else (48, 64)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 4 : w // 2 + 8] = 255
        target = folder / output_name(cases / name, cases)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(target)
    return folder


@pytest.fixture(scope="module")
def runs(registered_stand_in: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Every command, once, on the folder of every case: (the folder, name → :class:`Ran`
    and its output folder)."""
    tmp = tmp_path_factory.mktemp("inputs")
    cases = tmp / "cases"
    _write_cases(cases)
    b = ["--backbone", BACKBONE]
    semantic = [*b, *SIZE, "-k", "2", "--refine", "none", "--workers", "1"]
    saliency = _saliency_folder(cases, tmp / "saliency")
    commands: dict[str, list[str]] = {
        "features": ["features", str(cases), *b, *SIZE],
        "fit kmeans": ["fit", "kmeans", str(cases), *semantic],
        "fit saliency": ["fit", "saliency", str(cases), *b, *SIZE, "--epochs", "1",
                         "--batch-size", "2"],
        "fit maskcontrast": ["fit", "maskcontrast", str(cases), "--saliency", str(saliency),
                             *b, *SIZE, *MASKCONTRAST],
        "segment kmeans": ["segment", str(cases), "--method", "kmeans", *semantic],
        "segment maskcontrast": ["segment", str(cases), "--method", "maskcontrast", "-k", "2",
                                 *b, *SIZE, *MASKCONTRAST],
        "discover": ["discover", str(cases), *b],
        "discover head": ["discover", str(cases), "--method", "head", *b, *SIZE, "--epochs", "1",
                          "--batch-size", "2"],
    }
    done: dict[str, tuple[Ran, Path]] = {}
    for name, args in commands.items():
        out = tmp / name.replace(" ", "-")
        done[name] = (_run([*args, "--out", str(out)], cases), out)
    for run, k in (("fit kmeans", []), ("fit saliency", []), ("fit maskcontrast", ["-k", "2"])):
        out = tmp / f"predict-{run.split()[1]}"
        ran = _run(["predict", str(done[run][1]), str(cases), "--out", str(out), *k], cases)
        done[f"predict {run.split()[1]}"] = (ran, out)
    return cases, done


COMMANDS = ("features", "fit kmeans", "fit saliency", "fit maskcontrast", "segment kmeans",
            "segment maskcontrast", "discover", "discover head", "predict kmeans",
            "predict saliency",
            "predict maskcontrast")
CASES = ("tiny.png", "twin.png", "empty.png", "notimage.jpg", "trunc.png", "broken.png",
         "loop.png", "locked.png")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_refused_with_its_one_message(runs, command: str, case: str) -> None:
    cases, done = runs
    ran, _ = done[command]
    assert ran.code == 1, ran.err  # the others were processed, the bad ones listed
    path = str(cases / case)
    expected = _messages(cases)[case]
    assert path in ran.failed, f"{case} not reported by {command}: {ran.err}"
    if case == "trunc.png":  # the decoder's own words follow
        assert ran.failed[path].startswith(expected)
    else:
        assert ran.failed[path] == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_each_bad_input_is_reported_exactly_once(runs, command: str) -> None:
    cases, done = runs
    ran, _ = done[command]
    bad = [str(cases / c) for c in CASES]
    assert sorted(ran.failed) == sorted(bad)
    for path in bad:  # no warning, no second line: the path appears in one line only
        assert sum(path in line for line in (ran.err + ran.out).splitlines()) == 1, ran.err


# every command that writes masks writes them to OUT/masks
MASK_WRITERS = ("segment kmeans", "segment maskcontrast", "discover", "discover head",
                "predict kmeans", "predict saliency", "predict maskcontrast")
EXPECTED_MASKS = sorted(output_name(Path(n), Path(".")).as_posix() for n in GOOD)


@pytest.mark.parametrize("command", sorted(MASK_WRITERS))
def test_equal_names_in_sub_folders_are_mirrored_and_ignored_files_stay_ignored(
    runs, command: str
) -> None:
    """``good0.png`` and ``sub/good0.png`` both get their mask, mirrored under OUT as
    ``segment`` always did; hidden and non-image files are neither read nor reported."""
    cases, done = runs
    ran, out = done[command]
    assert _masks(out / "masks") == EXPECTED_MASKS
    for name in IGNORED:
        assert str(cases / name) not in ran.err + ran.out


def test_discover_boxes_are_keyed_by_the_mirrored_name(runs) -> None:
    _, done = runs
    boxes = json.loads((done["discover"][1] / "boxes.json").read_text())
    assert sorted(boxes) == [m[: -len(".png")] for m in EXPECTED_MASKS]


@pytest.mark.parametrize("command", ["features", "fit kmeans", "fit saliency",
                                     "fit maskcontrast"])
def test_fitting_commands_use_every_good_image_once(runs, command: str) -> None:
    _, done = runs
    _, out = done[command]
    if command == "features":
        index = json.loads(next(out.glob("*/index.json")).read_text())
        assert len(index["images"]) == len(GOOD)
        return
    meta = json.loads((out / "config.json").read_text())
    n = meta.get("n_images", meta.get("training", {}).get("n_images"))
    assert n == len(GOOD)


def test_the_resolver_refuses_the_same_cases(tmp_path: Path) -> None:
    """The library's one listing (what every command calls) against a brute-force account
    of the folder: exactly the good files come back, each bad one is recorded once."""
    cases = tmp_path / "cases"
    _write_cases(cases)
    report = BatchReport()
    with _locked(cases):
        usable = resolve_inputs(cases, report, STRIDE)
    header_only = {"trunc.png"}  # its header reads: its pixels fail when decoded
    assert [p.relative_to(cases).as_posix() for p in usable] == sorted({*GOOD, *header_only})
    messages = _messages(cases)
    got = {p.name: m for p, m in report.failed}
    assert set(got) == set(CASES) - header_only
    for name, problem in got.items():
        assert problem == messages[name]


def test_everything_refused_is_one_error_naming_each_file(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "tiny.png")
    (d / "empty.png").write_bytes(b"")
    for args in (["segment", str(d), "--method", "kmeans", "-k", "2", *SIZE, "--workers", "1"],
                 ["discover", str(d)], ["features", str(d), *SIZE]):
        ran = _run([*args, "--backbone", BACKBONE, "--out", str(tmp_path / args[0])], d)
        assert ran.code == 2
        assert f"{d / 'tiny.png'}: image 1x1 is smaller than one {STRIDE}-pixel patch" in ran.err
        assert f"{d / 'empty.png'}: empty file (0 bytes)" in ran.err


def _ecssd(root: Path) -> Path:
    """An ECSSD-layout root: photos in images/, their masks under the same stems."""
    (root / "images").mkdir(parents=True)
    (root / "ground_truth_mask").mkdir()
    for i in range(2):
        Image.fromarray(_photo(48, 64, i)).save(root / "images" / f"{i:04d}.jpg")
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(
            root / "ground_truth_mask" / f"{i:04d}.png")
    return root


def test_every_command_reads_a_dataset_root_through_its_layout(tmp_path: Path) -> None:
    """The ground-truth masks of a dataset root are never taken for photos."""
    root = _ecssd(tmp_path / "ECSSD")
    b = ["--backbone", BACKBONE, *SIZE]
    semantic = [*b, "-k", "2", "--refine", "none", "--workers", "1"]
    o = tmp_path
    assert _run(["features", str(root), *b, "--out", str(o / "f")], root).code == 0
    assert len(json.loads(next((o / "f").glob("*/index.json")).read_text())["images"]) == 2
    assert _run(["fit", "kmeans", str(root), *semantic, "--out", str(o / "k")], root).code == 0
    assert json.loads((o / "k" / "config.json").read_text())["n_images"] == 2
    for name, args in {
        "segment": ["segment", str(root), "--method", "kmeans", *semantic],
        "discover": ["discover", str(root), "--backbone", BACKBONE],
        "predict": ["predict", str(o / "k"), str(root)],
    }.items():
        ran = _run([*args, "--out", str(o / name)], root)
        assert ran.code == 0, ran.err
        assert _masks(o / name / "masks") == ["0000.png", "0001.png"]  # one layout for all


def test_evaluate_reports_unusable_predictions_once_with_the_same_messages(
    tmp_path: Path,
) -> None:
    """Bad prediction files: refused (exit 2) naming each with its problem, or counted as
    wrong with ``--allow-missing`` (exit 1); hidden and non-image files ignored."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    names = ["a", "b", "c", "d"]
    for n in names:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(gt / f"{n}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pred / "a.png")
    (pred / "b.png").write_bytes(b"")
    (pred / "c.png").symlink_to("nowhere.png")
    (pred / "d.png").write_bytes(b"not a png")
    (pred / ".e.png").write_bytes(b"")
    (pred / "notes.txt").write_text("x")
    expected = {"b.png": "empty file (0 bytes)",
                "c.png": "broken symbolic link (its target nowhere.png does not exist)",
                "d.png": "not an image file Pillow can read"}
    ran = _run(["evaluate", "saliency", "--pred", str(pred), "--gt", str(gt)], pred)
    assert ran.code == 2
    for name, problem in expected.items():
        assert ran.err.count(str(pred / name)) == 1
        assert f"{pred / name}: {problem}" in ran.err
    assert ".e.png" not in ran.err and "notes.txt" not in ran.err
    ran = _run(["evaluate", "saliency", "--pred", str(pred), "--gt", str(gt),
                "--allow-missing"], pred)
    assert ran.code == 1 and "missing" in ran.out


@pytest.mark.skipif(not ROOT_ONLY or shutil.which("setpriv") is None,
                    reason="needs root (to run as nobody) and setpriv")
def test_a_file_without_read_permission_as_a_user(tmp_path: Path) -> None:
    """The OS's own refusal, for a user the mode applies to: the rule says permission denied."""
    d = Path(os.path.realpath(tmp_path)) / "open"
    d.mkdir()
    for p in (d, *d.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o005)
    locked = d / "locked.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(locked)
    locked.chmod(0)
    code = ("import sys; from pathlib import Path; from unseg.data.inputs import unreadable; "
            f"print(unreadable(Path({str(locked)!r})))")
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src},
        check=False, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == PERMISSION
    assert unreadable(locked) is None  # root reads it


def test_unreadable_rules_against_the_os(tmp_path: Path) -> None:
    """Each rule of :func:`unreadable` beside what ``os.stat``/``open`` say of the file."""
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.png").symlink_to("gone.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "dir.png").mkdir()
    for name, expected_errno in (("broken.png", 2), ("loop.png", 40)):
        with pytest.raises(OSError) as exc:
            os.stat(tmp_path / name)
        assert exc.value.errno == expected_errno
    assert unreadable(tmp_path / "ok.png") is None
    assert unreadable(tmp_path / "empty.png") == "empty file (0 bytes)"
    assert unreadable(tmp_path / "broken.png") == \
        "broken symbolic link (its target gone.png does not exist)"
    assert unreadable(tmp_path / "loop.png").startswith("symbolic link loop")
    assert unreadable(tmp_path / "dir.png") == "not a file"
    assert unreadable(tmp_path / "absent.png") == "no such file"
    with pytest.raises(UnsegError, match="no image could be used"):
        resolve_inputs(tmp_path / "empty.png", BatchReport())


def test_a_report_keeps_each_failed_input_once_with_its_first_problem() -> None:
    """What merging the reports of several stages (or torchrun ranks) gives."""
    a, b = Path("a.png"), Path("b.png")
    first = BatchReport(written=[Path("x.png")])
    first.fail(a, "discover's reason")
    first.fail(a, "a later stage's reason")
    later = BatchReport(written=[Path("y.png")], failed=[(a, "no saliency mask"), (b, "empty")])
    merged = BatchReport().merge(first, later)
    assert merged.failed == [(a, "discover's reason"), (b, "empty")]
    assert merged.written == [Path("x.png"), Path("y.png")]
    assert not merged.ok and BatchReport().merge(BatchReport()).ok


@pytest.mark.parametrize("target", ["loop", "broken"])
def test_a_bad_link_as_the_images_argument_is_one_error_naming_it(tmp_path: Path,
                                                                  target: str) -> None:
    """A symbolic link loop (or a broken link) given as IMAGES: status 2 and the link's
    problem, never a traceback, whether or not the command writes a run."""
    link = tmp_path / f"{target}.png"
    link.symlink_to(link.name if target == "loop" else "nowhere.png")
    problem = ("symbolic link loop (the link never reaches a file)" if target == "loop"
               else "broken symbolic link (its target nowhere.png does not exist)")
    run = tmp_path / "k"
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(_photo(48, 64, 0)).save(good / "a.png")
    semantic = ["--backbone", BACKBONE, *SIZE, "-k", "2", "--refine", "none", "--workers", "1"]
    assert _run(["fit", "kmeans", str(good), *semantic, "--out", str(run)], good).code == 0
    for args in (["segment", str(link), "--method", "kmeans", *semantic],
                 ["discover", str(link), "--backbone", BACKBONE],
                 ["features", str(link), "--backbone", BACKBONE, *SIZE],
                 ["predict", str(run), str(link)]):
        ran = _run([*args, "--out", str(tmp_path / args[0])], tmp_path)
        assert ran.code == 2, ran.err
        assert f"unseg: error: {link}: {problem}" in ran.err
    with pytest.raises(UnsegError, match=re.escape(f"{link}: {problem}")):
        resolve_inputs(link, BatchReport())  # the library's listing says the same


def _signatures(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_a_command_that_cannot_run_leaves_the_outputs(tmp_path: Path) -> None:
    """``--overwrite`` deletes the earlier outputs only for a command that can run: a typo in
    IMAGES, a folder without images or an option out of range stops it (status 2) with the
    folder as it was."""
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(_photo(48, 64, 0)).save(good / "a.png")
    (tmp_path / "empty").mkdir()
    semantic = ["--backbone", BACKBONE, "-k", "2", "--refine", "none", "--workers", "1"]
    # each command: what comes before IMAGES, its options, and an option it refuses
    outs = {"fit": (["fit", "kmeans"], [*semantic, *SIZE], ["--size", "8"]),
            "segment": (["segment"], ["--method", "kmeans", *semantic, *SIZE], ["--size", "8"]),
            "discover": (["discover"], ["--method", "spectral", "--backbone", BACKBONE, *SIZE],
                         ["--size", "8"]),
            "predict": (["predict", str(tmp_path / "fit")], [], ["--guided-filter"])}
    for name, (head, rest, _) in outs.items():
        ran = _run([*head, str(good), *rest, "--out", str(tmp_path / name)], good)
        assert ran.code == 0, ran.err
    for name, (head, rest, refused) in outs.items():
        out = tmp_path / name
        before = _signatures(out)
        for images, extra in ((tmp_path / "typo", []), (tmp_path / "empty", []),
                              (good, refused)):
            ran = _run([*head, str(images), *rest, *extra, "--out", str(out), "--overwrite"],
                       good)
            assert ran.code == 2, ran.err
            assert _signatures(out) == before, f"{name} {images} {extra}: {ran.err}"
