"""Signals and shutdown: SIGTERM as a clean exit, ranks that never outlive their launcher.

- :func:`sigterm_raises` (installed by the CLI's ``main`` around a command, never at import)
  makes SIGTERM raise :class:`Terminated` in the main thread. ``Terminated`` is a
  ``KeyboardInterrupt``, so a SIGTERM takes the path of a Ctrl-C: ``finally`` blocks run, atomic
  writes remove their temporary file, and the CLI exits with 143
  (130 for Ctrl-C) keeping the outputs already written. A process forked from this one gets the
  default action back (it dies quietly), and outside the block SIGTERM is untouched.
- :func:`follow_launcher`: a process started by ``torchrun`` sends itself SIGTERM (a clean exit
  through :func:`sigterm_raises`) when ``torchrun`` dies, even by ``kill -9``: torchrun arms no
  death signal for its ranks, which would otherwise run on as orphans. (A signal to ``torchrun``
  itself is forwarded to the ranks by torchrun: SIGINT and SIGTERM reach them as usual.)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_PARENT_POLL_S = 1.0


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM inside :func:`sigterm_raises`.

    A ``KeyboardInterrupt`` subclass, so that everything which cleans up after a Ctrl-C does the
    same after a SIGTERM; catch it before ``KeyboardInterrupt`` to tell the two apart.
    """


@contextmanager
def sigterm_raises() -> Iterator[threading.Event]:
    """Within the block, SIGTERM raises :class:`Terminated` in this process's main thread.

    Yields an event set once SIGTERM arrived: an error that replaces ``Terminated`` while the
    stack unwinds (a worker killed by the same signal, when a whole process group gets it) is
    then known to be part of the termination. A no-op where it cannot be installed (not the main
    thread, no SIGTERM). The previous handler is restored at the end, so a second SIGTERM after
    the block has its usual effect.
    """
    received = threading.Event()
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield received
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child: die as if no handler had been installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.set()
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_parent(parent_pid: int, signum: int) -> None:
    """Send this process ``signum`` once its parent is not ``parent_pid`` any more."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os.kill(os.getpid(), signum)


def _start_watch(parent_pid: int, signum: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid, signum), daemon=True,
                     name="unseg-parent-watch").start()


def follow_launcher() -> None:
    """Under ``torchrun`` (``TORCHELASTIC_RUN_ID`` set), SIGTERM this process when the launcher,
    its parent, dies; a no-op otherwise. A thread polls the parent's pid every second (not
    ``prctl``: that fires when the launcher's *thread* that started us ends)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and hasattr(signal, "SIGTERM"):
        _start_watch(os.getppid(), int(signal.SIGTERM))
