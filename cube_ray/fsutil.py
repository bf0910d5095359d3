"""Atomic file writes: a reader sees the old file or the whole new one, never half of it; and folder locks.

Write to a temporary name in the same folder, fsync, then `os.replace` (atomic on POSIX within a filesystem).
Every temporary name is unique (`.tmp-<name>.XXXXXXXX`), so two writers of one file or folder never share one.
A crash leaves at worst a `.tmp-*` file that no reader looks at; the folder's lock holder clears those
(`remove_stale_tmp`, `recover_swap`), since only with the lock held can no live writer own them.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("cube_ray.fsutil")

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the user's umask, for the modes of the files written here
LOCK_NAME = ".lock"


def cache_dir() -> Path:
    """Where converted teachers, file hashes, the default store and built kernels live ($CUBE_RAY_CACHE)."""
    return Path(os.environ.get("CUBE_RAY_CACHE", Path.home() / ".cache" / "cube_ray"))


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock: a second search, training or --resume on the same folder."""


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _holder(lock: Path) -> str:
    """Who holds `lock`, as its holder wrote it: "process <pid> on <host>"."""
    try:
        words = lock.read_text().split()
    except OSError:
        words = []
    return f"process {words[0]} on {words[1]}" if len(words) == 2 else "another process (it has not named itself yet)"


@contextmanager
def folder_lock(folder: str | Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold `folder`'s advisory lock (flock on `<folder>/.lock`, created with the folder if need be) for the block.

    Busy: `FolderLocked` at once, naming the folder and the holder (its PID and host, which it writes into the lock
    file); with `wait`, block until the holder is done. The kernel drops the lock when its holder exits, however it
    dies, so there is never a stale lock to clear by hand. The fd is not inherited (os.open's default), so processes
    this one starts (Ray's raylet, its workers) neither hold nor need the lock. A folder the lock created and nothing
    else filled is removed on release: a run refused or failed before any work leaves no empty folder behind."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path, what, wait)
    try:
        yield path
    finally:
        try:
            if created and os.listdir(folder) == [LOCK_NAME]:
                path.unlink()
                folder.rmdir()
        except OSError:  # filled or removed meanwhile: leave it
            pass
        os.close(fd)  # releases the lock


def _acquire(path: Path, what: str, wait: bool) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except PermissionError:  # another user's lock file in a shared folder: locking needs no write access
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise FolderLocked(f"{path.parent} is in use by another {what}: {_holder(path)} holds its lock "
                                   f"({path}); wait for it to finish, or choose another folder") from None
            log.info("%s: waiting for another %s to finish (%s holds the lock)", path.parent, what, _holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, path):
            break
        os.close(fd)  # its last holder removed the file (and folder) while we waited: lock the new one
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError:  # opened read-only: the refusal then names no PID, the lock holds all the same
        pass
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def temp_dir(path: str | Path) -> Path:
    """A new empty folder beside `path`, named `.tmp-<name>.XXXXXXXX` (unique), with the mode the user's umask
    gives a new folder (mkdtemp's own 0700 would lock other users out of a shared store)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


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


def _unique(path: Path, kind: str) -> Path:
    """A name beside `path` no other writer uses: `.<kind>-<name>.<pid>.<random>`."""
    return path.with_name(f".{kind}-{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def swap_in(tmp: str | Path, path: str | Path) -> None:
    """Replace folder `path` by the complete folder `tmp` (same parent): the old one is moved aside first and
    removed last, so a crash leaves the old folder, the new one, or both under other names, never half of one.

    Writers may race: each moves what is at `path` aside under a name of its own and, if another's folder lands in
    between, moves that aside too and tries again. The last to finish wins; each removes what it moved aside."""
    tmp, path = Path(tmp), Path(path)
    aside = []
    while True:
        old = _unique(path, "old")
        try:
            path.rename(old)
            aside.append(old)
        except FileNotFoundError:  # nothing there yet, or another writer has just moved it aside
            pass
        try:
            tmp.rename(path)
            break
        except OSError as e:  # a directory cannot replace a non-empty one: another writer's landed first
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    fsync_dir(path.parent)
    for old in aside:  # renamed before removal: a kill meanwhile leaves a `.tmp-` to clear, never half an `.old-`
        trash = _unique(path, "tmp")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def moved_aside(path: str | Path) -> list[Path]:
    """The copies of folder `path` that swaps in progress (or killed) moved aside, newest first. A reader that finds
    `path` absent reads one of these: each is a complete `path` of a moment ago (swap_in never removes one in place)."""
    path = Path(path)
    found = []
    for p in path.parent.glob(f".old-{path.name}.*"):
        try:
            found.append((p.stat().st_mtime, p))
        except FileNotFoundError:  # removed by its writer meanwhile
            pass
    return [p for _, p in sorted(found, reverse=True)]


def recover_swap(path: str | Path) -> bool:
    """Finish what killed swaps of folder `path` left: if `path` is absent, put its newest copy moved aside back;
    then remove the other copies and `path`'s temporaries. Writers only, with the folder's lock held (no swap of
    `path` can be in flight): a reader never renames. Returns whether it put a copy back."""
    path = Path(path)
    aside = moved_aside(path)
    restored = bool(aside) and not path.exists()
    if restored:
        aside.pop(0).rename(path)
    for p in aside + list(path.parent.glob(f".tmp-{path.name}.*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return restored


def remove_stale_tmp(folder: str | Path) -> int:
    """Delete leftovers of interrupted atomic writes in `folder`; returns how many. Only while holding the folder's
    lock (`folder_lock`): without it, another run's file in flight could be one of them."""
    n = 0
    for p in Path(folder).glob(".tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
