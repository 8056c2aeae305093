"""Atomic file writes: a file appears at its path whole or not at all, never half-written.

The bytes go to a temporary file in the destination's directory (same file system), which is
flushed to disk and then renamed over the path; the directory entry is synced after the rename.
A failure at any step removes the temporary file and leaves what was at the path untouched.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

__all__ = ["write_atomic", "write_text_atomic", "fsync_file", "fsync_dir"]


def write_atomic(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` (parents created)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(parent)


def write_text_atomic(path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def fsync_file(filename: str) -> None:
    fd = os.open(filename, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(dirname: str) -> None:
    """Persist a directory's entries (new files, renames); not possible on every platform."""
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
