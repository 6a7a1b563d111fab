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
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from collections.abc import Callable, Iterable

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
    for want, shape in expected:
        name, array = next(arriving, (None, None))
        if name != want or tuple(np.shape(array)) != shape:
            got = "nothing" if name is None else f"parameter {name!r} {tuple(np.shape(array))}"
            raise CheckpointError(f"{directory}: {got} arrived where {want!r} {shape} was expected")
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
    ocp.partial.finalize(directory)
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
    try:
        stored = flatten(ocp.metadata(directory).metadata)
    except Exception as e:  # orbax raises assorted types for a damaged directory
        raise CheckpointError(f"{directory}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
    expected = expected_leaves(like)
    _check_names({name: m.shape for name, m in stored.items()}, expected, directory, what)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, like)
    else:
        _check_shardings(shardings, like)
    abstract = [jax.ShapeDtypeStruct(shape, stored[name].dtype if dtype is None else jnp.dtype(dtype), sharding=s)
                for (name, shape), s in zip(expected, jax.tree_util.tree_leaves(
                    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))]
    try:
        tree = ocp.load(directory, nest(zip((name for name, _ in expected), abstract)))
    except Exception as e:
        raise CheckpointError(f"{directory}: restoring the params failed ({type(e).__name__}: {e})") from None
    return from_named(flatten(tree), like)


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


def _save_context(shard_axes: tuple[int, ...]):
    saving = ocp.options.ArrayOptions.Saving
    return ocp.Context(
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
