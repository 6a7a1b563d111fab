"""Run folders: resumable, never overwritten, written atomically.

Each invocation of an experiment works inside one run folder:

    <root>/<name>/
        config.json          what was asked for (canonical JSON); fixed when the folder is made
        code_version.json    the code that made the folder (git commit + dirty flag, or package version)
        invocations/0001.json, 0002.json, ...   one record per invocation (time, host, argv, code version)
        outputs/<cell key>/  one folder per cell (e.g. outputs/<task_id>/knockout/ref-text)
            ...files...      written atomically
            DONE.json        written last: the cell's record and the size of every file it holds
        summary.json, *.csv, grids/, plots/, report.html
                             derived from the cells; rebuilt (atomically) at the end of each invocation
        run.lock             held by the invocation working in the folder

Resume: a cell whose DONE.json exists and whose listed files are all present with their sizes is
complete and is skipped; anything else is recomputed (a kill can leave partial files behind but
never a DONE.json before them). Nothing is overwritten: a complete cell refuses new writes, and a
folder whose config differs from the one asked for is never reused (`open_run` refuses, or moves
on to `<name>-2`, `<name>-3`, ...). Every file goes through `atomic_write_bytes`: written to a
hidden temporary file in the same folder, flushed and fsynced, then renamed over the target with
`os.replace`, so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fluxjax.files import TMP_MARK, atomic_directory, atomic_write_bytes, atomic_write_text

CONFIG_FILE = "config.json"
CODE_VERSION_FILE = "code_version.json"
INVOCATIONS_DIR = "invocations"
OUTPUTS_DIR = "outputs"
LOCK_FILE = "run.lock"
DONE_FILE = "DONE.json"

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class RunError(RuntimeError):
    """A run folder cannot be used as asked (config mismatch, folder in use, cell already done)."""


# ---------------------------------------------------------------------------------------------
# atomic files


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, canonical_json(obj, indent=2) + "\n")


def atomic_save_image(path: str | os.PathLike, image: Image.Image | np.ndarray) -> Path:
    """Save an image (PIL or uint8 array [H, W, 3]) atomically; the format follows the suffix."""
    return atomic_write_bytes(path, encode_image(image, Path(path).suffix))


def encode_image(image: Image.Image | np.ndarray, suffix: str = ".png") -> bytes:
    """The bytes of an image file (PNG unless the suffix names another format PIL writes)."""
    if isinstance(image, np.ndarray):
        image = array_to_image(image)
    buf = io.BytesIO()
    image.save(buf, format=Image.registered_extensions().get(suffix.lower(), "PNG"))
    return buf.getvalue()


def array_to_image(array: np.ndarray) -> Image.Image:
    """uint8 [H, W, 3] (or [H, W]) to a PIL image; other dtypes are refused rather than guessed at."""
    if array.dtype != np.uint8:
        raise TypeError(f"images are stored as uint8 [H, W, 3]; got dtype {array.dtype}: convert "
                        "(e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8)) before saving")
    return Image.fromarray(array)


def _remove_stale_temporaries(folder: Path):
    for p in folder.rglob(f".*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# config and code version


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from configs built of dicts, sequences, dataclasses, paths and numpy scalars."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"config keys must be strings, got {k!r}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in a run config; use plain JSON values")


def canonical_json(obj: Any, indent: int | None = None) -> str:
    """Sorted-key JSON; NaN and infinity are refused (store None for a missing number)."""
    try:
        return json.dumps(to_jsonable(obj), sort_keys=True, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{e}: store None instead of NaN or infinity") from None


def code_version() -> dict:
    """The code this process runs: git commit and dirty flag of the checkout, or the package version.

    Dirty means tracked files differ from the commit (untracked files, such as run outputs, do not
    count).
    """
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=30, check=True).stdout
        return {"git_commit": commit, "git_dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return {"package_version": metadata.version("fluxjax")}
    except metadata.PackageNotFoundError:
        return {"package_version": "unknown"}


# ---------------------------------------------------------------------------------------------
# cells


def check_key(key: str) -> PurePosixPath:
    """A cell key is a relative path of safe names (letters, digits, '.', '_', '=', '+', '-')."""
    parts = PurePosixPath(key).parts
    if not parts or any(not _SAFE_PART.match(p) for p in parts):
        raise ValueError(f"cell key {key!r} must be a relative path of names made of letters, digits and "
                         "'._=+-', each starting with a letter or digit")
    return PurePosixPath(*parts)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work in a run: a folder of output files completed by a DONE.json written last."""

    path: Path
    key: str

    @property
    def done(self) -> bool:
        marker = self.path / DONE_FILE
        if not marker.is_file():
            return False
        try:
            files = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError):
            return False
        return all((self.path / name).is_file() and (self.path / name).stat().st_size == size
                   for name, size in files.items())

    def record(self) -> dict:
        """The record given to `finish` (e.g. metrics); raises if the cell is not complete."""
        if not self.done:
            raise RunError(f"cell {self.key} is not complete")
        return json.loads((self.path / DONE_FILE).read_text())["record"]

    def file(self, name: str) -> Path:
        check_key(name)
        if "/" in name or name == DONE_FILE:
            raise ValueError(f"{name!r} cannot be a cell file name")
        return self.path / name

    def _writable(self, name: str) -> Path:
        target = self.file(name)
        if self.done:
            raise RunError(f"cell {self.key} is complete; its files are never overwritten")
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self._writable(name), data)

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self._writable(name), obj)

    def write_image(self, name: str, image: Image.Image | np.ndarray) -> Path:
        return atomic_save_image(self._writable(name), image)

    def write_array(self, name: str, array: np.ndarray) -> Path:
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        return self.write_bytes(name, buf.getvalue())

    def load_image(self, name: str) -> Image.Image:
        with Image.open(self.file(name)) as im:
            return im.convert("RGB")

    def load_array(self, name: str) -> np.ndarray:
        return np.load(self.file(name), allow_pickle=False)

    def finish(self, record: Mapping[str, Any] | None = None) -> None:
        """Mark the cell complete: every file now in its folder is listed, with its size, in DONE.json."""
        if self.done:
            raise RunError(f"cell {self.key} is already complete")
        self.path.mkdir(parents=True, exist_ok=True)
        files = {p.name: p.stat().st_size for p in sorted(self.path.iterdir())
                 if p.is_file() and p.name != DONE_FILE and TMP_MARK not in p.name}
        atomic_write_json(self.path / DONE_FILE, {"files": files, "record": dict(record or {})})


# ---------------------------------------------------------------------------------------------
# run folders


@dataclasses.dataclass
class RunFolder:
    """An open run folder; use `open_run` to get one and close it (or use it as a context manager)."""

    path: Path
    config: dict
    resumed: bool
    _lock: Path | None = None

    def cell(self, key: str) -> Cell:
        rel = check_key(key)
        return Cell(path=self.path / OUTPUTS_DIR / rel, key=str(rel))

    def pending(self, keys: Iterable[str]) -> list[str]:
        """The keys, in order, whose cells are not complete."""
        return [k for k in keys if not self.cell(k).done]

    def cells(self) -> Iterator[Cell]:
        """Every complete cell, in key order."""
        root = self.path / OUTPUTS_DIR
        for marker in sorted(root.rglob(DONE_FILE)):
            cell = Cell(path=marker.parent, key=marker.parent.relative_to(root).as_posix())
            if cell.done:
                yield cell

    def write_derived(self, name: str, data: bytes | str) -> Path:
        """Write a derived file (summary, table, grid, plot, report) at `name` relative to the folder.

        Derived files are rebuilt from the cells at the end of every invocation and replaced
        atomically; the run's config, code version, invocation records and cells stay off limits.
        """
        rel = check_key(name)
        if rel.parts[0] in (CONFIG_FILE, CODE_VERSION_FILE, INVOCATIONS_DIR, OUTPUTS_DIR, LOCK_FILE):
            raise ValueError(f"{name!r} is not a derived file of the run; pick another name")
        data = data.encode("utf-8") if isinstance(data, str) else data
        return atomic_write_bytes(self.path / rel, data)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        return self.write_derived("summary.json", canonical_json(summary, indent=2) + "\n")

    def close(self):
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc):
        self.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire_lock(folder: Path) -> Path:
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # left by a process that was killed: take over
                continue
            raise RunError(f"run folder {folder} is in use by process {holder.get('pid')} on "
                           f"{holder.get('host')}; wait for it, or delete {lock} if that process is gone")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunError(f"could not take the lock {lock}")


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.') or '<config>'}: {a!r} in the folder, {b!r} asked for"]


def _create(folder: Path, config: dict) -> bool:
    """Create `folder` holding `config`; False if something else appeared there first."""
    try:
        with atomic_directory(folder) as tmp:  # the rename fails if `folder` appeared meanwhile, not empty
            atomic_write_json(tmp / CONFIG_FILE, config)
            atomic_write_json(tmp / CODE_VERSION_FILE, code_version())
            (tmp / OUTPUTS_DIR).mkdir()
        return True
    except OSError:
        if folder.exists():
            return False
        raise


def open_run(root: str | os.PathLike, name: str, config: Mapping[str, Any], *,
             on_conflict: Literal["new", "refuse"] = "new", argv: list[str] | None = None) -> RunFolder:
    """Open the run folder `<root>/<name>` for `config`: create it, or resume it if its config matches.

    A folder that holds a different config is never reused: with on_conflict="new" the run goes to
    the first of `<name>-2`, `<name>-3`, ... that is free or holds the same config; with "refuse" a
    RunError lists the differences. The returned folder is locked until `close()`.
    """
    check_key(name)
    if "/" in name:
        raise ValueError(f"run name {name!r} must be a single folder name")
    if on_conflict not in ("new", "refuse"):
        raise ValueError(f"on_conflict must be 'new' or 'refuse', got {on_conflict!r}")
    config = json.loads(canonical_json(config))
    root = Path(root).resolve()  # absolute, so paths built from it never depend on the working directory
    for k in range(1, 10_000):
        folder = root / (name if k == 1 else f"{name}-{k}")
        if not folder.exists() and _create(folder, config):
            return _enter(folder, config, resumed=False, argv=argv)
        existing = _read_config(folder)
        if existing == config:
            return _enter(folder, config, resumed=True, argv=argv)
        if on_conflict == "refuse":
            if existing is None:
                raise RunError(f"{folder} exists but is not a run folder (no readable {CONFIG_FILE}); "
                               "choose another run name or root")
            diff = "\n  ".join(_differences(existing, config))
            raise RunError(f"{folder} holds a run with a different config; its outputs are kept. "
                           f"Choose another run name, or rerun with the folder's config. Differences:\n  {diff}")
    raise RunError(f"no free run folder name for {name!r} under {root}")


def _enter(folder: Path, config: dict, resumed: bool, argv: list[str] | None) -> RunFolder:
    lock = _acquire_lock(folder)
    try:
        _remove_stale_temporaries(folder)
        inv_dir = folder / INVOCATIONS_DIR
        inv_dir.mkdir(exist_ok=True)
        index = 1 + sum(1 for p in inv_dir.glob("*.json"))
        while (inv_dir / f"{index:04d}.json").exists():
            index += 1
        atomic_write_json(inv_dir / f"{index:04d}.json", {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "argv": list(sys.argv if argv is None else argv),
            "resumed": resumed,
            "code_version": code_version(),
        })
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return RunFolder(path=folder, config=config, resumed=resumed, _lock=lock)


# ---------------------------------------------------------------------------------------------
# progress


def progress(iterable: Iterable | None = None, *, desc: str, unit: str = "task", total: int | None = None,
             initial: int = 0, nested: bool = False, enabled: bool | None = None) -> tqdm:
    """A tqdm bar for tasks (outer) or denoising steps (nested=True: drawn below, cleared when done).

    initial: items already complete (e.g. cells skipped on resume). enabled=None shows the bar only
    on a terminal; set TQDM_DISABLE=1 to silence every bar.
    """
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=not nested,
                position=1 if nested else 0, dynamic_ncols=True,
                disable=None if enabled is None else not enabled)
