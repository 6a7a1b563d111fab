"""Tasks: the study's `tasks.jsonl` format, its pair files, and the colour bucket.

A task file holds one JSON object a line (blank lines are skipped):

    task_id          required; letters, digits, '.', '_', '-' (it names the task's output folder)
    instruction      required; the edit prompt
    edit_type        'customize' (default), 'add' or 'remove'
    width, height    output size in pixels (default 1024 x 1024)
    noise_seed       optional; when absent or null, zlib.crc32(task_id) (the study's convention)
    real_ref_dir + real_ref_name
                     the reference is `<real_ref_dir>/<real_ref_name>`, the name with or without
                     its extension (.png, .jpg, .jpeg, .webp are tried)
    source_image_path
                     or: the reference image's path
    ref_seed + source_caption
                     or: the reference is generated from `source_caption` with seed `ref_seed`
    source, metadata optional, free-form (metadata a JSON object)

Relative paths resolve against `root`. By default that is the nearest folder, from the task
file's own upwards, in which the file's first relative reference path exists: the study's files
name paths relative to its repository root (`data/solid_colors/solid_red`), so a task file lying
inside a checkout of the study's repository reads unchanged, with no root given. Fields the
format does not know are ignored. A user's own images and instructions work the same way: write
a tasks.jsonl that points at them. Several task files read together (`read_task_files`) must not
share task ids.

Pair files (I2I -> I2I patching) hold two task ids a line, source then target, separated by a tab
(any whitespace is accepted); blank lines and lines starting with '#' are skipped. The ids may
come from any of the task files read together (e.g. style -> real pairs between the study's
`style` and `manual` buckets).

The colour bucket's pairs follow the study's rule (`colour_pairs`): within each object every
ordered pair of distinct colours (colours in alphabetical order), the n-th such pair taking the
source from seed slot i = n mod 5 and the target from slot (i + 1) mod 5: 8 x 7 x 8 = 448 pairs.

The colour bucket (8 colours x 8 objects x 5 seeds) is generated here, never downloaded:

    python -m experiments.tasks colour-bucket data/colour --size 64 --colours red,blue --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.runs import atomic_save_image
from fluxjax.files import atomic_write_text
from fluxjax.metrics import STUDY_COLOURS as COLOURS  # the colour bucket's references

EDIT_TYPES = ("customize", "add", "remove")
DEFAULT_SIZE = 1024
REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

OBJECTS = ("ball", "car", "chair", "couch", "hat", "mug", "pillow", "vase")
SEEDS = (0, 1, 2, 3, 4)
COLOUR_INSTRUCTION = "draw a {object} in this color"
COLOUR_SOURCE = "solid_color"  # the study's `source` value for this bucket

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COLOUR_ID = re.compile(r"^solid_([a-z]+)_([a-z]+)_s(\d+)$")


class TaskFileError(ValueError):
    """A task or pair file that cannot be read; the message names the file, line and field."""


def default_noise_seed(task_id: str) -> int:
    """The study's seed of a task that gives none: the CRC-32 of its id."""
    return zlib.crc32(task_id.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class Task:
    """One edit: an instruction applied with one reference image.

    `reference` is the resolved path of the reference image, or None when the reference is
    generated from `source_caption` with `ref_seed`. The other fields keep the task file's values,
    so `to_json` writes the line back in the study's format.
    """

    task_id: str
    instruction: str
    edit_type: str = "customize"
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    noise_seed: int | None = None
    real_ref_dir: str | None = None
    real_ref_name: str | None = None
    source_image_path: str | None = None
    ref_seed: int | None = None
    source_caption: str | None = None
    source: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    reference: Path | None = dataclasses.field(default=None, compare=False)

    @property
    def seed(self) -> int:
        """The noise seed: `noise_seed` if the task gives one, else crc32(task_id)."""
        return default_noise_seed(self.task_id) if self.noise_seed is None else self.noise_seed

    def to_json(self) -> dict:
        """The task as one line of the study's format (every field present, null where unset)."""
        return {
            "edit_type": self.edit_type, "height": self.height, "instruction": self.instruction,
            "metadata": dict(self.metadata), "noise_seed": self.noise_seed,
            "real_ref_dir": self.real_ref_dir, "real_ref_name": self.real_ref_name,
            "ref_seed": self.ref_seed, "source": self.source, "source_caption": self.source_caption,
            "source_image_path": self.source_image_path, "task_id": self.task_id, "width": self.width,
        }


# ---------------------------------------------------------------------------------------------
# reading


def _where(path: Path, line: int, field: str | None = None) -> str:
    return f"{path}, line {line}" + (f", field {field!r}" if field else "")


def _optional(entry: dict, field: str, kind: type, where) -> Any:
    value = entry.get(field)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {int: "an integer", str: "a string", dict: "a JSON object"}[kind]
        raise TaskFileError(f"{where(field)}: expected {names} or null, got {value!r}")
    return value


def _resolve(root: Path, *parts: str) -> Path:
    """`root / parts`; an absolute (or ~) part starts over from itself."""
    return Path(root).joinpath(*(os.path.expanduser(p) for p in parts))


def _find_reference(root: Path, ref_dir: str, name: str, check_files: bool, where) -> Path:
    base = _resolve(root, ref_dir, name)
    if base.is_file():
        return base
    for suffix in REFERENCE_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    if check_files:
        raise TaskFileError(f"{where('real_ref_name')}: no image {base}[{'|'.join(REFERENCE_SUFFIXES)}]; "
                            "fix the path, or pass the folder the paths are relative to as root")
    return base


def parse_task(entry: Any, *, root: Path, check_files: bool = True,
               where=lambda field=None: "task") -> Task:
    """One task from a decoded JSON line; `where(field)` names the place for error messages."""
    if not isinstance(entry, dict):
        raise TaskFileError(f"{where()}: expected a JSON object, got {type(entry).__name__}")
    task_id = entry.get("task_id")
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
        raise TaskFileError(f"{where('task_id')}: expected an id of letters, digits, '.', '_', '-' "
                            f"(it names a folder), got {task_id!r}")
    instruction = entry.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise TaskFileError(f"{where('instruction')}: expected a non-empty string, got {instruction!r}")
    edit_type = entry.get("edit_type") or "customize"
    if edit_type not in EDIT_TYPES:
        raise TaskFileError(f"{where('edit_type')}: expected one of {EDIT_TYPES}, got {edit_type!r}")
    size = {}
    for field in ("width", "height"):
        value = _optional(entry, field, int, where)
        if value is not None and value <= 0:
            raise TaskFileError(f"{where(field)}: expected a positive number of pixels, got {value}")
        size[field] = DEFAULT_SIZE if value is None else value
    noise_seed = _optional(entry, "noise_seed", int, where)
    if noise_seed is not None and not 0 <= noise_seed < 2**32:
        raise TaskFileError(f"{where('noise_seed')}: expected an unsigned 32-bit seed, got {noise_seed}")
    ref_dir = _optional(entry, "real_ref_dir", str, where)
    ref_name = _optional(entry, "real_ref_name", str, where)
    image_path = _optional(entry, "source_image_path", str, where)
    ref_seed = _optional(entry, "ref_seed", int, where)
    caption = _optional(entry, "source_caption", str, where)
    metadata = _optional(entry, "metadata", dict, where)
    source = _optional(entry, "source", str, where)

    if (ref_dir is None) != (ref_name is None):
        missing = "real_ref_dir" if ref_dir is None else "real_ref_name"
        raise TaskFileError(f"{where(missing)}: real_ref_dir and real_ref_name go together; {missing} is missing")
    if ref_name is not None and image_path is not None:
        raise TaskFileError(f"{where('source_image_path')}: give either real_ref_dir + real_ref_name or "
                            "source_image_path, not both")
    if ref_name is not None:
        reference = _find_reference(root, ref_dir, ref_name, check_files, where)
    elif image_path is not None:
        reference = _resolve(root, image_path)
        if check_files and not reference.is_file():
            raise TaskFileError(f"{where('source_image_path')}: no image at {reference}")
    elif ref_seed is not None:
        if caption is None:
            raise TaskFileError(f"{where('source_caption')}: a generated reference (ref_seed) needs source_caption")
        reference = None
    else:
        raise TaskFileError(f"{where()}: no reference; give real_ref_dir + real_ref_name, source_image_path, "
                            "or ref_seed + source_caption")
    return Task(task_id=task_id, instruction=instruction, edit_type=edit_type, width=size["width"],
                height=size["height"], noise_seed=noise_seed, real_ref_dir=ref_dir, real_ref_name=ref_name,
                source_image_path=image_path, ref_seed=ref_seed, source_caption=caption, source=source,
                metadata=metadata or {}, reference=reference)


def read_tasks(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
               check_files: bool = True) -> list[Task]:
    """Every task of a tasks.jsonl file, in file order; ids must be unique.

    root: the folder relative reference paths start from (default: `find_root`).
    check_files: require every reference image to exist.
    """
    path = Path(path)
    tasks, seen = [], {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TaskFileError(f"cannot read task file {path}: {e.strerror}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{_where(path, number)}: not valid JSON ({e.msg} at column {e.colno})") from None
    root = find_root(path, [e for _, e in entries]) if root is None else Path(root)
    for number, entry in entries:
        where = lambda field=None, n=number: _where(path, n, field)  # noqa: E731
        task = parse_task(entry, root=root, check_files=check_files, where=where)
        if task.task_id in seen:
            raise TaskFileError(f"{where('task_id')}: id {task.task_id!r} already used on line {seen[task.task_id]}")
        seen[task.task_id] = number
        tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{path} holds no tasks")
    return tasks


def find_root(path: Path, entries: Sequence[Any]) -> Path:
    """The folder a task file's relative reference paths start from: the nearest of the file's folder
    and its ancestors in which the first relative reference path exists (the file's folder if none)."""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("real_ref_dir"), str) and isinstance(entry.get("real_ref_name"), str):
            parts = (entry["real_ref_dir"], entry["real_ref_name"])
        elif isinstance(entry.get("source_image_path"), str):
            parts = (entry["source_image_path"],)
        else:
            continue
        if Path(os.path.expanduser(parts[0])).is_absolute():
            continue
        for folder in (path.parent, *path.resolve().parent.parents):
            base = _resolve(folder, *parts)
            if base.is_file() or any(base.with_name(base.name + x).is_file() for x in REFERENCE_SUFFIXES):
                return folder
        break
    return path.parent


def read_task_files(paths: Sequence[str | os.PathLike], *, root: str | os.PathLike | None = None,
                    check_files: bool = True) -> list[Task]:
    """The tasks of several task files, in order; an id may appear in only one of them."""
    tasks, origin = [], {}
    for path in paths:
        for task in read_tasks(path, root=root, check_files=check_files):
            if task.task_id in origin:
                raise TaskFileError(f"task id {task.task_id!r} is in both {origin[task.task_id]} and {path}")
            origin[task.task_id] = path
            tasks.append(task)
    return tasks


def read_pairs(path: str | os.PathLike, tasks: Iterable[Task], *,
               require_same_instruction: bool = True) -> list[tuple[Task, Task]]:
    """(source, target) task pairs from a pair file; every id must name one of `tasks`.

    The study's patching pairs share the instruction (only the reference differs), so by default a
    pair whose instructions differ is an error.
    """
    path = Path(path)
    by_id = {t.task_id: t for t in tasks}
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TaskFileError(f"cannot read pair file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        ids = line.split()
        if len(ids) != 2:
            raise TaskFileError(f"{_where(path, number)}: expected two task ids (source<TAB>target), "
                                f"got {len(ids)} fields: {line!r}")
        for role, task_id in zip(("source", "target"), ids):
            if task_id not in by_id:
                raise TaskFileError(f"{_where(path, number)}: unknown {role} task id {task_id!r} "
                                    "(not in the task file)")
        source, target = by_id[ids[0]], by_id[ids[1]]
        if require_same_instruction and source.instruction != target.instruction:
            raise TaskFileError(f"{_where(path, number)}: source and target instructions differ "
                                f"({source.instruction!r} vs {target.instruction!r}); patched edits share "
                                "the instruction")
        pairs.append((source, target))
    if not pairs:
        raise TaskFileError(f"{path} holds no pairs")
    return pairs


def write_tasks(path: str | os.PathLike, tasks: Iterable[Task]) -> Path:
    """Write tasks in the study's format, one sorted-key JSON object a line (atomically)."""
    text = "".join(json.dumps(t.to_json(), sort_keys=True) + "\n" for t in tasks)
    return atomic_write_text(path, text)


def select(tasks: Sequence[Task], ids: Iterable[str] | None = None, limit: int | None = None) -> list[Task]:
    """Tasks whose id is in `ids` (all if None), in the file's order, at most `limit` of them."""
    out = list(tasks)
    if ids is not None:
        wanted = set(ids)
        unknown = sorted(wanted - {t.task_id for t in out})
        if unknown:
            raise KeyError(f"unknown task ids: {', '.join(unknown)}")
        out = [t for t in out if t.task_id in wanted]
    return out if limit is None else out[:limit]


# ---------------------------------------------------------------------------------------------
# the colour bucket


def colour_task_id(colour: str, obj: str, seed: int) -> str:
    return f"solid_{colour}_{obj}_s{seed}"


def parse_colour_task_id(task_id: str) -> tuple[str, str, int] | None:
    """(colour, object, seed) of a colour-bucket id, or None for any other id."""
    m = _COLOUR_ID.match(task_id)
    return None if m is None else (m.group(1), m.group(2), int(m.group(3)))


def colour_pairs(found: Sequence[Task]) -> list[tuple[Task, Task]]:
    """The study's colour-bucket pairs among `found`: per object (in order of appearance), every
    ordered pair of distinct colours (alphabetical), the n-th taking the source from the n-th seed slot
    (cyclically) and the target from the next one. With the whole bucket (slots 0..4) this is the
    study's 448-pair file; on a subset the slots are the seeds present, so one seed pairs with itself."""
    by_id = {}
    for t in found:
        parsed = parse_colour_task_id(t.task_id)
        if parsed is not None:
            by_id[parsed] = t
    objects = list(dict.fromkeys(obj for _, obj, _ in by_id))
    pairs = []
    for obj in objects:
        colours = sorted({c for c, o, _ in by_id if o == obj})
        seeds = sorted({s for _, o, s in by_id if o == obj})
        directed = [(a, b) for a in colours for b in colours if a != b]
        for n, (a, b) in enumerate(directed):
            i, j = seeds[n % len(seeds)], seeds[(n + 1) % len(seeds)]
            if (a, obj, i) in by_id and (b, obj, j) in by_id:
                pairs.append((by_id[a, obj, i], by_id[b, obj, j]))
    if not pairs:
        raise ValueError("no colour-bucket pairs among these tasks (a pair needs two colours of one object); "
                         "give --pairs")
    return pairs


def _check_subset(kind: str, values: Sequence, known: Sequence) -> tuple:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {', '.join(map(str, unknown))}; choose from {', '.join(map(str, known))}")
    if not values:
        raise ValueError(f"choose at least one {kind}")
    return tuple(values)


def colour_bucket(colours: Sequence[str] | None = None, objects: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, *, size: int = DEFAULT_SIZE,
                  reference_dir: str = "references", known_objects: Sequence[str] = OBJECTS) -> list[Task]:
    """The colour bucket's tasks (or the subset asked for), colour-major as in the study's file.

    References are named `solid_{colour}` in `reference_dir`, relative to the task file's folder.
    known_objects: the objects a model can be asked for (the study's; a model organism's shapes).
    """
    colours = _check_subset("colours", list(COLOURS) if colours is None else list(colours), list(COLOURS))
    known_objects = list(known_objects)
    objects = _check_subset("objects", known_objects if objects is None else list(objects), known_objects)
    seeds = _check_subset("seeds", list(SEEDS) if seeds is None else list(seeds), list(SEEDS))
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    tasks = []
    for colour in colours:
        for obj in objects:
            for seed in seeds:
                task_id = colour_task_id(colour, obj, seed)
                tasks.append(Task(
                    task_id=task_id, instruction=COLOUR_INSTRUCTION.format(object=obj), width=size, height=size,
                    noise_seed=default_noise_seed(task_id), real_ref_dir=reference_dir,
                    real_ref_name=f"solid_{colour}", source=COLOUR_SOURCE,
                    metadata={"colour": colour, "object": obj, "rgb": list(COLOURS[colour]), "seed_index": seed}))
    return tasks


def flat_image(rgb: Sequence[int], size: int | tuple[int, int]) -> np.ndarray:
    """A flat uint8 image [H, W, 3] of one colour; size is an int or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    return np.broadcast_to(np.asarray(rgb, np.uint8), (height, width, 3)).copy()


def write_colour_bucket(folder: str | os.PathLike, colours: Sequence[str] | None = None,
                        objects: Sequence[str] | None = None, seeds: Sequence[int] | None = None, *,
                        size: int = DEFAULT_SIZE, known_objects: Sequence[str] = OBJECTS) -> Path:
    """Write the colour bucket (or a subset): `references/solid_{colour}.png` and `tasks.jsonl`.

    Returns the path of the task file. Rewriting the same bucket gives identical files.
    """
    folder = Path(folder)
    tasks = colour_bucket(colours, objects, seeds, size=size, known_objects=known_objects)
    for colour in dict.fromkeys(t.metadata["colour"] for t in tasks):
        atomic_save_image(folder / "references" / f"solid_{colour}.png", flat_image(COLOURS[colour], size))
    return write_tasks(folder / "tasks.jsonl", tasks)


def add_colour_subset_arguments(parser: argparse.ArgumentParser) -> None:
    """--colours, --objects, --seeds: comma-separated subsets of the colour bucket (default: all)."""
    parser.add_argument("--colours", default=",".join(COLOURS),
                        help=f"comma-separated colours (default: all of {','.join(COLOURS)})")
    parser.add_argument("--objects", default=",".join(OBJECTS),
                        help=f"comma-separated objects (default: all of {','.join(OBJECTS)})")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated seeds among 0..4 (default: all)")


def colour_subset_from_args(args: argparse.Namespace) -> dict:
    """The keyword arguments of `colour_bucket` / `write_colour_bucket` from parsed arguments."""
    def split(s: str) -> list[str]:
        return [p.strip() for p in s.split(",") if p.strip()]
    try:
        seeds = [int(s) for s in split(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    return {"colours": split(args.colours), "objects": split(args.objects), "seeds": seeds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("colour-bucket", help="write the colour bucket (or a subset) to a folder")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--size", type=int, default=DEFAULT_SIZE,
                     help="reference and output size in pixels (default 1024; small for tiny models)")
    add_colour_subset_arguments(gen)
    check = sub.add_parser("check", help="read a task file (and a pair file) and report what it holds")
    check.add_argument("tasks", type=Path, nargs="+")
    check.add_argument("--root", type=Path, help="folder relative paths start from (default: found, see above)")
    check.add_argument("--pairs", type=Path, help="a pair file to check against the tasks")
    args = parser.parse_args(argv)
    try:
        if args.command == "colour-bucket":
            path = write_colour_bucket(args.folder, size=args.size, **colour_subset_from_args(args))
            print(f"wrote {len(read_tasks(path))} tasks to {path}")
        else:
            tasks = read_task_files(args.tasks, root=args.root)
            print(f"{', '.join(map(str, args.tasks))}: {len(tasks)} tasks")
            if args.pairs:
                print(f"{args.pairs}: {len(read_pairs(args.pairs, tasks))} pairs")
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
