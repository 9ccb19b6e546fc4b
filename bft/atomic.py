"""Atomic file writes: results, reports and trainer files are never seen half-written.

The data goes to a temporary file in the target's own folder (so the final rename stays on one file system), is
flushed and fsynced, and then replaces the target with ``os.replace`` — a single atomic rename on POSIX. A crash
leaves either the old file or the new one, and at most a stray ``.NAME.*.tmp`` that is removed when the write fails
in-process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (creating its folder). Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
