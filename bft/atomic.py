"""Atomic file writes: results, reports and trainer files are never seen half-written.

The data goes to a temporary file in the target's own folder (so the final rename stays on one file system), is
flushed and fsynced, and then replaces the target with ``os.replace`` — a single atomic rename on POSIX. A crash
leaves either the old file or the new one, and at most a stray ``.NAME.*.tmp`` that is removed when the write fails
in-process.

One module for every kind of write: bytes, text, JSON, JSON lines, matplotlib figures and whole folders.
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


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (UTF-8, a trailing newline) to ``path`` atomically. Returns the path."""
    import json

    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write an iterable of JSON-serialisable records, one per line, to ``path`` atomically. Returns the path."""
    import json

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_write_npy(path: str | os.PathLike, array) -> str:
    """Write a NumPy array as a ``.npy`` file (header with dtype and shape, then the raw data) to ``path``
    atomically. Returns the SHA-256 hex digest of the file's bytes, so a manifest can record it."""
    import hashlib
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    data = buffer.getbuffer()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def atomic_save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure to ``path`` (format from its suffix, PNG by default) atomically. Returns the path."""
    import io

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return atomic_write_bytes(path, buffer.getvalue())


class atomic_directory:
    """``with atomic_directory(final) as tmp:`` — fill ``tmp``; on success it replaces ``final`` in one rename.

    ``tmp`` is a hidden sibling of ``final`` (same file system). A failure inside the block removes ``tmp`` and
    leaves ``final`` as it was; a crash leaves at most a stray ``.tmp-*`` folder beside it.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{self.final.name}-{os.getpid()}")

    def __enter__(self) -> Path:
        import shutil

        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
