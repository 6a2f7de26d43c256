"""A scratch file for the targets that load files: one per process, rewritten for each input."""

from __future__ import annotations

import atexit
import functools
import os
import tempfile


@functools.cache
def _path() -> str:
    fd, path = tempfile.mkstemp(prefix="turnout-fuzz-", suffix=".yaml")
    os.close(fd)
    atexit.register(os.unlink, path)
    return path


def as_file(data: bytes) -> str:
    """``data`` as the file to load, as an operator's file would be read (its encoding included)."""
    path = _path()
    with open(path, "wb") as out:
        out.write(data)
    return path
