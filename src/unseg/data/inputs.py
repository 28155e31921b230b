"""The rules every command applies to its input files, with the one message of each case.

An input is refused, reported once as a failed input, and the rest goes on, when it is a broken
symbolic link or a link loop, cannot be read (permission), is empty, is not an image Pillow can
read or is corrupt, is smaller than one backbone patch, or would write its mask under the name of
an earlier input (``a.jpg`` and ``a.png`` in one folder). Masks mirror the input's path under the
images folder, so equal names in different sub-folders never collide. docs/troubleshooting.md
lists every case with its message.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EMPTY = "empty file (0 bytes)"
PERMISSION = "permission denied (cannot read the file)"
NO_FILE = "no such file"
NOT_A_FILE = "not a file"
LINK_LOOP = "symbolic link loop (the link never reaches a file)"


def unreadable(path: Path) -> str | None:
    """Why the file ``path`` cannot be read at all (a broken or looping symbolic link, no file,
    permission denied, empty), or ``None`` when its bytes can be read."""
    try:
        with path.open("rb") as f:
            if not f.read(1):
                return EMPTY
    except PermissionError:
        return PERMISSION
    except IsADirectoryError:
        return NOT_A_FILE
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return LINK_LOOP
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return NO_FILE
    return None


def too_small(height: int, width: int, stride: int) -> str | None:
    """The message for an image under one ``stride``-pixel patch on a side, else ``None``."""
    if min(height, width) < stride:
        return f"image {width}x{height} is smaller than one {stride}-pixel patch"
    return None


def output_name(path: Path, root: Path) -> Path:
    """``path``'s mask name: its path under ``root`` (its name for a single file), as PNG."""
    rel = path.name if root.is_file() else path.relative_to(root)
    return Path(rel).with_suffix(".png")


def same_name(name: Path, first: Path) -> str:
    """The message for an input whose mask would be ``name``, already the mask of ``first``."""
    return f"its mask {name} would overwrite the mask of {first} (same name, another extension)"
