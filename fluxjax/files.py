"""Atomic writes: a reader sees the old file or folder or the whole new one, never a torn one.

Every file fluxjax and its commands write goes through `atomic_write_bytes`: the bytes go to a
hidden temporary file in the same folder (`.NAME.tmp-PID-RANDOM`), are flushed and fsynced, and
the temporary file is renamed over the target with `os.replace`. Every folder written as a whole
(checkpoints, organisms, run folders) is built inside `atomic_directory`: a hidden temporary
sibling folder renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"  # in the name of every temporary file or folder written here


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path` for a file or folder that will be renamed onto it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that `path` is either absent/old or complete, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary sibling folder of `path`; when the block ends without an
    exception, rename it to `path`.

    replace: an existing `path` is moved aside, and deleted only once the new folder is in place
    (if that rename fails, it is moved back). Without it, the final rename raises OSError if `path`
    appeared meanwhile (unless it is an empty folder, which the rename replaces). On any failure
    the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if replace and os.path.lexists(path):
            old = temporary_sibling(path)
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# locks and stale temporaries


class LockHeld(RuntimeError):
    """The lock file is held by a live process; `holder` is what it wrote ({"pid", "host"})."""

    def __init__(self, lock: Path, holder: dict):
        self.lock, self.holder = lock, holder
        super().__init__(f"{lock} is held by process {holder.get('pid')} on {holder.get('host')}; wait for it, "
                         f"or delete {lock} if that process is gone")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(lock: str | os.PathLike) -> dict | None:
    """Who holds the lock file `lock` ({"pid", "host"}), or None if it is free or its holder is dead.

    A holder is dead when it ran on this host and its pid no longer exists (a killed process)."""
    try:
        holder = json.loads(Path(lock).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not pid_alive(holder["pid"]):
        return None
    return holder


def acquire_lock(lock: str | os.PathLike) -> Path:
    """Create the lock file `lock` holding this process's pid and host, atomically (O_EXCL).

    A lock left by a dead process of this host is taken over; a live holder raises LockHeld.
    Release it with `lock.unlink()`.
    """
    lock = Path(lock)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is None:
                lock.unlink(missing_ok=True)  # left by a process that was killed: take over
                continue
            raise LockHeld(lock, holder) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise LockHeld(lock, {})


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (`temporary_sibling`) of `path` -> what was removed.

    Call it only while holding the lock that every writer of `path` takes: then no temporary of
    `path` can belong to a live writer, and each one is left by a writer that was killed.
    """
    path = Path(path)
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
