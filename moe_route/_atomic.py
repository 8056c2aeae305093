"""Atomic file writes: a file appears at its path whole or not at all, never half-written.

The bytes go to a temporary file in the destination's directory (same file system), which is
flushed to disk and then renamed over the path; the directory entry is synced after the rename.
A failure at any step removes the temporary file and leaves what was at the path untouched.

Permissions: a new file gets what ``open(path, "w")`` would give it, not ``mkstemp``'s 0o600
(saved plans, traces and statistics are shared on multi-user machines). The temporary file is
created with mode 0o666 and the kernel masks it, by the umask or the directory's default ACL,
exactly as for a plain create; the mode it got is read back and set again after the writer ran
(safetensors writes its files 0o600). So the umask is never read: ``os.umask`` can only be read
by setting it, and another thread creating a file between the set and the restore would get the
wrong mode. A file that replaces an existing one keeps that file's mode bits, as editors do (a
file made private stays private); its temporary file is 0o600 until it gets them, so no one but
the owner can read the new content before. Owner and group are those of a new file.
"""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from typing import Optional

__all__ = ["write_atomic", "write_text_atomic", "make_temp", "mode_of", "fsync_file",
           "fsync_dir"]

_TRIES = 100  # names are 64 random bits: a clash is another process's leftover, not chance


def write_atomic(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` (parents created).
    ``path`` gets a plain create's mode, or keeps the mode of the file it replaces."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    kept = mode_of(path)
    tmp, mode = make_temp(parent, f".{os.path.basename(path)}.", ".tmp", private=kept is not None)
    try:
        write(tmp)
        os.chmod(tmp, mode if kept is None else kept)
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


def make_temp(parent: str, prefix: str, suffix: str = "", *, directory: bool = False,
              private: bool = False) -> tuple[str, int]:
    """A new, empty file (or directory) in ``parent`` with a random name; returns its path and
    its mode bits. Created with 0o666 (0o777), which the kernel masks as for any plain create,
    or with 0o600 (0o700) if ``private``."""
    if directory:
        create, mode = os.mkdir, 0o700 if private else 0o777
    else:
        def create(name, mode):
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        mode = 0o600 if private else 0o666
    for _ in range(_TRIES):
        name = os.path.join(parent, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            create(name, mode)
        except FileExistsError:
            continue
        return name, stat.S_IMODE(os.stat(name).st_mode)
    raise FileExistsError(f"make_temp: no free name {prefix}*{suffix} in {parent!r} after "
                          f"{_TRIES} tries")


def mode_of(path: str) -> Optional[int]:
    """The mode bits of what ``path`` names (a link's target), or None if nothing is there."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


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
