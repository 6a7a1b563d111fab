"""The activation store: captures of many tasks on disk, as a zarr (v2) group written with TensorStore.

`python -m experiments.collect` writes one; `python -m experiments.probe` reads it. Its layout is
plain zarr, so any zarr reader opens it without fluxjax (TensorStore's `zarr` driver, which Orbax
already installs, or zarr-python for float32 stores; bfloat16 arrays need TensorStore):

    <store>/
        .zgroup, .zattrs       the group; .zattrs holds the metadata below (JSON)
        b3.text.output/        one array per site: [task, step, token, width], the model's dtype,
                               chunks of `chunk_tasks` tasks x every step, token and feature
        text_content/          bool [task, text token]: the instruction's own tokens (every other
                               text position is padding), per task
        written/               bool [task]: set once a task's chunk is written in every array

Metadata (`.zattrs`): `format` ("fluxjax-activations") and `version`; `tasks` (ids, in the arrays'
order) with `labels` (per task: colour name, object, reference RGB and CIELAB where the task gives
them); `sites` (names, `fluxjax.sites`), `steps` (the sampler steps kept, 0-based, in order),
`chunk_tasks`, `dtype`; `tokens` (the token count of each stream: text, image, reference);
`groups` (token groups of the text stream: `content` and `padding`, given per task by
`text_content`); `model`, `run` (intervention, sampler) as the collection's config records them.

A task's rows are valid once `written[task]` is true: a collection killed mid-chunk leaves that
chunk's `written` false, and resuming rewrites the chunk (the same bytes: the computation is
deterministic). Reading one site keeps only what is asked for in memory (`Store.read`).

This module needs numpy and tensorstore alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

FORMAT = "fluxjax-activations"
VERSION = 1
WRITTEN = "written"
TEXT_CONTENT = "text_content"
_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}  # lossless: bytes read back unchanged


def _spec(path: Path, metadata: Mapping | None = None) -> dict:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    if metadata is not None:
        spec["metadata"] = dict(metadata)
    return spec


def _dtype_name(dtype) -> str:
    """The zarr dtype string of a numpy dtype (bfloat16 as TensorStore names it)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "bfloat16"
    return dtype.str


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def create(path: str | os.PathLike, *, tasks: Sequence[str], sites: Mapping[str, tuple[int, int]], steps: Sequence[int],
           dtype, text_tokens: int, chunk_tasks: int, attrs: Mapping) -> "Store":
    """Create the store at `path`, or open the one there if it was created with the same layout.

    sites: {site name: (tokens, width)} of each array; attrs: the rest of `.zattrs` (labels, tokens,
    groups, model, run). A store at `path` with another layout or other metadata is refused."""
    path = Path(path)
    if chunk_tasks < 1:
        raise ValueError(f"chunk_tasks must be at least 1, got {chunk_tasks}")
    zattrs = {**dict(attrs), "format": FORMAT, "version": VERSION, "tasks": list(tasks), "sites": list(sites),
              "steps": [int(s) for s in steps], "chunk_tasks": int(chunk_tasks), "dtype": _dtype_name(dtype)}
    zattrs = json.loads(json.dumps(zattrs, sort_keys=True))  # as it reads back (tuples as lists)
    if (path / ".zattrs").exists():
        found = json.loads((path / ".zattrs").read_text())
        if found != zattrs:
            differ = sorted(k for k in set(found) | set(zattrs) if found.get(k) != zattrs.get(k))
            raise ValueError(f"{path} holds another collection (differs in {', '.join(differ)}); collect into a new "
                             "store")
    path.mkdir(parents=True, exist_ok=True)
    n, k = len(tasks), int(chunk_tasks)
    arrays = {name: ([n, len(steps), tokens, width], [k, len(steps), tokens, width], _dtype_name(dtype))
              for name, (tokens, width) in sites.items()}
    arrays[TEXT_CONTENT] = ([n, text_tokens], [k, text_tokens], "|b1")
    arrays[WRITTEN] = ([n], [k], "|b1")
    for name, (shape, chunks, dt) in arrays.items():
        meta = {"shape": shape, "chunks": chunks, "dtype": dt, "compressor": _COMPRESSOR, "fill_value": None,
                "order": "C"}
        ts.open({**_spec(path / name, meta), "create": True, "open": True}).result()
    if not (path / ".zgroup").exists():
        _write_json(path / ".zgroup", {"zarr_format": 2})
    if not (path / ".zattrs").exists():
        _write_json(path / ".zattrs", zattrs)
    return Store(path)


class Store:
    """An activation store opened for reading and for writing whole chunks (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.attrs = json.loads((self.path / ".zattrs").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path} is not an activation store (no readable .zattrs: {e}); make one with "
                             "python -m experiments.collect") from None
        if self.attrs.get("format") != FORMAT:
            raise ValueError(f"{self.path} is a zarr group but not an activation store (format "
                             f"{self.attrs.get('format')!r})")
        self._arrays: dict = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.attrs["tasks"])

    @property
    def sites(self) -> list[str]:
        return list(self.attrs["sites"])

    @property
    def steps(self) -> list[int]:
        return list(self.attrs["steps"])

    @property
    def chunk_tasks(self) -> int:
        return int(self.attrs["chunk_tasks"])

    def array(self, name: str) -> ts.TensorStore:
        """The TensorStore of one array (a site name, `text_content` or `written`)."""
        if name not in self._arrays:
            if not (self.path / name / ".zarray").exists():
                raise KeyError(f"{name} is not an array of {self.path}; its sites: {', '.join(self.sites)}")
            self._arrays[name] = ts.open({**_spec(self.path / name), "open": True}).result()
        return self._arrays[name]

    def chunks(self) -> list[range]:
        """The task rows of each chunk, in order."""
        n, k = len(self.tasks), self.chunk_tasks
        return [range(start, min(start + k, n)) for start in range(0, n, k)]

    def write_chunk(self, index: int, values: Mapping[str, np.ndarray], text_content: np.ndarray) -> None:
        """Write chunk `index`: every site's [tasks of the chunk, step, token, width], then the content
        masks, then `written` (last, so a killed write leaves the chunk unwritten)."""
        rows = self.chunks()[index]
        missing = set(self.sites) - set(values)
        if missing:
            raise ValueError(f"chunk {index} lacks the sites {sorted(missing)}; write every site of a chunk at once")
        for name in self.sites:
            self.array(name)[rows.start:rows.stop].write(values[name]).result()
        self.array(TEXT_CONTENT)[rows.start:rows.stop].write(np.asarray(text_content, bool)).result()
        self.array(WRITTEN)[rows.start:rows.stop].write(np.ones(len(rows), bool)).result()

    def written(self) -> np.ndarray:
        """bool [task]: the tasks whose rows are written."""
        return np.asarray(self.array(WRITTEN).read().result())

    def read(self, site: str, tasks: slice | Sequence[int] | None = None, steps: Sequence[int] | None = None
             ) -> np.ndarray:
        """A site's values [task, step, token, width] for the rows `tasks` (default all) and the
        positions in `steps` of the kept steps (default all), read from disk."""
        array = self.array(site)
        if tasks is not None:
            array = array[tasks if isinstance(tasks, slice) else np.asarray(tasks, np.int64)]
        if steps is not None:
            array = array[:, list(steps)]
        return np.asarray(array.read().result())

    def text_content(self) -> np.ndarray:
        """bool [task, text token]: the instruction's tokens of each task."""
        return np.asarray(self.array(TEXT_CONTENT).read().result())
