"""Atomic writes: a reader sees the old file or folder or the whole new one, never a torn one.

Every file fluxjax and its commands write goes through `atomic_write_bytes`: the bytes go to a
hidden temporary file in the same folder (`.NAME.tmp-PID-RANDOM`), are flushed and fsynced, and
the temporary file is renamed over the target with `os.replace`. Every folder written as a whole
(checkpoints, organisms, run folders) is built inside `atomic_directory`: a hidden temporary
sibling folder renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
