"""Run folders: resumable, never overwritten, written atomically.

Each invocation of an experiment works inside one run folder:

    <root>/<name>/
        config.json          what was asked for (canonical JSON); fixed when the folder is made
        code_version.json    the code that made the folder (git commit + dirty flag, or package version)
        invocations/0001.json, 0002.json, ...   one record per invocation (time, host, argv, code version)
        outputs/<cell key>/  one folder per cell (e.g. outputs/<task_id>/knockout/ref-text)
            ...files...      written atomically
            DONE.json        written last: the cell's record and the size and sha256 of every file it holds
        summary.json, *.csv, grids/, plots/, report.html
                             derived from the cells; rebuilt (atomically) at the end of each invocation
        finished.json        the code and the cells of the last invocation that ran to its end: a rerun
                             of the same code whose cells are all intact has nothing to do
        run.lock             held by the invocation working in the folder

Resume: a cell whose DONE.json exists and whose listed files are all present with their sizes is
complete (`Cell.done`); anything else is recomputed (a kill can leave partial files behind but
never a DONE.json before them). Once per invocation each complete cell is also checked against
the content hashes in its DONE.json (`RunFolder.intact`): a cell whose files are missing or
damaged loses its DONE.json and is recomputed like an unfinished one, with one line on stderr
saying so. `check_run` checks a whole folder without changing anything (`--verify`).

Nothing is overwritten: a complete cell refuses new writes, and a folder whose config differs from
the one asked for is never reused (`open_run` refuses, or moves on to `<name>-2`, `<name>-3`,
...). Every file goes through `atomic_write_bytes`: written to a hidden temporary file in the same
folder, flushed and fsynced, then renamed over the target with `os.replace`, so a reader sees the
old file or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fluxjax.files import (TMP_MARK, LockHeld, acquire_lock, atomic_directory, atomic_write_bytes,
                           atomic_write_text, lock_holder)

CONFIG_FILE = "config.json"
CODE_VERSION_FILE = "code_version.json"
INVOCATIONS_DIR = "invocations"
OUTPUTS_DIR = "outputs"
LOCK_FILE = "run.lock"
DONE_FILE = "DONE.json"
FINISHED_FILE = "finished.json"  # derived: the code and the cells of the last invocation that ran to its end

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listed(entry) -> tuple[int | None, str | None]:
    """(size, sha256) of a DONE.json file entry: {"size", "sha256"}, or a bare size (older folders)."""
    if isinstance(entry, dict):
        return entry.get("size"), entry.get("sha256")
    return entry, None


@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work in a run: a folder of output files completed by a DONE.json written last."""

    path: Path
    key: str

    def _files(self) -> dict | None:
        """The files DONE.json lists (None: no readable DONE.json)."""
        try:
            files = json.loads((self.path / DONE_FILE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return files if isinstance(files, dict) else None

    @property
    def done(self) -> bool:
        """DONE.json is there and every file it lists has its size (cheap; `problems` checks contents)."""
        files = self._files()
        return files is not None and all(
            (self.path / name).is_file() and (self.path / name).stat().st_size == _listed(entry)[0]
            for name, entry in files.items())

    @property
    def marked(self) -> bool:
        """A DONE.json is there, readable or not: the cell was finished once."""
        return (self.path / DONE_FILE).exists()

    def problems(self) -> list[str]:
        """What is wrong with a finished cell's files, one phrase each (empty: intact).

        Each file DONE.json lists must be there with its size and sha256 (older DONE.json files
        recorded sizes only; those are checked by size)."""
        files = self._files()
        if files is None:
            return [f"{DONE_FILE} unreadable"]
        out = []
        for name, entry in files.items():
            size, digest = _listed(entry)
            target = self.path / name
            if not target.is_file():
                out.append(f"{name} missing")
            elif target.stat().st_size != size:
                out.append(f"{name} has {target.stat().st_size} bytes, not {size}")
            elif digest is not None and sha256_file(target) != digest:
                out.append(f"{name} damaged (content differs from {DONE_FILE})")
        return out

    def reopen(self) -> None:
        """Forget that the cell was finished (its DONE.json goes), so it is computed again."""
        (self.path / DONE_FILE).unlink(missing_ok=True)

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
        """Mark the cell complete: every file now in its folder is listed, with its size and sha256, in DONE.json."""
        if self.done:
            raise RunError(f"cell {self.key} is already complete")
        self.path.mkdir(parents=True, exist_ok=True)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(self.path.iterdir())
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
    _checked: set = dataclasses.field(default_factory=set)  # cells found intact by this invocation
    _skipped: set = dataclasses.field(default_factory=set)  # complete and intact when first asked: not recomputed
    _repaired: set = dataclasses.field(default_factory=set)  # finished once, found damaged, reopened
    _computed: set = dataclasses.field(default_factory=set)  # finished by this invocation

    def cell(self, key: str) -> Cell:
        rel = check_key(key)
        return Cell(path=self.path / OUTPUTS_DIR / rel, key=str(rel))

    def intact(self, key: str) -> bool:
        """Whether cell `key` is complete with undamaged files (hashed once per invocation).

        A finished cell whose files are missing or damaged is reopened (its DONE.json removed, so
        it is computed again without refusing its own writes), with one line on stderr saying so.
        """
        cell = self.cell(key)
        if cell.key in self._checked:
            if cell.done:
                return True
            self._checked.discard(cell.key)
        if not cell.marked:
            return False
        problems = cell.problems()
        if problems:
            print(f"{self.path.name}: cell {cell.key}: {'; '.join(problems)}; computing it again", file=sys.stderr)
            cell.reopen()
            self._repaired.add(cell.key)
            return False
        self._checked.add(cell.key)
        if cell.key not in self._computed:
            self._skipped.add(cell.key)
        return True

    def pending(self, keys: Iterable[str]) -> list[str]:
        """The keys, in order, whose cells are not complete and intact (damaged ones are reopened)."""
        return [k for k in keys if not self.intact(k)]

    def finish(self, cell: Cell, record: Mapping[str, Any] | None = None) -> None:
        """Mark `cell` complete (`Cell.finish`); it counts as checked for the rest of this invocation."""
        cell.finish(record)
        self._checked.add(cell.key)
        self._computed.add(cell.key)

    @property
    def reopened(self) -> frozenset[str]:
        """The cells this invocation found damaged and reopened (`intact`)."""
        return frozenset(self._repaired)

    def counts(self) -> dict[str, int]:
        """This invocation's cells so far: skipped (complete and intact), repaired (damaged, computed
        again) and computed (new: neither)."""
        return {"skipped": len(self._skipped), "repaired": len(self._repaired & self._computed),
                "computed": len(self._computed - self._repaired)}

    def counts_line(self) -> str:
        """One line: what this invocation did with the folder's cells."""
        c = self.counts()
        return (f"{self.path}: {'resumed' if self.resumed else 'new run folder'}: {c['skipped']} cells skipped "
                f"(complete and intact), {c['repaired']} repaired (damaged, computed again), {c['computed']} computed")

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

    def mark_finished(self) -> Path:
        """Record that an invocation ran to its end: the code that ran it and every cell it used."""
        return self.write_derived(FINISHED_FILE, canonical_json(
            {"code_version": code_version(), "cells": sorted(self._checked)}, indent=2) + "\n")

    def nothing_to_do(self) -> int | None:
        """The number of cells, if an invocation of this code already finished this folder and
        every cell it used is still intact (all checked now); else None: there is work to do."""
        try:
            finished = json.loads((self.path / FINISHED_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(finished, dict) or finished.get("code_version") != code_version():
            return None
        keys = finished.get("cells")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return None
        return len(keys) if not self.pending(keys) else None

    def discard(self) -> None:
        """Remove a folder this invocation created and did no work in (input that failed validation),
        so that the corrected rerun can use its name; a resumed folder is kept."""
        if self.resumed or any(self.cells()):
            self.close()
            return
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self):
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc):
        self.close()


def _in_use(folder: Path, holder: dict) -> RunError:
    return RunError(f"run folder {folder} is in use by process {holder.get('pid')} on {holder.get('host')}; "
                    f"wait for it, or delete {folder / LOCK_FILE} if that process is gone")


def _acquire_lock(folder: Path) -> Path:
    try:
        return acquire_lock(folder / LOCK_FILE)
    except LockHeld as e:
        raise _in_use(folder, e.holder) from None


def check_not_in_use(folder: str | os.PathLike) -> None:
    """Refuse (RunError) a run folder another live process holds; a cheap check before loading a model."""
    folder = Path(folder)
    holder = lock_holder(folder / LOCK_FILE)
    if holder is not None:
        raise _in_use(folder.resolve(), holder)


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


def _empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


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
        if (not folder.exists() or _empty_dir(folder)) and _create(folder, config):
            return _enter(folder, config, resumed=False, argv=argv)
        existing = _read_config(folder)
        if existing == config:
            return _enter(folder, config, resumed=True, argv=argv)
        if on_conflict == "refuse":
            if existing is None:
                raise RunError(f"{folder} exists but is not a run folder (no readable {CONFIG_FILE}); "
                               "choose another run name or root")
            diff = _differences(existing, config)
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise RunError(f"{folder} holds a run with a different config ({'; '.join(diff[:3])}{more}); its "
                           f"outputs are kept: choose another run folder, or rerun with the folder's config")
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
# checking a whole folder


@dataclasses.dataclass(frozen=True)
class FolderCheck:
    """What `check_run` found: problems of the folder itself, damaged finished cells, unfinished ones."""

    path: Path
    problems: list[str]  # the folder's own files (config.json, code_version.json)
    damaged: dict[str, list[str]]  # finished cell key -> what is wrong with its files
    unfinished: list[str]  # cells with files but no DONE.json (a killed invocation; resuming completes them)
    intact: int  # finished cells whose files all match their DONE.json

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged

    def lines(self) -> list[str]:
        """One line per problem, damaged cell and unfinished cell, then a one-line verdict."""
        out = [f"{self.path}: {p}" for p in self.problems]
        out += [f"{self.path}: damaged cell {key}: {'; '.join(what)}" for key, what in self.damaged.items()]
        out += [f"{self.path}: unfinished cell {key} (a rerun completes it)" for key in self.unfinished]
        verdict = ("intact" if self.ok else f"DAMAGED ({len(self.damaged)} cells, {len(self.problems)} folder "
                   f"problems; a rerun of the same command recomputes damaged cells)")
        out.append(f"{self.path}: {verdict}: {self.intact} finished cells intact, {len(self.damaged)} damaged, "
                   f"{len(self.unfinished)} unfinished")
        return out


def check_run(folder: str | os.PathLike) -> FolderCheck:
    """Check a run folder without changing it: its config and every finished cell's files
    (present, sizes and sha256 as DONE.json lists them)."""
    folder = Path(folder).resolve()
    problems = []
    if not folder.is_dir():
        return FolderCheck(folder, ["no such run folder"], {}, [], 0)
    for name in (CONFIG_FILE, CODE_VERSION_FILE):
        try:
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{name} unreadable ({type(e).__name__}): not a run folder, or damaged")
    root = folder / OUTPUTS_DIR
    damaged, unfinished, intact = {}, [], 0
    if not root.is_dir():
        problems.append(f"{OUTPUTS_DIR}/ missing")
    else:
        for sub in sorted(p for p in root.rglob("*") if p.is_dir()):
            cell = Cell(path=sub, key=sub.relative_to(root).as_posix())
            if cell.marked:
                what = cell.problems()
                if what:
                    damaged[cell.key] = what
                else:
                    intact += 1
            elif any(p.is_file() and TMP_MARK not in p.name for p in sub.iterdir()):
                unfinished.append(cell.key)
    return FolderCheck(folder, problems, damaged, unfinished, intact)


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


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr, where progress goes) is a terminal, where bars draw."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """Progress as lines of text, for a log: what the bars show on a terminal, one line per task
    done and per sweep chunk, with the time elapsed and an estimate of the time left.

    total: the tasks; complete: those already complete (skipped); the estimate extrapolates the
    time per task computed so far over the tasks left. Lines go to stderr, flushed; disabled, it
    writes nothing.
    """

    def __init__(self, desc: str, total: int, complete: int = 0, *, unit: str = "task", enabled: bool = True,
                 stream=None):
        self.desc, self.total, self.done, self.unit, self.enabled = desc, total, complete, unit, enabled
        self.todo = total - complete
        self.computed = 0
        self.stream = stream
        self.start = time.monotonic()

    def write(self, text: str) -> None:
        if self.enabled:
            print(f"{self.desc}: {text}", file=self.stream or sys.stderr, flush=True)

    def _times(self, fraction_of_task: float = 0.0) -> str:
        elapsed = time.monotonic() - self.start
        share = (self.computed + fraction_of_task) / self.todo if self.todo else 1.0
        left = f", about {duration(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
        return f"{duration(elapsed)} elapsed{left}"

    def begin(self, title: str = "", repaired: int = 0) -> None:
        skipped = self.total - self.todo
        self.write(f"{title + ', ' if title else ''}{self.total} {self.unit}s: {skipped} complete (skipped), "
                   f"{self.todo} to compute"
                   + (f" ({repaired} of them damaged, computed again)" if repaired else ""))

    def chunk(self, task: str, cells_done: int, cells: int) -> None:
        """A sweep call of the task in progress has finished: `cells_done` of its `cells`."""
        self.write(f"{self.unit} {self.done + 1}/{self.total} ({task}): sweep {cells_done}/{cells} cells, "
                   f"{self._times(cells_done / cells)}")

    def task_done(self, task: str) -> None:
        self.done += 1
        self.computed += 1
        self.write(f"{self.unit} {self.done}/{self.total} done ({task}), {self._times()}")

    def end(self) -> None:
        if self.todo:
            self.write(f"{self.done}/{self.total} {self.unit}s complete, {self.computed} computed in "
                       f"{duration(time.monotonic() - self.start)}")
