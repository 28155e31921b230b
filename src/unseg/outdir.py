"""Output folders that cannot lie: who may write into ``--out``, and what wrote every file there.

Every command that writes an output folder (``segment``, ``discover``, ``predict``, ``fit``'s
run folder) records itself in ``OUT/unseg-manifest.json`` (written atomically):

.. code-block:: json

    {"format_version": 1,
     "commands": [{"command": "segment", "argv": [...], "unseg_version": "0.2.0",
                   "settings": {"images": "/abs/photos", "--num-classes": 5, ...},
                   "fingerprint": "<sha256 of command, version and settings>",
                   "resumed": false, "started": "...Z", "finished": "...Z",
                   "status": "finished", "exit_code": 0, "seconds": 12.3,
                   "timings": {"backbone": 3.2, ...}, "pid": 123, "pid_start": 456,
                   "host": "...",
                   "files": ["masks/a.png", "run/config.json", ...]}]}

``files`` are the paths (relative, ``/``-separated) the command created or changed and that are
still there; the manifest itself is not listed. ``status`` is ``running`` while the command
runs (a ``kill -9`` leaves it so), then ``finished``, ``failed`` or ``interrupted``; a later
command finds a ``running`` entry of a dead process and calls it ``unfinished``.

Rules (:func:`claim`): a missing or empty folder (no file but the manifest) is used as it is.
A folder holding another command's outputs is refused unless ``--resume`` (the same command,
unseg version and settings: its fingerprint; the message names each setting that differs) or
``--overwrite`` (replaces the files the manifest records, and only those). Files that no
command recorded are never deleted and make ``--overwrite`` refuse; a folder of such files is
refused whatever the flags. The files of an ``unfinished`` command (it could not record them)
are all the unrecorded files present when the next command starts.

``--overwrite`` moves the previous outputs into ``OUT/.unseg-overwritten`` (:data:`SET_ASIDE`)
and deletes them when the command ends; a command that fails (an error, not an interrupt)
loses nothing: its own files are removed and the previous outputs and manifest put back, as
some errors show only midway (MaskContrast's discovery finding no object at a tiny
``--max-side``). An interrupted one keeps its files for ``--resume`` (one interrupted before
it wrote a file puts the previous outputs back, as a failed one); a ``kill -9`` leaves
the folder set aside, which the next command deletes with the killed one's files. Stopped
while it sets them aside (before its own manifest entry is written), nothing is lost: a
Ctrl-C puts them back at once, and after a ``kill -9`` the next command does. Kept until the
end, they take room a full disk may lack: the error says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from unseg._version import __version__
from unseg.errors import InputFileError, UnsegError
from unseg.layout import MANIFEST_FILE, MASKS_DIR
from unseg.utils.io import (
    atomic_temp_pattern,
    make_folder,
    write_bytes_atomic,
    write_json_atomic,
)
from unseg.utils.timing import Timings, collect

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SET_ASIDE = ".unseg-overwritten"  # --overwrite's previous outputs, until the command ends
Mode = Literal["new", "resume", "overwrite"]
Signature = tuple[int, int]  # (size, mtime_ns) of a file as last seen

_UNSET = object()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_manifest(rel: str) -> bool:
    """The manifest and the temporary files of its atomic writes."""
    return rel == MANIFEST_FILE or (rel.startswith(f".{MANIFEST_FILE}.") and rel.endswith(".tmp"))


# the temporary file of an atomic write: unseg's ``.NAME.RANDOM.tmp`` (``unseg.utils.io``) and
# the one safetensors writes inside it (``.tmpRANDOM``); a kill -9 leaves it behind
_TEMP_FILE = re.compile(rf"{atomic_temp_pattern('.+').pattern}|\.tmp[A-Za-z0-9]{{6}}")


def _set_aside_file(rel: str) -> bool:
    """Whether ``rel`` lies in the folder ``--overwrite`` sets the previous outputs aside in."""
    return rel.startswith(f"{SET_ASIDE}/")


def is_temp_file(rel: str) -> bool:
    """Whether ``rel`` names the temporary file of an atomic write (:data:`_TEMP_FILE`)."""
    return _TEMP_FILE.fullmatch(rel.rsplit("/", 1)[-1]) is not None


def scan(folder: str | Path) -> dict[str, Signature]:
    """Every file and symlink under ``folder`` except the manifest: relative ``/``-separated
    path → ``(size, mtime_ns)``. Symlinks are not followed. Empty for a missing folder."""
    folder = Path(folder)
    found: dict[str, Signature] = {}
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for name in [*files, *(d for d in dirs if (here / d).is_symlink())]:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if _is_manifest(rel):
                continue
            try:
                st = path.lstat()
            except OSError:  # removed while walking
                continue
            found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None when it has none; a broken one is an error naming it."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"unreadable unseg manifest ({exc}); unseg cannot tell "
                             "which files there are its own: choose another --out") from None
    commands = data.get("commands") if isinstance(data, dict) else None
    if not isinstance(commands, list) or not all(
        isinstance(c, dict) and isinstance(c.get("files", []), list) for c in commands
    ):
        raise InputFileError(path, "not an unseg manifest (expected a 'commands' list); "
                             "choose another --out")
    return data


def record_written(folder: str | Path, path: str | Path) -> None:
    """Record ``path``, written into the output ``folder`` after its command ended (``unseg
    report``'s ``coco_results.json``), as the last command's file: ``--overwrite`` deletes it
    with that command's outputs (they made it) and ``--resume`` does not take it for a file
    unseg did not write. Nothing when ``path`` is outside ``folder`` or ``folder`` has no
    manifest, or while a command is writing there (its own record covers the folder)."""
    folder, path = Path(folder).resolve(), Path(path).resolve()
    if folder not in path.parents:
        return
    try:
        manifest = read_manifest(folder)
    except InputFileError as exc:  # the file is written: say why it is not recorded
        logger.warning("%s is not recorded: %s", path, exc)
        return
    if not manifest or not manifest["commands"]:
        return
    last = manifest["commands"][-1]
    if last.get("status") in ("running", "unfinished"):
        return
    rel = path.relative_to(folder).as_posix()
    if rel not in last.get("files", []):
        last["files"] = sorted({*last.get("files", []), rel})
        try:
            write_json_atomic(folder / MANIFEST_FILE, manifest)
        except OSError as exc:
            logger.warning("%s is not recorded in %s (%s)", path, MANIFEST_FILE, exc)


def _last_recorded(folder: str | Path, pick: Callable[[dict[str, Any]], Any]) -> Any:
    """``pick`` of the last command of ``folder``'s manifest for which it is not None; None
    without a (readable) manifest or such a command (the reading commands work without it)."""
    try:
        manifest = read_manifest(folder)
    except InputFileError as exc:
        logger.debug("manifest not read: %s", exc)
        return None
    for command in reversed([] if manifest is None else manifest["commands"]):
        found = pick(command)
        if found is not None:
            return found
    return None


def recorded_setting(folder: str | Path, name: str) -> Any:
    """The value of setting ``name`` (e.g. ``"--max-pixels"``) in the last command of
    ``folder``'s manifest that records it; None without a (readable) manifest or such a
    command."""

    def pick(command: dict[str, Any]) -> Any:
        settings = command.get("settings")
        return (settings[name],) if isinstance(settings, dict) and name in settings else None

    found = _last_recorded(folder, pick)  # a 1-tuple: a recorded None is a value too
    return None if found is None else found[0]


MAX_RECORDED_FAILURES = 1000  # inputs listed in a manifest entry; ``failed_count`` has them all


def recorded_failures(folder: str | Path) -> tuple[list[tuple[str, str]], int]:
    """The inputs (path, problem) that the last command of ``folder``'s manifest recording
    failures could not use (at most :data:`MAX_RECORDED_FAILURES`), and how many there were;
    ``([], 0)`` without a (readable) manifest or such a command."""

    def pick(command: dict[str, Any]) -> tuple[list[tuple[str, str]], int] | None:
        failed, count = command.get("failed"), command.get("failed_count")
        if not (isinstance(failed, list) and isinstance(count, int)):
            return None
        return [(str(f.get("path")), str(f.get("problem"))) for f in failed
                if isinstance(f, dict)], count

    return _last_recorded(folder, pick) or ([], 0)


def recorded_method(folder: str | Path) -> str | None:
    """The method the last command of ``folder``'s manifest that records one chose (``discover
    --method auto``'s head or spectral cut); None without."""
    return _last_recorded(
        folder, lambda c: c["method"] if isinstance(c.get("method"), str) else None)


def recorded_timings(folder: str | Path) -> dict[str, Any]:
    """The stage timings (seconds by stage, as :class:`~unseg.utils.timing.Timings` gives
    them) of the last command of ``folder``'s manifest that records some; ``{}`` without."""
    timings = _last_recorded(
        folder, lambda c: c["timings"] if isinstance(c.get("timings"), dict) and c["timings"]
        else None)
    return timings or {}


def recorded_max_pixels(path: str | Path) -> int | None:
    """The ``--max-pixels`` the command that wrote the output folder ``path`` (or its
    ``masks`` folder) was given; None when it records none (Pillow's default applies)."""
    path = Path(path)
    folder = path.parent if path.name == MASKS_DIR and not (path / MANIFEST_FILE).exists() \
        else path
    value = recorded_setting(folder, "--max-pixels")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def normalized(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(dict(settings)))


def _compared(command: str, version: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"command": command, "unseg version": version, **normalized(settings)}


def fingerprint(command: str, settings: Mapping[str, Any], version: str = __version__) -> str:
    """sha256 of what ``--resume`` compares: the command, the unseg version and the settings."""
    text = json.dumps(_compared(command, version, settings), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _show(value: Any) -> str:
    return "not given" if value is _UNSET else json.dumps(value)


def differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"name: <before> before, <now> now"`` for every setting whose value differs (a setting
    present on one side only shows as ``not given`` on the other)."""
    keys = [*before, *(k for k in now if k not in before)]
    return [
        f"{key}: {_show(before.get(key, _UNSET))} before, {_show(now.get(key, _UNSET))} now"
        for key in keys
        if before.get(key, _UNSET) != now.get(key, _UNSET)
    ]


def summarize(paths: Sequence[str], limit: int = 6) -> str:
    """``"12 file(s): masks/ (6), overlays/ (6)"``: the count and the top-level entries."""
    tops = Counter(p.split("/", 1)[0] + ("/" if "/" in p else "") for p in paths)
    shown = ", ".join(f"{top} ({n})" if top.endswith("/") else top
                      for top, n in sorted(tops.items())[:limit])
    more = f", and {len(tops) - limit} more" if len(tops) > limit else ""
    return f"{len(paths)} file(s): {shown}{more}"


def _describe(entry: Mapping[str, Any]) -> str:
    status = entry.get("status", "?")
    when = entry.get("finished") if status == "finished" else entry.get("started")
    verb = "finished" if status == "finished" else f"{status}, started"
    return f"`unseg {entry.get('command', '?')}` ({verb} {when or '?'})"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (None where there is none)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a later process
    that got the same id; None where ``/proc`` does not say."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host, started at ``start`` (when known), still runs (a
    zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    now = _start_ticks(pid)
    return fields[0] != "Z" and (start is None or now is None or now == start)


def _check_not_in_use(folder: Path, commands: list[dict[str, Any]]) -> None:
    host = socket.gethostname()
    for entry in commands:
        if entry.get("status") != "running":
            continue
        pid = entry.get("pid")
        if (entry.get("host") == host and isinstance(pid, int) and pid != os.getpid()
                and _alive(pid, entry.get("pid_start"))):
            raise UnsegError(
                f"{folder}: {_describe(entry)} is still writing into this folder (process "
                f"{pid}); wait for it to end, or choose another --out"
            )
        entry["status"] = "unfinished"


def _remove(folder: Path, paths: Sequence[str]) -> None:
    """Delete ``paths`` (relative to ``folder``) and the folders they leave empty."""
    for rel in paths:
        (folder / rel).unlink(missing_ok=True)
    _prune(folder, paths)


def _prune(folder: Path, paths: Sequence[str]) -> None:
    """Remove the folders of ``paths`` (relative to ``folder``) that are left empty."""
    parents: set[Path] = set()
    for rel in paths:
        parents.update(p for p in (folder / rel).parents if p != folder and folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()
        except OSError:  # not empty: it holds something else
            pass


def _move(folder: Path, paths: Sequence[str], source: Path, target: Path,
          moved: list[str]) -> None:
    """Move ``paths`` (relative) from under ``source`` to under ``target``, both in ``folder``
    (links as links; a path gone meanwhile is skipped), appending each to ``moved``, and
    remove the folders left empty, also when an ``OSError`` stops it."""
    try:
        for rel in paths:
            src = source / rel
            if not src.exists() and not src.is_symlink():
                continue
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target / rel)
            moved.append(rel)
    finally:
        _prune(folder, [(source / rel).relative_to(folder).as_posix() for rel in moved])


def _set_aside(folder: Path, paths: Sequence[str]) -> list[str]:
    """Move the previous outputs ``paths`` into ``folder/SET_ASIDE`` (those already there, a
    killed ``--overwrite``'s, are deleted); returns those moved. Nothing is deleted when one
    cannot be moved: an :class:`UnsegError` says so, with the others put back."""
    _remove(folder, [rel for rel in paths if _set_aside_file(rel)])
    moved: list[str] = []
    try:
        _move(folder, [rel for rel in paths if not _set_aside_file(rel)], folder,
              folder / SET_ASIDE, moved)
    except BaseException as exc:  # a Ctrl-C midway too: its manifest still records them here
        _put_back(folder, moved)
        if not isinstance(exc, OSError):
            raise
        raise UnsegError(f"{folder}: --overwrite could not set the previous outputs aside in "
                         f"{SET_ASIDE} ({exc}); nothing was deleted") from None
    return moved


def _recover(folder: Path, commands: list[dict[str, Any]], files: Mapping[str, Signature]
             ) -> bool:
    """Put back the previous outputs that an ``--overwrite`` killed while it set them aside
    left in ``folder/SET_ASIDE``: its manifest entry was never written, so the manifest records
    them at their places (and no command records them where they are). A place taken since is
    left as it is. Returns whether any was put back."""
    recorded = {f for entry in commands for f in entry.get("files", [])}
    stranded = [place for rel in files if _set_aside_file(rel) and rel not in recorded
                and (place := rel.removeprefix(f"{SET_ASIDE}/")) in recorded
                and place not in files]
    if not stranded:
        return False
    logger.warning("%s: putting back %s that a killed --overwrite had set aside in %s",
                   folder, summarize(stranded), SET_ASIDE)
    _put_back(folder, stranded)
    return True


def _put_back(folder: Path, paths: Sequence[str]) -> None:
    """Move ``paths`` back from ``folder/SET_ASIDE`` to their places (the folder set aside
    goes once empty)."""
    _move(folder, paths, folder / SET_ASIDE, folder, [])
    for root, _, _ in os.walk(folder / SET_ASIDE, topdown=False):  # what a failed move made
        try:
            os.rmdir(root)
        except OSError:  # not empty
            pass


def _foreign(folder: Path, paths: list[str], overwrite: bool) -> UnsegError:
    what = f"{folder}: holds {summarize(paths)} that unseg did not write"
    if overwrite:
        return UnsegError(f"{what}; --overwrite deletes only the files unseg recorded in "
                          f"{MANIFEST_FILE}: move those away, or choose another --out")
    return UnsegError(f"{what}; unseg writes only into an empty folder or one holding its own "
                      f"outputs (recorded in {MANIFEST_FILE}): choose another --out, or move "
                      "those files away")


@dataclass
class CommandRecord:
    """One command's claim on its output folder: the manifest, its own entry, the files seen
    when it started; :meth:`close` records what it wrote."""

    folder: Path
    manifest: dict[str, Any]
    entry: dict[str, Any]
    before: dict[str, Signature]
    created: bool
    started: float = field(default_factory=time.perf_counter)
    exit_code: int | None = None
    timings: Timings = field(default_factory=Timings)
    # --overwrite: the previous outputs set aside (SET_ASIDE), their manifest and command
    aside: list[str] = field(default_factory=list)
    previous_manifest: bytes = b""
    previous: str = ""
    restored: str = ""  # after a failure put them back: what the error should add
    restored_bytes: int = 0  # and how much room they take

    @property
    def seconds(self) -> float:
        """Wall-clock seconds since the claim."""
        return time.perf_counter() - self.started

    def record_outcome(self, failed: Sequence[tuple[str | Path, str]],
                       method: str | None = None) -> None:
        """Keep the inputs that failed (path, problem) in the command's manifest entry
        (``failed``, at most :data:`MAX_RECORDED_FAILURES`, and ``failed_count``), its stage
        timings so far and the ``method`` it chose (when given), written now so that the report
        made before :meth:`close` shows them, and ``unseg report`` later."""
        self.entry["failed"] = [{"path": str(path), "problem": problem}
                                for path, problem in failed[:MAX_RECORDED_FAILURES]]
        self.entry["failed_count"] = len(failed)
        self.entry["timings"] = self.timings.as_dict()
        if method is not None:
            self.entry["method"] = method
        write_json_atomic(self.folder / MANIFEST_FILE, self.manifest)

    def close(self, status: str) -> None:
        """Record the files created or changed since the claim, the end time, ``status``, the
        :attr:`exit_code` and :attr:`timings`; forget files that are gone. A manifest that
        records no file is removed (with the folder, when the claim created it and it is
        empty). The previous outputs ``--overwrite`` set aside are deleted, or, when
        ``status`` is ``failed`` (or ``interrupted`` before the command wrote a file), put
        back in place of the command's own files, with their manifest."""
        after = scan(self.folder)
        own = [rel for rel in after if not _set_aside_file(rel)]
        if self.aside and (status == "failed" or (status == "interrupted" and not own)):
            self._restore()  # interrupted before it wrote a file: nothing to --resume
            return
        if self.aside:
            shutil.rmtree(self.folder / SET_ASIDE, ignore_errors=True)
            self.aside = []
            if status == "interrupted":
                logger.warning("%s: the outputs of %s that --overwrite set aside are deleted; "
                               "this command's %s are kept for --resume", self.folder,
                               self.previous, summarize(own))
            after = {rel: after[rel] for rel in own}
        self.entry.update(
            status=status, exit_code=self.exit_code, finished=_now(),
            seconds=round(self.seconds, 3), timings=self.timings.as_dict(),
            files=sorted(rel for rel, sig in after.items() if self.before.get(rel) != sig),
        )
        for entry in self.manifest["commands"]:
            entry["files"] = [f for f in entry.get("files", []) if f in after]
        if any(entry["files"] for entry in self.manifest["commands"]):
            write_json_atomic(self.folder / MANIFEST_FILE, self.manifest)
            return
        (self.folder / MANIFEST_FILE).unlink(missing_ok=True)
        if self.created and not after:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _restore(self) -> None:
        """Undo ``--overwrite`` for a command that failed: delete its files, put the previous
        outputs and their manifest back."""
        folder = self.folder
        try:
            _remove(folder, [rel for rel in scan(folder) if not _set_aside_file(rel)])
            _put_back(folder, self.aside)
            write_bytes_atomic(folder / MANIFEST_FILE, self.previous_manifest)
        except OSError as exc:
            logger.warning("%s: could not put back the outputs of %s that --overwrite set "
                           "aside (%s); they are in %s", folder, self.previous, exc,
                           folder / SET_ASIDE)
            raise
        aside = set(self.aside)
        self.restored_bytes = sum(sig[0] for rel, sig in scan(folder).items() if rel in aside)
        self.aside = []
        self.restored = (f"nothing was deleted: the outputs of {self.previous} that "
                         "--overwrite set aside are back in place, and this command's removed")
        logger.debug("%s: %s", folder, self.restored)  # :func:`recorded` says it once


def _no_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, is a full disk or
    quota (safetensors says so only in its message)."""
    seen = 0
    while exc is not None and seen < 20:
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) \
                or "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _size(n: int) -> str:
    """``n`` bytes in kB, MB or GB (decimal), one decimal."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _attribute(commands: list[dict[str, Any]], files: Mapping[str, Signature]
               ) -> tuple[list[str], list[str]]:
    """``(ours, unrecorded)``: the files of ``files`` the commands recorded, and the others;
    these go to the last ``unfinished`` command when there is one (it could not record them)."""
    recorded = {f for entry in commands for f in entry.get("files", [])}
    unrecorded = sorted(set(files) - recorded)
    unfinished = [e for e in commands if e.get("status") == "unfinished"]
    if unfinished and unrecorded:
        unfinished[-1]["files"] = sorted({*unfinished[-1].get("files", []), *unrecorded})
        recorded.update(unrecorded)
        unrecorded = []
    return sorted(set(files) & recorded), unrecorded


def _check_not_read(folder: Path, ours: list[str], reads: Sequence[str | Path]) -> None:
    """Refuse to delete a recorded file that is, or lies under, a path the command reads (the
    run of `unseg predict OUT/run IMAGES --out OUT --overwrite`, images inside ``OUT``)."""
    sources = [Path(os.path.realpath(r)) for r in reads]  # Path.resolve raises on a loop
    hit = {rel: src for rel in ours for src in sources
           if (path := (folder / rel).resolve()) == src or src in path.parents}
    if hit:
        shown = ", ".join(sorted({str(src) for src in hit.values()}))
        raise UnsegError(f"{folder}: --overwrite would delete {summarize(sorted(hit))}, which "
                         f"this command reads ({shown}); choose another --out")


def _reuse(folder: Path, last: Mapping[str, Any], ours: list[str], unrecorded: list[str],
           command: str, settings: Mapping[str, Any], mode: Mode,
           reads: Sequence[str | Path] = ()) -> list[str]:
    """Refuse a used folder for ``new``, a different configuration for ``resume``, files
    unseg did not write or that the command reads (``reads``) for ``overwrite``; set the
    recorded files aside for ``overwrite`` (returns those, else nothing)."""
    diffs = differences(
        _compared(last.get("command", "?"), last.get("unseg_version", "?"),
                  last.get("settings", {})),
        _compared(command, __version__, settings),
    )
    if mode == "new":
        resume = ("this command's configuration is the same" if not diffs
                  else "not possible here, the configuration differs: " + "; ".join(diffs))
        aside = "" if not any(map(_set_aside_file, ours)) else (
            f" ({SET_ASIDE} holds the outputs it was replacing when it was stopped: --resume "
            f"and --overwrite delete them; move that folder out of {folder} to keep them)")
        raise UnsegError(
            f"{folder}: already holds the outputs of {_describe(last)}: {summarize(ours)}"
            f"{aside}. Give --resume to continue it ({resume}), or --overwrite to delete those "
            "files and start again, or choose another --out"
        )
    if mode == "resume":
        if diffs:
            raise UnsegError(
                f"{folder}: --resume continues {_describe(last)} only with the same "
                f"configuration, and {len(diffs)} setting(s) differ: {'; '.join(diffs)}. "
                "Give --overwrite to replace its outputs, or choose another --out"
            )
        if unrecorded:
            logger.warning("%s: %s that unseg did not write are left alone", folder,
                           summarize(unrecorded))
        # a killed command could not remove the temporary files of the writes it was in,
        # nor, after --overwrite, the previous outputs it had set aside
        temps = [rel for rel in ours if is_temp_file(rel) and not _set_aside_file(rel)]
        if temps:
            logger.info("%s: deleting %s that a killed command left", folder, summarize(temps))
        aside = [rel for rel in ours if _set_aside_file(rel)]
        if aside:
            logger.warning("%s: deleting %s, the outputs that a killed --overwrite was "
                           "replacing", folder, summarize(aside))
        _remove(folder, [*temps, *aside])
        return []
    if unrecorded:
        raise _foreign(folder, unrecorded, True)
    _check_not_read(folder, ours, reads)
    logger.info("%s: replacing %s of %s (set aside in %s until this command ends)", folder,
                summarize(ours), _describe(last), SET_ASIDE)
    return _set_aside(folder, ours)


def claim(
    folder: str | Path,
    command: str,
    settings: Mapping[str, Any],
    mode: Mode = "new",
    argv: Sequence[str] = (),
    reads: Sequence[str | Path] = (),
) -> CommandRecord:
    """Check that ``command`` may write into ``folder`` (see the module docstring for the
    rules; ``mode``: ``new``, ``resume`` or ``overwrite``), delete the previous outputs for
    ``overwrite``, and record the command as running in the manifest.

    ``settings``: the command's configuration (JSON-able, by option name); ``argv``: its
    command line; ``reads``: the files and folders it reads, which ``overwrite`` never
    deletes. Raises :class:`UnsegError` naming the folder, what is there and what to do.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UnsegError(f"{folder}: --out names a file, not a folder")
    created = not folder.exists()
    manifest = read_manifest(folder) if not created else None
    files = scan(folder)
    settings = normalized(settings)
    resumed = False
    aside: list[str] = []
    previous_manifest, previous = b"", ""
    if manifest is not None:
        _check_not_in_use(folder, manifest["commands"])
        if _recover(folder, manifest["commands"], files):
            files = scan(folder)
        ours, unrecorded = _attribute(manifest["commands"], files)
        if ours:
            if mode == "overwrite":
                previous_manifest = (folder / MANIFEST_FILE).read_bytes()
                previous = _describe(manifest["commands"][-1])
            aside = _reuse(folder, manifest["commands"][-1], ours, unrecorded, command,
                           settings, mode, reads)
            resumed = mode == "resume"
            files = scan(folder)
        elif unrecorded:
            raise _foreign(folder, unrecorded, mode == "overwrite")
    elif files:
        raise _foreign(folder, sorted(files), mode == "overwrite")
    # resumed: the earlier commands stay recorded; otherwise nothing of theirs is left
    earlier = manifest["commands"] if resumed and manifest is not None else []
    entry: dict[str, Any] = {
        "command": command,
        "argv": list(argv),
        "unseg_version": __version__,
        "settings": settings,
        "fingerprint": fingerprint(command, settings),
        "resumed": resumed,
        "started": _now(),
        "finished": None,
        "status": "running",
        "exit_code": None,
        "seconds": None,
        "timings": {},
        "pid": os.getpid(),
        "pid_start": _start_ticks(os.getpid()),
        "host": socket.gethostname(),
        "files": [],
    }
    record = CommandRecord(folder, {"format_version": MANIFEST_VERSION,
                                    "commands": [*earlier, entry]}, entry, files, created,
                           aside=aside, previous_manifest=previous_manifest, previous=previous)
    try:
        make_folder(folder)
        write_json_atomic(folder / MANIFEST_FILE, record.manifest)
    except BaseException:  # a Ctrl-C too: the previous outputs stay, with their manifest
        if aside:
            _put_back(folder, aside)
            write_bytes_atomic(folder / MANIFEST_FILE, previous_manifest)
        raise
    return record


@contextmanager
def recorded(
    folder: str | Path,
    command: str,
    settings: Mapping[str, Any],
    mode: Mode = "new",
    argv: Sequence[str] = (),
    reads: Sequence[str | Path] = (),
) -> Iterator[CommandRecord]:
    """:func:`claim` the folder for the block, gather the stage timings of the command into
    the record's ``timings``, and :meth:`~CommandRecord.close` the record however the block
    ends: ``finished`` (with the ``exit_code`` the block set), ``interrupted`` on Ctrl-C or a
    signal's exit, ``failed`` otherwise (an ``--overwrite``'s previous outputs put back: an
    :class:`UnsegError`'s message says so)."""
    record = claim(folder, command, settings, mode, argv, reads)
    with collect() as timings:
        record.timings = timings
        try:
            yield record
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            try:
                record.close("interrupted" if interrupted else "failed")
            except OSError as problem:  # the command's own error is the one to report
                logger.warning("%s: could not record the command's end (%s)", folder, problem)
            if record.restored and not interrupted and _no_space(exc):  # they hold the room
                raise UnsegError(
                    f"{exc} ({folder}: {record.restored}; --overwrite keeps them "
                    f"({_size(record.restored_bytes)}) until the command ends: free that much "
                    "space, or delete them yourself and run again without --overwrite)"
                ) from exc
            if record.restored and isinstance(exc, UnsegError):
                exc.args = (f"{exc} ({folder}: {record.restored})",)  # on the error's line
            elif record.restored:
                logger.warning("%s: %s", folder, record.restored)
            raise
    try:
        record.close("finished")
    except OSError as exc:
        raise UnsegError(f"{Path(folder) / MANIFEST_FILE}: could not record the command's "
                         f"outputs ({exc})") from None
