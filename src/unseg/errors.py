"""User-facing exceptions. The CLI prints these as one clear line, never a traceback."""

from __future__ import annotations

from pathlib import Path


class UnsegError(Exception):
    """An error caused by the user's input or environment, with a message meant for them."""


class InputFileError(UnsegError):
    """A specific file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ManyFilesError(UnsegError):
    """Several files share one problem; lists the first ten and a count."""

    def __init__(self, problem: str, paths: list[str] | list[Path], limit: int = 10) -> None:
        self.problem = problem
        self.paths = [str(p) for p in paths]
        shown = ", ".join(self.paths[:limit])
        more = f" (and {len(self.paths) - limit} more)" if len(self.paths) > limit else ""
        super().__init__(f"{problem}: {len(self.paths)} file(s): {shown}{more}")


def a_or_an(phrase: str) -> str:
    """``phrase`` with its indefinite article, for messages: ``"an embedding"``."""
    return f"{'an' if phrase[:1].lower() in set('aeiou') else 'a'} {phrase}"
