"""Reading (and writing) safetensors files without torch, one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each key
to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__" of strings),
then the tensor bytes, little-endian, with offsets relative to the end of the header. The reader
validates the whole header before any tensor is read: offsets must tile the data section exactly
(no gap, no overlap, nothing missing at the end: a truncated file is caught here), every dtype must
be known and every byte range must match its shape.

Tensors are read with positioned reads (`os.preadv`) straight into a fresh numpy buffer: no
memory map, so the resident memory of a conversion is what it holds, not what it has touched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from fluxjax.checkpoint import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_READ_CHUNK = 1 << 30  # one positioned read moves at most ~2 GiB on Linux; stay well below


_PICKLE_HINT = "re-save it as safetensors (e.g. diffusers' save_pretrained(..., safe_serialization=True))"


def refuse_pickle(path: str) -> None:
    """Raise CheckpointError if `path` names a pickle-based (torch.save) checkpoint by its suffix."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: pickle checkpoints are refused (they can run arbitrary code); {_PICKLE_HINT}")


def _refuse_pickle_content(path: str, head: bytes) -> None:
    """Called on a file whose safetensors header is invalid: name a pickle if it is one.

    Never unpickles anything: pickle protocol 2+ opens with 0x80 and the protocol number, torch's
    zip format with 'PK\x03\x04'. (A valid safetensors header length can begin with the same
    bytes, so this runs only once the header has been found invalid.)
    """
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(f"{path}: this is a pickle/torch.save checkpoint, not safetensors; refused "
                              f"(it could run arbitrary code); {_PICKLE_HINT}")


def check_keys(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str,
               where: str = "checkpoint", optional: Iterable[str] = ()) -> None:
    """Raise CheckpointError unless `shapes` (key -> shape) holds exactly the keys of `expected`
    (key -> shape), with those shapes; keys in `optional` may also be present. `what` names the
    model in the message, e.g. "bfl FLUX.2 transformer"."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(optional))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all) for a {what} "
                              f"of this config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              f"it is not part of a {what} of this config")
    for k, want in expected.items():
        if tuple(shapes[k]) != want:
            raise CheckpointError(f"{where}: key {k!r} has shape {tuple(shapes[k])}, expected {want} for this config")


class SafetensorsFile(Mapping):
    """Lazy mapping key -> numpy array over one safetensors file; each access reads that tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file")
        refuse_pickle(self.path)
        self._entries, self.metadata, self._data_start = _read_header(self.path)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e[1] for k, e in self._entries.items()}

    @property
    def dtypes(self) -> dict[str, np.dtype]:
        return {k: e[0] for k, e in self._entries.items()}

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise KeyError(key)
        dtype, shape, begin, end = self._entries[key]
        buf = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            fd, done = f.fileno(), 0
            while done < buf.size:
                n = os.preadv(fd, [buf[done:done + _READ_CHUNK]], self._data_start + begin + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: key {key!r}: file ended while reading the tensor "
                                          f"(truncated or changed since its header was read)")
                done += n
        return buf.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _read_header(path: str):
    """-> ({key: (dtype, shape, begin, end)}, metadata, data_start); raises CheckpointError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        n = int.from_bytes(prefix, "little")
        raw = f.read(n) if n <= min(size - 8, MAX_HEADER_BYTES) else b""
    if not raw.startswith(b"{"):
        _refuse_pickle_content(path, prefix)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length {n} does not fit in the file of {size} bytes "
                                  f"(truncated, or not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings")
    entries = {}
    for key, info in header.items():
        entries[key] = _entry(path, key, info)
    data_size = size - 8 - n
    end = 0
    for key, (_, _, b, e) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b != end:
            what = "overlaps the previous tensor" if b < end else f"leaves a gap of {b - end} bytes before it"
            raise CheckpointError(f"{path}: key {key!r}: data offset {b} {what}; the file is corrupt")
        end = e
    if end > data_size:
        last = max(entries, key=lambda k: entries[k][3])
        raise CheckpointError(f"{path}: key {last!r} ends at byte {end} of the data section but the file holds "
                              f"only {data_size}: the file is truncated")
    if end < data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor; the file is corrupt")
    return entries, metadata, 8 + n


def _entry(path: str, key: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: key {key!r}: header entry must have exactly dtype, shape and "
                              f"data_offsets, got {info!r}")
    name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if name not in DTYPES:
        raise CheckpointError(f"{path}: key {key!r}: unknown dtype {name!r}; known: {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CheckpointError(f"{path}: key {key!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: key {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"got {offsets!r}")
    dtype = DTYPES[name]
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(f"{path}: key {key!r}: shape {shape} of {name} needs "
                              f"{math.prod(shape) * dtype.itemsize} bytes but data_offsets span "
                              f"{offsets[1] - offsets[0]}; the file is corrupt")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


class ShardedSafetensors(Mapping):
    """Lazy mapping over a diffusers sharded set: the index JSON's weight map and its shard files.

    Every shard's header is validated on opening, and the weight map must agree with the headers
    exactly (each key in the shard the index names, no key elsewhere).
    """

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        folder = os.path.dirname(self.path)
        try:
            with open(self.path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{self.path}: 'weight_map' must map each key to a shard file name")
        self._files: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            if os.path.basename(name) != name:
                raise CheckpointError(f"{self.path}: shard {name!r} must be a file name in the index's folder")
            self._files[name] = SafetensorsFile(os.path.join(folder, name))
        self._where = {}
        for name, shard in self._files.items():
            for key in shard:
                if weight_map.get(key) != name:
                    raise CheckpointError(f"{shard.path}: key {key!r} is in this shard but the index "
                                          f"{self.path} puts it in {weight_map.get(key)!r}")
                self._where[key] = shard
        for key, name in weight_map.items():
            if key not in self._where:
                raise CheckpointError(f"{self.path}: key {key!r} is listed in shard {name!r} but that file "
                                      f"does not hold it")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s._entries[k][1] for k, s in self._where.items()}

    @property
    def dtypes(self) -> dict[str, np.dtype]:
        return {k: s._entries[k][0] for k, s in self._where.items()}

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def file_of(self, key: str) -> str:
        return self._where[key].path

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write (key, array) pairs as a safetensors file, one array at a time.

    Without `shapes` the pairs are collected first (small files). With `shapes` (key ->
    (shape, dtype), in file order) the header is written up front and `tensors` may be a
    generator, so files larger than memory can be written; every array must match its entry.
    """
    if shapes is None:
        tensors = list(tensors)
        shapes = {k: (np.shape(a), np.asarray(a).dtype) for k, a in tensors}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        written = []
        for key, array in tensors:
            shape, dtype = shapes[key]
            array = np.ascontiguousarray(array, dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {key!r} has shape {array.shape}, its header entry says {tuple(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            written.append(key)
    if written != list(shapes):
        raise ValueError(f"tensors were written in the order {written[:3]}..., the header says {list(shapes)[:3]}...")
