"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Write to a temporary name in the same folder, fsync, then `os.replace` (atomic on POSIX within a filesystem).
A crash leaves at worst a `.tmp-*` file that no reader looks at; `remove_stale_tmp` clears those.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the user's umask, for the modes of the files written here


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` atomically and durably, with the mode the
    user's umask gives a new file (mkstemp's own 0600 would lock other users out of a shared store)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def swap_in(tmp: str | Path, path: str | Path) -> None:
    """Replace folder `path` by the complete folder `tmp` (same parent): the old one is moved aside first and
    removed last, so a crash leaves the old folder, the new one, or both under other names, never half of one."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".old-{path.name}-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(path: str | Path) -> bool:
    """Undo a swap_in cut between its two renames: `path` is absent, its previous version lies aside as
    `.old-<name>-<pid>`. Put that back; returns whether it did."""
    path = Path(path)
    if path.exists():
        return False
    aside = sorted(path.parent.glob(f".old-{path.name}-*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    aside[-1].rename(path)
    return True


def remove_stale_tmp(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes in `folder`; returns how many."""
    n = 0
    for p in Path(folder).glob(".tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
