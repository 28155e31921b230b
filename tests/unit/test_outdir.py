"""Output folders (unseg.outdir): refusal of a used folder, --resume, --overwrite, the manifest."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unseg import __version__
from unseg.errors import InputFileError, UnsegError
from unseg.outdir import (
    MANIFEST_FILE,
    claim,
    differences,
    fingerprint,
    read_manifest,
    recorded,
    scan,
    summarize,
)
from unseg.utils.timing import Timings

SETTINGS = {"images": "/data/photos", "--num-classes": 3, "--refine": "none", "--pair": (1, 2)}


def _write(folder: Path, rel: str, text: str = "x") -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _run(folder: Path, files: list[str], settings=SETTINGS, mode="new", text="x") -> dict:
    """A command writing ``files`` into ``folder``; returns the manifest after it."""
    with recorded(folder, "segment", settings, mode, ["unseg", "segment"]) as record:
        for rel in files:
            _write(folder, rel, text)
        Timings().add("fitting", 1.5)
        record.exit_code = 0
    manifest = read_manifest(folder)
    assert manifest is not None
    return manifest


def _on_disk(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST_FILE}


def test_a_new_folder_records_the_command_and_exactly_its_files(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    manifest = _run(out, ["masks/a.png", "masks/sub/b.png", "run/config.json", "report.html"])
    (entry,) = manifest["commands"]
    assert set(entry["files"]) == _on_disk(out) == {"masks/a.png", "masks/sub/b.png",
                                                     "run/config.json", "report.html"}
    assert entry["command"] == "segment" and entry["argv"] == ["unseg", "segment"]
    assert entry["status"] == "finished" and entry["exit_code"] == 0
    assert entry["unseg_version"] == __version__ and entry["resumed"] is False
    assert entry["settings"]["--pair"] == [1, 2]  # as JSON reads it back
    assert entry["fingerprint"] == fingerprint("segment", SETTINGS)
    assert entry["timings"] == {"fitting": 1.5}  # every Timings of the command is gathered
    assert entry["started"] <= entry["finished"] and entry["seconds"] >= 0
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest


def test_an_empty_folder_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert _run(tmp_path / "empty", ["a.png"])["commands"][0]["files"] == ["a.png"]


def test_a_folder_of_other_files_is_refused_whatever_the_flags(tmp_path: Path) -> None:
    _write(tmp_path, "holiday/beach.jpg")
    _write(tmp_path, "notes.txt")
    for mode, hint in (("new", "choose another --out"), ("resume", "choose another --out"),
                       ("overwrite", "--overwrite deletes only the files unseg recorded")):
        with pytest.raises(UnsegError) as err:
            claim(tmp_path, "segment", SETTINGS, mode)
        message = str(err.value)
        assert message.startswith(f"{tmp_path}: holds 2 file(s): holiday/ (1), notes.txt")
        assert "unseg did not write" in message and hint in message
    assert _on_disk(tmp_path) == {"holiday/beach.jpg", "notes.txt"}
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_a_used_folder_is_refused_naming_the_command_and_both_options(tmp_path: Path) -> None:
    _run(tmp_path, ["masks/a.png", "masks/b.png", "run/config.json"])
    before = {p: (tmp_path / p).read_text() for p in _on_disk(tmp_path)}
    with pytest.raises(UnsegError) as err:
        claim(tmp_path, "segment", SETTINGS)
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: already holds the outputs of `unseg segment` "
                              "(finished ")
    assert "3 file(s): masks/ (2), run/ (1)" in message
    assert "--resume to continue it (this command's configuration is the same)" in message
    assert "--overwrite to delete those files" in message
    with pytest.raises(UnsegError, match=r"not possible here, the configuration differs: "
                       r"--num-classes: 3 before, 4 now"):
        claim(tmp_path, "segment", {**SETTINGS, "--num-classes": 4})
    assert {p: (tmp_path / p).read_text() for p in _on_disk(tmp_path)} == before


def test_resume_with_the_same_configuration_appends_a_resumed_command(tmp_path: Path) -> None:
    _run(tmp_path, ["cache/f.bin", "masks/a.png"])
    manifest = _run(tmp_path, ["masks/a.png", "masks/b.png"], mode="resume", text="y")
    first, second = manifest["commands"]
    assert second["resumed"] is True and second["status"] == "finished"
    assert first["files"] == ["cache/f.bin", "masks/a.png"]
    assert second["files"] == ["masks/a.png", "masks/b.png"]  # cache/f.bin was reused as it was
    assert {f for c in manifest["commands"] for f in c["files"]} == _on_disk(tmp_path)


def test_resume_with_another_configuration_is_refused_naming_each_difference(
    tmp_path: Path,
) -> None:
    _run(tmp_path, ["masks/a.png"])
    changed = {**SETTINGS, "--num-classes": 4, "--seed": 1}
    del changed["--refine"]
    with pytest.raises(UnsegError) as err:
        claim(tmp_path, "segment", changed, "resume")
    message = str(err.value)
    assert "--resume continues `unseg segment`" in message and "3 setting(s) differ" in message
    assert ('--num-classes: 3 before, 4 now; --refine: "none" before, not given now; '
            "--seed: not given before, 1 now") in message
    assert "--overwrite to replace its outputs" in message
    with pytest.raises(UnsegError, match=r"command: \"segment\" before, \"predict\" now"):
        claim(tmp_path, "predict", SETTINGS, "resume")
    assert len(read_manifest(tmp_path)["commands"]) == 1


def test_overwrite_deletes_only_what_unseg_recorded(tmp_path: Path) -> None:
    _run(tmp_path, ["masks/a.png", "masks/b.png", "masks/deep/c.png", "run/config.json"])
    (tmp_path / "masks" / "user.txt").write_text("mine")
    with pytest.raises(UnsegError, match=r"holds 1 file\(s\): masks/ \(1\) that unseg did not "
                       r"write; --overwrite deletes only"):
        claim(tmp_path, "segment", SETTINGS, "overwrite")
    assert _on_disk(tmp_path) == {"masks/a.png", "masks/b.png", "masks/deep/c.png",
                                  "run/config.json", "masks/user.txt"}
    (tmp_path / "masks" / "user.txt").unlink()
    manifest = _run(tmp_path, ["masks/z.png"], {**SETTINGS, "--num-classes": 4}, "overwrite")
    assert _on_disk(tmp_path) == {"masks/z.png"}  # no stale mask of the earlier command
    assert not (tmp_path / "run").exists() and not (tmp_path / "masks" / "deep").exists()
    (entry,) = manifest["commands"]
    assert entry["settings"]["--num-classes"] == 4 and entry["files"] == ["masks/z.png"]


def test_a_manifest_never_leads_outside_the_folder(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", _write(tmp_path, "victim.txt")
    _run(out, ["a.png"])
    manifest = read_manifest(out)
    manifest["commands"][0]["files"] += ["../victim.txt", str(victim)]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    claim(out, "segment", SETTINGS, "overwrite")
    assert victim.exists() and not (out / "a.png").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_midway(folder: Path, pid: int, start: int | None = None) -> None:
    """What ``kill -9`` leaves: a running entry that recorded no file, and the files."""
    claim(folder, "segment", SETTINGS)
    manifest = read_manifest(folder)
    manifest["commands"][0].update(pid=pid, pid_start=start)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    _write(folder, "cache/f.bin")
    _write(folder, ".masks.tmp")


def test_a_killed_command_is_resumed_and_its_files_stay_unseg_s(tmp_path: Path) -> None:
    _killed_midway(tmp_path, _dead_pid())
    with pytest.raises(UnsegError, match=r"outputs of `unseg segment` \(unfinished, started"):
        claim(tmp_path, "segment", SETTINGS)
    manifest = _run(tmp_path, ["masks/a.png"], mode="resume")
    killed, resumed = manifest["commands"]
    assert killed["status"] == "unfinished" and killed["files"] == [".masks.tmp", "cache/f.bin"]
    assert resumed["resumed"] is True and resumed["files"] == ["masks/a.png"]
    with recorded(tmp_path, "segment", SETTINGS, "overwrite"):
        pass  # wrote nothing: the manifest goes too
    assert not any(tmp_path.iterdir())


def test_a_folder_another_live_process_writes_into_is_refused(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _killed_midway(tmp_path, proc.pid)
        for mode in ("new", "resume", "overwrite"):
            with pytest.raises(UnsegError, match=rf"is still writing into this folder \(process "
                               rf"{proc.pid}\)"):
                claim(tmp_path, "segment", SETTINGS, mode)
        _killed_midway(tmp_path / "reused", proc.pid, start=1)  # another process, same id
        assert claim(tmp_path / "reused", "segment", SETTINGS, "resume").entry["resumed"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt, "interrupted"),
                                               (RuntimeError, "failed")])
def test_how_a_command_ended_is_recorded(tmp_path: Path, error: type, status: str) -> None:
    with pytest.raises(error), recorded(tmp_path, "fit kmeans", SETTINGS):
        _write(tmp_path, "weights.safetensors")
        raise error()
    (entry,) = read_manifest(tmp_path)["commands"]
    assert entry["status"] == status and entry["files"] == ["weights.safetensors"]


def test_a_command_that_wrote_nothing_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UnsegError), recorded(out, "segment", SETTINGS):
        raise UnsegError("--num-classes must be at least 2")
    assert not out.exists()
    (tmp_path / "kept").mkdir()
    with recorded(tmp_path / "kept", "segment", SETTINGS):
        pass
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_bad_manifests_and_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(InputFileError, match=rf"{MANIFEST_FILE}: unreadable unseg manifest"):
        claim(tmp_path, "segment", SETTINGS)
    (tmp_path / MANIFEST_FILE).write_text('{"commands": 3}')
    with pytest.raises(InputFileError, match="not an unseg manifest"):
        claim(tmp_path, "segment", SETTINGS)
    with pytest.raises(UnsegError, match="names a file, not a folder"):
        claim(tmp_path / MANIFEST_FILE, "segment", SETTINGS)


def test_scan_sees_files_and_links_but_not_the_manifest(tmp_path: Path) -> None:
    _write(tmp_path, "a/b.png", "abc")
    _write(tmp_path, MANIFEST_FILE)
    _write(tmp_path, f".{MANIFEST_FILE}.x1.tmp")
    (tmp_path / "elsewhere").mkdir()
    _write(tmp_path, "elsewhere/inner.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "a" / "link")
    found = scan(tmp_path)
    assert set(found) == {"a/b.png", "a/link", "elsewhere/inner.png"}
    st = (tmp_path / "a" / "b.png").stat()
    assert found["a/b.png"] == (3, st.st_mtime_ns)
    assert scan(tmp_path / "missing") == {}


def test_differences_fingerprints_and_summaries_by_hand() -> None:
    assert differences({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}) == []
    assert differences({"a": 1, "b": None}, {"a": 2, "c": "x"}) == [
        "a: 1 before, 2 now", "b: null before, not given now", 'c: not given before, "x" now'
    ]
    assert fingerprint("segment", {"a": 1, "b": (1, 2)}) == fingerprint("segment",
                                                                         {"b": [1, 2], "a": 1})
    assert fingerprint("segment", {"a": 1}) != fingerprint("segment", {"a": 2})
    assert fingerprint("segment", {"a": 1}) != fingerprint("predict", {"a": 1})
    assert fingerprint("segment", {"a": 1}) != fingerprint("segment", {"a": 1}, "0.0.1")
    assert summarize(["masks/a.png", "masks/b.png", "report.html"]) == (
        "3 file(s): masks/ (2), report.html")
    assert summarize([f"f{i}" for i in range(8)], limit=2) == "8 file(s): f0, f1, and 6 more"


def test_overwrite_refuses_to_delete_what_the_command_reads(tmp_path: Path) -> None:
    """`unseg predict OUT/run IMAGES --out OUT --overwrite` must not delete the run it reads."""
    _run(tmp_path, ["masks/a.png", "run/config.json", "run/weights.safetensors"])
    with pytest.raises(UnsegError, match=r"--overwrite would delete 2 file\(s\): run/ \(2\), "
                       r"which this command reads \(.*run\)"):
        claim(tmp_path, "predict", SETTINGS, "overwrite", reads=[tmp_path / "run"])
    assert _on_disk(tmp_path) == {"masks/a.png", "run/config.json", "run/weights.safetensors"}
    with pytest.raises(UnsegError, match=r"would delete 1 file\(s\): masks/ \(1\), which"):
        claim(tmp_path, "segment", SETTINGS, "overwrite", reads=[tmp_path / "masks" / "a.png"])
    claim(tmp_path, "segment", SETTINGS, "overwrite",
          reads=[tmp_path.parent / "elsewhere"]).close("finished")
    assert _on_disk(tmp_path) == set()


def _bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the manifest and hidden ones too) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_overwrite_loses_nothing(tmp_path: Path) -> None:
    """``--overwrite`` deleted the previous outputs when it claimed the folder, so a command
    that failed midway (MaskContrast's discovery finding no object at a tiny --max-side) left
    neither. Now they are set aside until the command ends: a failure removes its own files
    and puts them back with their manifest, byte for byte; a finished command deletes them."""
    _run(tmp_path, ["masks/a.png", "masks/deep/b.png", "run/config.json", "report.html"])
    os.symlink("masks", tmp_path / "linked")  # a recorded link: set aside as a link
    manifest = read_manifest(tmp_path)
    manifest["commands"][0]["files"].append("linked")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    before = _bytes(tmp_path)
    with pytest.raises(UnsegError, match=r"all 6 masks are empty \(.*: nothing was deleted: "
                       r"the outputs of `unseg segment` \(finished.*are back in place"):
        with recorded(tmp_path, "segment", {**SETTINGS, "--num-classes": 4}, "overwrite"):
            assert not (tmp_path / "masks").exists() and not (tmp_path / "linked").exists()
            _write(tmp_path, "discover/masks/a.png")
            _write(tmp_path, "masks/a.png", "new")  # where a previous output was
            raise UnsegError("discover/masks: all 6 masks are empty")
    assert _bytes(tmp_path) == before and os.readlink(tmp_path / "linked") == "masks"
    assert not (tmp_path / "discover").exists() and not (tmp_path / ".unseg-overwritten").exists()
    manifest = _run(tmp_path, ["masks/z.png"], {**SETTINGS, "--num-classes": 4}, "overwrite")
    assert _on_disk(tmp_path) == {"masks/z.png"} and not (tmp_path / "linked").is_symlink()
    assert [e["files"] for e in manifest["commands"]] == [["masks/z.png"]]


def test_a_failing_overwrite_says_its_restore_once(tmp_path: Path, caplog) -> None:
    """The restore was logged at INFO by the record and again on the error's line or as a
    warning by :func:`recorded`, so ``-v`` printed it twice; now once, wherever it ends."""
    import logging

    for error, where in ((UnsegError("no mask"), "error"), (RuntimeError("bug"), "log")):
        _run(tmp_path / where, ["masks/a.png"])
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="unseg"):
            with pytest.raises(type(error)) as raised:
                with recorded(tmp_path / where, "segment", SETTINGS, "overwrite"):
                    _write(tmp_path / where, "masks/a.png", "new")
                    raise error
        said = [r for r in caplog.records
                if r.levelno >= logging.INFO and "nothing was deleted" in r.getMessage()]
        assert len(said) + ("nothing was deleted" in str(raised.value)) == 1, where
        assert (where == "error") == ("nothing was deleted" in str(raised.value))


def test_an_interrupted_or_killed_overwrite_keeps_its_own_files(tmp_path: Path) -> None:
    """An interrupted ``--overwrite`` keeps what it wrote (for --resume), not the previous
    outputs; a killed one leaves them set aside, and the next command deletes them."""
    _run(tmp_path, ["masks/a.png"])
    with pytest.raises(KeyboardInterrupt):
        with recorded(tmp_path, "segment", SETTINGS, "overwrite"):
            _write(tmp_path, "masks/b.png")
            raise KeyboardInterrupt
    assert _bytes(tmp_path).keys() == {"masks/b.png", MANIFEST_FILE}
    for mode, left in (("resume", {"masks/c.png", "masks/d.png"}), ("overwrite", {"masks/d.png"})):
        record = claim(tmp_path, "segment", SETTINGS, "overwrite")  # then kill -9
        record.entry["pid"] = _dead_pid()
        (tmp_path / MANIFEST_FILE).write_text(json.dumps(record.manifest))
        aside = _on_disk(tmp_path)
        assert aside and all(f.startswith(".unseg-overwritten/") for f in aside)
        _write(tmp_path, "masks/c.png")
        _run(tmp_path, ["masks/d.png"], mode=mode)
        assert _on_disk(tmp_path) == left, mode


@pytest.mark.parametrize("when", [3, 5])  # the third of four moves; the manifest's write
def test_an_interrupt_while_setting_aside_loses_nothing(tmp_path: Path, monkeypatch,
                                                        when: int) -> None:
    """A Ctrl-C (or SIGTERM) while ``--overwrite`` moved the previous outputs into
    .unseg-overwritten, before its manifest entry was written, left some of them there: the
    manifest still recorded them at their places, so a later --overwrite refused the folder as
    holding '.unseg-overwritten/ files that unseg did not write', --resume left them there for
    good, and the outputs looked half gone. Now the interrupt puts them back, with their
    manifest, before it goes on."""
    _run(tmp_path, ["masks/a.png", "masks/b.png", "overlays/a.jpg", "run/config.json"])
    before = _bytes(tmp_path)
    replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == when:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claim(tmp_path, "segment", {**SETTINGS, "--num-classes": 4}, "overwrite")
    monkeypatch.setattr(os, "replace", replace)
    assert _bytes(tmp_path) == before and not (tmp_path / ".unseg-overwritten").exists()


def test_a_set_aside_killed_before_its_claim_is_put_back(tmp_path: Path) -> None:
    """A ``kill -9`` while ``--overwrite`` moved the previous outputs aside, before its manifest
    entry was written, leaves the manifest recording them at their places and some of them in
    .unseg-overwritten: the next command puts those back (it refused the folder as holding
    files unseg did not write, whatever the flags)."""
    _run(tmp_path, ["masks/a.png", "masks/b.png", "run/config.json"])
    before = _bytes(tmp_path)
    for rel in ("masks/a.png", "run/config.json"):  # what the killed command had moved
        (tmp_path / ".unseg-overwritten" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path / rel, tmp_path / ".unseg-overwritten" / rel)
    with pytest.raises(UnsegError, match=r"already holds the outputs of `unseg segment` "
                       r"\(finished .*: 3 file\(s\): masks/ \(2\), run/ \(1\)\. Give --resume"):
        claim(tmp_path, "segment", SETTINGS)
    assert _bytes(tmp_path) == before and not (tmp_path / ".unseg-overwritten").exists()
    _write(tmp_path, ".unseg-overwritten/masks/b.png")  # the place is taken: left there
    with pytest.raises(UnsegError, match=r"1 file\(s\): \.unseg-overwritten/ \(1\) that unseg "
                       "did not write"):
        claim(tmp_path, "segment", SETTINGS, "overwrite")
    assert _on_disk(tmp_path) == {"masks/a.png", "masks/b.png", "run/config.json",
                                  ".unseg-overwritten/masks/b.png"}


def test_an_overwrite_interrupted_before_writing_anything_loses_nothing(
        tmp_path: Path, caplog) -> None:
    """A Ctrl-C in the first seconds of ``--overwrite`` (the backbone still loading) deleted the
    previous outputs and left an empty folder, with nothing for --resume to continue, while the
    CLI said 'interrupted; finished outputs are kept'. Now a command interrupted before it wrote
    a file puts them back, as a failed one does; one that wrote some keeps those for --resume
    and says that the previous outputs are deleted."""
    _run(tmp_path, ["masks/a.png", "run/config.json"])
    before = _bytes(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with recorded(tmp_path, "segment", {**SETTINGS, "--num-classes": 4}, "overwrite"):
            raise KeyboardInterrupt
    assert _bytes(tmp_path) == before and not (tmp_path / ".unseg-overwritten").exists()
    assert "nothing was deleted" in caplog.text
    caplog.clear()
    with pytest.raises(KeyboardInterrupt):
        with recorded(tmp_path, "segment", {**SETTINGS, "--num-classes": 4}, "overwrite"):
            _write(tmp_path, "run/cache/a.bin")
            raise KeyboardInterrupt
    assert _on_disk(tmp_path) == {"run/cache/a.bin"}
    assert re.search(r"the outputs of `unseg segment` \(finished .*\) that --overwrite set aside "
                     r"are deleted; this command's 1 file\(s\): run/ \(1\) are kept for --resume",
                     caplog.text)


def test_after_a_killed_overwrite_the_refusal_says_what_is_set_aside(tmp_path: Path,
                                                                     caplog) -> None:
    """After a ``kill -9`` of ``--overwrite``, a plain run was refused with '.unseg-overwritten/
    (N)' among the killed command's files and no word of what that was; ``--resume`` then
    deleted the previous outputs there with an INFO line nobody sees. Both now say it."""
    _run(tmp_path, ["masks/a.png"])
    record = claim(tmp_path, "segment", SETTINGS, "overwrite")  # then kill -9
    record.entry["pid"] = _dead_pid()
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(record.manifest))
    _write(tmp_path, "masks/b.png")
    with pytest.raises(UnsegError, match=r"2 file\(s\): \.unseg-overwritten/ \(1\), masks/ "
                       r"\(1\) \(\.unseg-overwritten holds the outputs it was replacing when it "
                       r"was stopped: --resume and --overwrite delete them; move that folder "
                       r"out of .* to keep them\)\. Give --resume"):
        claim(tmp_path, "segment", SETTINGS)
    with caplog.at_level("WARNING"):
        claim(tmp_path, "segment", SETTINGS, "resume")
    assert re.search(r"deleting 1 file\(s\): \.unseg-overwritten/ \(1\), the outputs that a "
                     r"killed --overwrite was replacing", caplog.text)
    assert _on_disk(tmp_path) == {"masks/b.png"}


def test_an_overwrite_out_of_disk_space_says_the_previous_outputs_hold_it(tmp_path: Path) -> None:
    """``--overwrite`` keeps the previous outputs until the command ends, so on a disk with room
    for one run and not two it now fails where it succeeded when it deleted them first; the
    failure put them back but ended in a traceback of 'No space left on device'. Now one line
    says that the previous outputs, back in place, take that room, and what to do."""
    _run(tmp_path, ["masks/a.png", "run/weights.safetensors"], text="x" * 1500)
    before = _bytes(tmp_path)
    with pytest.raises(UnsegError, match=r"No space left on device.*: nothing was deleted: "
                       r"the outputs of `unseg segment` .* are back in place, and this "
                       r"command's removed; --overwrite keeps them \(3.0 kB\) until the command "
                       r"ends: free that much space, or delete them yourself and run again "
                       r"without --overwrite"):
        with recorded(tmp_path, "segment", SETTINGS, "overwrite"):
            _write(tmp_path, "masks/a.png")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:  # as safetensors reports it: another error, from it
                raise RuntimeError("I/O error: No space left on device (os error 28)") from exc
    assert _bytes(tmp_path) == before
