"""Native fluxjax checkpoints: parameter trees as Orbax checkpoints, configs as JSON.

One save/load path serves every parameter tree fluxjax and the organisms keep on disk (the
transformer, the autoencoder, an organism's text encoder, a training state): `write_tree` streams
(leaf name, array) pairs into an Orbax (v1 API) PyTree checkpoint of nested dicts keyed by the
leaves' dotted names (`fluxjax.trees`), and `read_tree` checks the stored names and shapes against
the expected tree and restores it, optionally straight into shards. A *native checkpoint* is a
directory holding a JSON file (format, version, config, dtype) and such a tree under `params/`:

    fluxjax_transformer.json   {"format": "fluxjax-transformer", "format_version": 1,
                                "config": {Flux2Config fields}, "dtype": "bfloat16"}
    params/                    the params as a nested dict keyed like Flux2Weights:
                               {"double_blocks": {"img_attn": {"qkv": ...}}}

(the autoencoder's is laid out alike: `fluxjax.vae_checkpoint`). Any Orbax user can read the params
without fluxjax (`orbax.checkpoint.v1.load(path + "/params")`). Matrices are (in, out) and block
parameters stacked on a leading layer axis, exactly as in memory; storage chunks hold whole
layers where they fit in CHUNK_BYTES.

Writing streams: parameters arrive one at a time and go to disk in groups of at most GROUP_BYTES
(a larger parameter alone) with Orbax's partial saves, so a conversion never holds the whole
model. Measured with orbax-checkpoint 0.12.8: saving numpy arrays holds up to three copies of
what is being saved (a defensive deep copy, then tensorstore's chunk buffers, kept until the OCDBT
commit); here the deep copy is off and each group is committed before the next is built, so the
peak is about twice the largest parameter.

Writing never leaves a half-written directory behind: everything goes into a temporary sibling
that is renamed into place at the end (`fluxjax.files.atomic_directory`).

Every tree carries its checksums (`CHECKSUMS_FILE` inside the Orbax directory): the sha256 of each
array's bytes (stored dtype, C order), taken from the arrays as they are saved, and the size and
sha256 of every file Orbax wrote. `read_tree` checks the files' sizes and the small files' hashes
before Orbax opens anything (so a deleted or truncated file is named instead of failing deep in
TensorStore), then each restored array against its checksum; a mismatch names the array and the
damaged file. A tree written before checksums existed is refused until they are added
(`add_checksums`, or `python -m fluxjax.checkpoint add-checksums DIR`) by someone who trusts it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import v1 as ocp

from fluxjax.config import Flux2Config
from fluxjax.files import atomic_directory
from fluxjax.params import Flux2Weights, param_shapes
from fluxjax.trees import flatten, from_named, insert, named_leaves, nest

FORMAT = "fluxjax-transformer"
FORMAT_VERSION = 1
CONFIG_FILE = "fluxjax_transformer.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 64 << 20  # storage chunks; a sharded restore reads only the chunks its shards touch
GROUP_BYTES = 256 << 20  # parameters gathered per partial save
CHECKSUMS_FILE = "fluxjax_checksums.json"  # inside a tree's Orbax directory
CHECKSUMS_FORMAT = "fluxjax-checksums"
SMALL_FILE_BYTES = 1 << 20  # files up to this size (Orbax's metadata, manifests) are hashed before every load
DAMAGED = "the checkpoint is damaged; make it again from its source (convert, download or train it again)"


class CheckpointError(ValueError):
    """A checkpoint that is not what fluxjax expects; the message names the file and the key."""


def config_to_json(config) -> dict:
    """A frozen config dataclass (Flux2Config, VAEConfig) as JSON fields; tuples become lists."""
    return {f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v)
            for f in dataclasses.fields(config)}


def config_from_json(fields: dict, where: str, cls=Flux2Config):
    """The `cls` config of JSON fields (lists become tuples); CheckpointError naming `where` otherwise."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field {unknown[0]!r}; known fields: {sorted(known)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def check_leaves(params, shapes, where: str = "params", what: str = "config") -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of the `shapes` tree."""
    _check_names({name: tuple(np.shape(x)) for name, x in named_leaves(params)}, expected_leaves(shapes), where, what)


def _check_names(have: dict, expected: list[tuple[str, tuple[int, ...]]], where: str, what: str) -> None:
    want = dict(expected)
    for name, shape in expected:
        if name not in have:
            raise CheckpointError(f"{where}: missing parameter {name!r} for the {what}")
        if tuple(have[name]) != shape:
            raise CheckpointError(f"{where}: parameter {name!r} has shape {tuple(have[name])}, the {what} "
                                  f"needs {shape}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected parameter {extra[0]!r}; the {what} has no such parameter")


def check_params(params, config: Flux2Config, where: str = "params") -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of `config`."""
    check_leaves(params, param_shapes(config), where)


def is_checkpoint(path: str | os.PathLike, config_file: str = CONFIG_FILE) -> bool:
    return os.path.isfile(os.path.join(path, config_file))


# ---------------------------------------------------------------------------------------------
# parameter trees


def expected_leaves(shapes) -> list[tuple[str, tuple[int, ...]]]:
    """(leaf name, shape) of every leaf of a pytree of arrays or ShapeDtypeStructs, in order."""
    return [(name, tuple(x.shape)) for name, x in named_leaves(shapes)]


def write_tree(directory: str | os.PathLike, leaves: Iterable[tuple[str, object]],
               expected: list[tuple[str, tuple[int, ...]]], *, one_dtype: bool = True) -> np.dtype | None:
    """Stream (leaf name, array) pairs, exactly the `expected` ones in order, into a new Orbax
    PyTree checkpoint at `directory` -> the arrays' dtype (one_dtype; else None).

    `leaves` may be a generator that builds each array on demand: at most about GROUP_BYTES of
    finished arrays (or one larger array) are held at a time. one_dtype: refuse mixed dtypes.
    """
    directory = os.path.abspath(os.fspath(directory))
    dtype, group, size, scalars, arriving = None, {}, 0, {}, iter(leaves)
    sums = {}
    for want, shape in expected:
        name, array = next(arriving, (None, None))
        if name != want or tuple(np.shape(array)) != shape:
            got = "nothing" if name is None else f"parameter {name!r} {tuple(np.shape(array))}"
            raise CheckpointError(f"{directory}: {got} arrived where {want!r} {shape} was expected")
        sums[name] = array_checksum(array)  # of the bytes as given, before Orbax sees them
        if one_dtype:
            if dtype is None:
                dtype = np.dtype(array.dtype)
            elif np.dtype(array.dtype) != dtype:
                raise CheckpointError(f"{directory}: parameter {name!r} is {np.dtype(array.dtype).name}, the "
                                      f"others {dtype.name}; cast them to one dtype first")
        if not shape:  # scalars (a training step) cannot be chunked along a layer axis: saved apart
            insert(scalars, name, array)
            continue
        if group and size + array.nbytes > GROUP_BYTES:  # a large parameter goes alone
            _save_group(directory, group)
            group, size = {}, 0
        insert(group, name, array)
        size += array.nbytes
        del array
        if size >= GROUP_BYTES:
            _save_group(directory, group)
            group, size = {}, 0
    extra = next(arriving, None)
    if extra is not None:
        raise CheckpointError(f"{directory}: unexpected parameter {extra[0]!r} after the last expected one")
    if group:
        _save_group(directory, group)
    if scalars:
        _save_group(directory, scalars, shard_axes=())
    with _this_process():
        ocp.partial.finalize(directory)
    _write_checksums(directory, sums)
    return dtype


def read_tree(directory: str | os.PathLike, like, *, dtype=None, shardings=None, what: str = "config"):
    """Restore the Orbax PyTree checkpoint at `directory` into the structure of `like` (a pytree of
    arrays or ShapeDtypeStructs): the stored leaves must be exactly `like`'s names and shapes.

    dtype: cast every leaf on load (None keeps the stored dtypes). shardings: a pytree of
    `jax.sharding.Sharding` of `like`'s structure (each device then reads only its own shards);
    None puts every leaf on the default device. `what` names the expectation in messages.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: missing; the checkpoint is incomplete")
    sums = read_checksums(directory)
    changed = check_files(directory, sums)
    if any("d" not in Path(name).parts[:-1] for name in changed):  # metadata: never handed to Orbax damaged
        raise _damage(directory, sums, "a metadata file; not handed to Orbax", changed)
    try:
        with _quiet_orbax(), _this_process():
            stored = flatten(ocp.metadata(directory).metadata)
    except Exception as e:  # orbax raises assorted types for a damaged directory
        raise _damage(directory, sums, f"unreadable Orbax metadata ({_first_line(e)})") from None
    expected = expected_leaves(like)
    _check_names({name: m.shape for name, m in stored.items()}, expected, directory, what)
    missing = [name for name, _ in expected if name not in sums["arrays"]]
    if missing:
        raise CheckpointError(f"{os.path.join(directory, CHECKSUMS_FILE)}: no checksum for array {missing[0]!r}; "
                              f"{DAMAGED}")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, like)
    else:
        _check_shardings(shardings, like)
    abstract = [jax.ShapeDtypeStruct(shape, stored[name].dtype, sharding=s)  # stored dtype: verified, then cast
                for (name, shape), s in zip(expected, jax.tree_util.tree_leaves(
                    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))]
    spans_processes = not all(a.sharding.is_fully_addressable for a in abstract)
    try:
        with _quiet_orbax(), _this_process(not spans_processes):
            flat = flatten(ocp.load(directory, nest(zip((name for name, _ in expected), abstract))))
    except Exception as e:
        raise _damage(directory, sums, f"restoring the params failed ({_first_line(e)})") from None
    _verify_arrays(directory, sums, flat)
    if changed:  # a changed data file no restored array shows (e.g. an index node): still damaged
        raise _damage(directory, sums, "a data file", changed)
    if dtype is not None:
        for name in flat:  # one leaf at a time, so only one uncast copy is alive at once
            flat[name] = flat[name].astype(jnp.dtype(dtype))
    return from_named(flat, like)


# ---------------------------------------------------------------------------------------------
# checksums


def array_checksum(array) -> str:
    """sha256 of an array's bytes in its own dtype, C order (the shape and dtype are recorded apart)."""
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()


def file_checksum(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(directory: str) -> list[str]:
    """Every file of an Orbax directory but the checksums file, as sorted relative POSIX paths."""
    root = Path(directory)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS_FILE)


def _hash_files(directory: str, names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # hashlib frees the GIL
        return dict(zip(names, pool.map(lambda n: file_checksum(os.path.join(directory, n)), names)))


def _write_checksums(directory: str, arrays: dict[str, str]) -> None:
    names = _tree_files(directory)
    hashes = _hash_files(directory, names)
    files = {n: {"size": os.path.getsize(os.path.join(directory, n)), "sha256": hashes[n]} for n in names}
    with open(os.path.join(directory, CHECKSUMS_FILE), "w") as f:
        json.dump({"format": CHECKSUMS_FORMAT, "format_version": 1, "arrays": arrays, "files": files}, f, indent=1)


def read_checksums(directory: str | os.PathLike) -> dict:
    """The checksums a tree was written with; CheckpointError saying what to do if absent or unreadable."""
    directory = os.fspath(directory)
    where = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.isfile(where):
        raise CheckpointError(f"{where}: missing, so {directory} cannot be verified (written by an older fluxjax, "
                              f"or damaged); if you trust its contents, add checksums with `python -m "
                              f"fluxjax.checkpoint add-checksums {directory}`, else {DAMAGED.split('; ')[1]}")
    sums = read_json(where)
    ok = (isinstance(sums, dict) and sums.get("format") == CHECKSUMS_FORMAT and isinstance(sums.get("arrays"), dict)
          and isinstance(sums.get("files"), dict)
          and all(isinstance(v, dict) and isinstance(v.get("size"), int) for v in sums["files"].values()))
    if not ok:
        raise CheckpointError(f"{where}: not a {CHECKSUMS_FORMAT} file; {DAMAGED}")
    return sums


def check_files(directory: str | os.PathLike, sums: dict, *, full: bool = False) -> list[str]:
    """Every file the checksums list is present with its size (CheckpointError naming the first
    that is not) -> the small files (all of them if `full`) whose content differs."""
    directory = os.fspath(directory)
    for name, want in sums["files"].items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing; {DAMAGED}")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, written with {want['size']} (truncated or changed); "
                                  f"{DAMAGED}")
    small = [n for n, want in sums["files"].items() if full or want["size"] <= SMALL_FILE_BYTES]
    return [name for name, digest in _hash_files(directory, small).items() if digest != sums["files"][name]["sha256"]]


def verify_tree(directory: str | os.PathLike) -> None:
    """Check every file of a tree against its checksums (sizes and full content) without loading it."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: missing; the checkpoint is incomplete")
    sums = read_checksums(directory)
    changed = check_files(directory, sums, full=True)
    if changed:
        raise _damage(directory, sums, "checked without loading", changed)


def _damaged_files(directory: str, sums: dict) -> list[str]:
    hashes = _hash_files(directory, sums["files"])
    return [name for name, digest in hashes.items() if digest != sums["files"][name]["sha256"]]


def _damage(directory: str, sums: dict, what: str, bad: list[str] | None = None) -> CheckpointError:
    bad = _damaged_files(directory, sums) if bad is None else bad
    where = os.path.join(directory, bad[0]) if bad else directory
    more = f" (and {len(bad) - 1} more damaged files)" if len(bad) > 1 else ""
    return CheckpointError(f"{where}: content differs from its checksum{more} ({what}); {DAMAGED}" if bad
                           else f"{directory}: {what}; {DAMAGED}")


def _verify_arrays(directory: str, sums: dict, flat: dict) -> None:
    """Each restored array against its checksum; arrays this process cannot see whole (multi-process
    shardings) are covered by checking every file's content instead."""
    visible = [n for n, x in flat.items() if getattr(x, "is_fully_addressable", True)]
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = dict(zip(visible, pool.map(lambda n: array_checksum(flat[n]), visible)))
    bad = [n for n in visible if digests[n] != sums["arrays"][n]]
    if bad:
        files = _damaged_files(directory, sums)
        culprit = (f"damaged file {os.path.join(directory, files[0])}" if files
                   else f"the files match {CHECKSUMS_FILE}, so the checksums themselves were changed")
        more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
        raise CheckpointError(f"{directory}: array {bad[0]!r}{more} differs from the checksum written with it "
                              f"({culprit}); {DAMAGED}")
    if len(visible) < len(flat):
        changed = check_files(directory, sums, full=True)
        if changed:
            raise _damage(directory, sums, "a data file", changed)


def add_checksums(directory: str | os.PathLike) -> None:
    """Write the checksums of a tree saved without them (its arrays and files as they are now).

    Only for a tree whose contents you trust: from here on, any change to it is refused on load.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(os.path.join(directory, CHECKSUMS_FILE)):
        raise CheckpointError(f"{os.path.join(directory, CHECKSUMS_FILE)}: already exists; verify the tree instead")
    try:
        with _quiet_orbax(), _this_process():
            stored = flatten(ocp.metadata(directory).metadata)
            cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            abstract = nest((n, jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)) for n, m in stored.items())
            flat = flatten(ocp.load(directory, abstract))
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot be restored ({_first_line(e)}); {DAMAGED}") from None
    _write_checksums(directory, {n: array_checksum(x) for n, x in flat.items()})


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax and absl log tracebacks of a failed restore at ERROR; the CheckpointError says it in one line."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_shardings(shardings, like) -> None:
    want = jax.tree_util.tree_structure(like)
    have = jax.tree_util.tree_structure(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if want != have:
        raise ValueError(f"shardings must be a pytree of jax.sharding.Sharding matching the params; "
                         f"got structure {have}")


def _save_group(directory: str, group: dict, shard_axes: tuple[int, ...] = (0,)) -> None:
    with _save_context(shard_axes):
        ocp.partial.save(directory, group)
    group.clear()
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    tensorstore's writer threads allocate the chunk buffers of a save in glibc's per-thread
    arenas, which keep them after they are freed: measured, about 0.5 GB of a 2 GB conversion
    stayed resident and added to the next group's peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _this_process(alone: bool = True):
    """Orbax's scope for one read or write of fluxjax's files. With several JAX processes
    (`jax.distributed`), Orbax would synchronise each call across all of them; each process reads
    its own copy of a checkpoint (and converts on its own) unless the arrays it restores span
    processes (`alone` False: every process restores its shards together)."""
    if not alone or jax.process_count() == 1:
        return contextlib.nullcontext()
    return ocp.Context(**_alone())


def _alone() -> dict:
    """Orbax context options making this process the only one of a call (none with one process)."""
    if jax.process_count() == 1:
        return {}
    me = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})}


def _save_context(shard_axes: tuple[int, ...]):
    saving = ocp.options.ArrayOptions.Saving
    return ocp.Context(
        **_alone(),
        # Uncompressed: weights barely compress, and zstd buffers every chunk until commit.
        # shard_axes=(0,): chunks split the layer axis first, so a stacked parameter's chunks are layers.
        array_options=ocp.options.ArrayOptions(saving=saving(
            use_compression=False,
            storage_options=saving.StorageOptions(chunk_byte_size=CHUNK_BYTES, shard_axes=shard_axes))),
        memory_options=ocp.options.MemoryOptions(deepcopy_host_arrays=False),
    )


# ---------------------------------------------------------------------------------------------
# native checkpoint directories (JSON metadata + params/)


def read_json(path: str | os.PathLike):
    """The JSON value in the file at `path`; CheckpointError naming it if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.fspath(path)}: unreadable ({e})") from None


def check_destination(path: str | os.PathLike, overwrite: bool, config_file: str = CONFIG_FILE,
                      what: str = "fluxjax checkpoint") -> None:
    """Refuse an existing `path` unless `overwrite`, and even then anything but a `what` (a folder
    holding `config_file`) or an empty folder."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise CheckpointError(f"{path}: already exists; choose a new destination or pass overwrite=True "
                              f"(--overwrite) to replace it")
    if not (os.path.isdir(path) and (is_checkpoint(path, config_file) or not os.listdir(path))):
        raise CheckpointError(f"{path}: exists and is not a {what}; refusing to replace it even with "
                              f"overwrite (remove it yourself if it is yours to delete)")


def write_native(path: str | os.PathLike, config_file: str, meta: dict, leaves: Iterable[tuple[str, object]],
                 expected: list[tuple[str, tuple[int, ...]]], *, overwrite: bool = False,
                 what: str = "fluxjax checkpoint") -> None:
    """Write a native checkpoint directory: `meta` plus the stored "dtype" as `config_file`, the
    streamed `leaves` as `params/`. The destination rules are `check_destination`'s."""
    path = os.path.abspath(os.fspath(path))
    check_destination(path, overwrite, config_file, what)
    with atomic_directory(path, replace=overwrite) as tmp:
        dtype = write_tree(tmp / PARAMS_DIR, leaves, expected)
        with open(tmp / config_file, "w") as f:
            json.dump({**meta, "dtype": dtype.name if dtype is not None else None}, f, indent=1)


def read_meta(path: str | os.PathLike, kind: str, how: str, config_file: str = CONFIG_FILE,
              fmt: str = FORMAT, version_max: int = FORMAT_VERSION, version_min: int = 1) -> dict:
    """The validated JSON metadata of a native checkpoint directory (transformer or VAE); `kind`
    names the config class and `how` says how to make such a checkpoint, for the messages."""
    path = os.fspath(path)
    where = os.path.join(path, config_file)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(where):
        raise CheckpointError(f"{where}: missing; {path} is not a fluxjax checkpoint ({how})")
    meta = read_json(where)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{where}: key 'format' must be {fmt!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > version_max:
        raise CheckpointError(f"{where}: key 'format_version' is {version!r}; this fluxjax reads up to "
                              f"{version_max} (upgrade fluxjax)")
    if version < version_min:
        raise CheckpointError(f"{where}: key 'format_version' is {version}, a format this fluxjax no longer reads; "
                              f"make the checkpoint again ({how})")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{where}: key 'config' must be an object of {kind} fields")
    return meta


# ---------------------------------------------------------------------------------------------
# the transformer


def save_transformer(path: str | os.PathLike, config: Flux2Config, params: Flux2Weights, *,
                     overwrite: bool = False) -> None:
    """Write `params` (numpy or jax arrays) and `config` as a native checkpoint directory at `path`.

    The stored dtype is the params' own (one dtype for all). Existing `path`: refused unless
    `overwrite`, and even then only an existing fluxjax checkpoint or an empty directory is replaced.
    """
    check_params(params, config)
    write_checkpoint(path, config, named_leaves(params), overwrite=overwrite)


def write_checkpoint(path: str | os.PathLike, config: Flux2Config, leaves: Iterable[tuple[str, object]], *,
                     overwrite: bool = False) -> None:
    """Write a checkpoint from (leaf name, array) pairs in `param_shapes(config)` order, streaming
    (`write_tree`): `leaves` may be a generator that builds each array on demand."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_to_json(config)}
    write_native(path, CONFIG_FILE, meta, leaves, expected_leaves(param_shapes(config)), overwrite=overwrite)


def read_config(path: str | os.PathLike) -> Flux2Config:
    """The config stored in a native checkpoint directory."""
    meta = read_meta(path, "Flux2Config", "convert a diffusers or BFL checkpoint with `python -m conversion SRC DST`")
    return config_from_json(meta["config"], os.path.join(os.fspath(path), CONFIG_FILE))


ShardingsArg = Flux2Weights | Callable[[Flux2Config], Flux2Weights] | None


def load_transformer(path: str | os.PathLike, dtype=None, shardings: ShardingsArg = None
                     ) -> tuple[Flux2Config, Flux2Weights]:
    """Read a native checkpoint -> (config, params of jax arrays).

    dtype: cast every parameter on load (None keeps the stored dtype).
    shardings: a Flux2Weights-structured pytree of `jax.sharding.Sharding` (or a function
        config -> that pytree); each device then reads only its own shards from disk. None puts
        every parameter on the default device.
    """
    path = os.path.abspath(os.fspath(path))
    config = read_config(path)
    if callable(shardings):
        shardings = shardings(config)
    params = read_tree(os.path.join(path, PARAMS_DIR), param_shapes(config), dtype=dtype, shardings=shardings,
                       what=f"config in {CONFIG_FILE}")
    return config, params


def main(argv: list[str] | None = None) -> int:
    """`python -m fluxjax.checkpoint add-checksums DIR...` (trees or native checkpoint folders)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "add-checksums":
        sys.stderr.write("usage: python -m fluxjax.checkpoint add-checksums DIR...  (an Orbax tree written by "
                         "fluxjax, or a native checkpoint folder holding params/)\n")
        return 2
    for given in argv[1:]:
        tree = os.path.join(given, PARAMS_DIR) if os.path.isdir(os.path.join(given, PARAMS_DIR)) else given
        try:
            add_checksums(tree)
        except CheckpointError as e:
            sys.stderr.write(f"{e}\n")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
