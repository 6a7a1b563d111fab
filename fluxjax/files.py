"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one.

Every file fluxjax and its commands write goes through `atomic_write_bytes`: the bytes go to a
hidden temporary file in the same folder (`.NAME.tmp-PID-RANDOM`), are flushed and fsynced, and
the temporary file is renamed over the target with `os.replace`.
"""

from __future__ import annotations

import os
import uuid
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
