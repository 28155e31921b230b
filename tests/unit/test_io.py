"""The atomic writer: outputs get the mode a plain ``open()`` would give them; the JSON object
reader names the file and its problem."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from unseg.errors import InputFileError, UnsegError
from unseg.utils.io import (
    file_mode,
    make_folder,
    read_json_object,
    save_png_atomic,
    write_bytes_atomic,
    write_json_atomic,
)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_a_plain_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # the reference: what open() creates under this umask
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_bytes_atomic(tmp_path / "b.bin", b"x")
        save_png_atomic(tmp_path / "c.png", np.zeros((2, 2), np.uint8))
        expected = stat.S_IMODE(plain.stat().st_mode)
        assert expected == 0o666 & ~umask == file_mode()
        for name in ("a.json", "b.bin", "c.png"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    finally:
        os.umask(old)


def test_a_path_that_cannot_be_written_is_an_error_naming_it(tmp_path):
    """A parent that is a file, or a target that is a folder: one clear error, no temp file."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UnsegError, match=r"afile/sub/a.json: cannot create its folder .*afile "
                       r"is a file, not a folder"):
        write_json_atomic(tmp_path / "afile" / "sub" / "a.json", {"x": 1})
    (tmp_path / "folder").mkdir()
    with pytest.raises(UnsegError, match=r"folder: is a folder, not a file"):
        write_json_atomic(tmp_path / "folder", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    with pytest.raises(UnsegError, match=r"afile/run: cannot create this folder \(.*afile is a "
                       r"file, not a folder\)"):
        make_folder(tmp_path / "afile" / "run")


def test_read_json_object_names_the_file_and_its_problem(tmp_path):
    """An object is returned; a missing, broken or non-UTF-8 file is the caller's "unreadable"
    with the reason, another JSON value the caller's ``not_object``, each naming the file."""
    path = tmp_path / "a.json"
    path.write_text('{"x": [1, null]}')
    assert read_json_object(path, "cannot read it", "not an object") == {"x": [1, None]}
    for content in (None, "{broken", b"\xff\xfe"):
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        else:
            path.unlink()
        with pytest.raises(InputFileError, match=r"a\.json: cannot read it \(.+\)$") as err:
            read_json_object(path, "cannot read it", "not an object")
        assert err.value.path == path
    path.write_text("[1, 2]")
    with pytest.raises(InputFileError, match=r"a\.json: not an object$"):
        read_json_object(path, "cannot read it", "not an object")
