"""The native fluxjax checkpoint: the params as an Orbax checkpoint, the config as JSON.

A checkpoint is a directory:

    fluxjax_transformer.json   {"format": "fluxjax-transformer", "format_version": 1,
                                "config": {Flux2Config fields}, "dtype": "bfloat16"}
    params/                    Orbax (v1 API) PyTree checkpoint of the params as a nested dict
                               keyed like Flux2Weights: {"double_blocks": {"img_attn": {"qkv": ...}}}

The params are stored as plain nested dicts, so any Orbax user can read them without fluxjax
(`orbax.checkpoint.v1.load(path + "/params")`); `load_transformer` rebuilds the Flux2Weights pytree
from the config. Matrices are (in, out) and block parameters stacked on a leading layer axis,
exactly as in memory; storage chunks hold whole layers where they fit in CHUNK_BYTES.

Writing streams: parameters arrive one at a time (`write_checkpoint`) and go to disk in groups of
at most GROUP_BYTES (a larger parameter alone) with Orbax's partial saves, so a conversion never
holds the whole model. Measured with orbax-checkpoint 0.12.8: saving numpy arrays holds up to
three copies of what is being saved (a defensive deep copy, then tensorstore's chunk buffers, kept
until the OCDBT commit); here the deep copy is off and each group is committed before the next is
built, so the peak is about twice the largest parameter.

Writing never leaves a half-written directory behind: everything goes into a temporary sibling
that is renamed into place at the end.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint import v1 as ocp

from fluxjax.config import Flux2Config
from fluxjax.params import Flux2Weights, param_shapes

FORMAT = "fluxjax-transformer"
FORMAT_VERSION = 1
CONFIG_FILE = "fluxjax_transformer.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 64 << 20  # storage chunks; a sharded restore reads only the chunks its shards touch
GROUP_BYTES = 256 << 20  # parameters gathered per partial save


class CheckpointError(ValueError):
    """A checkpoint that is not what fluxjax expects; the message names the file and the key."""


def leaf_name(path) -> str:
    """Dotted name of a params pytree path, e.g. 'double_blocks.img_attn.qkv' or 'decoder.up.3.block.0'."""
    return ".".join(str(k.idx) if hasattr(k, "idx") else str(getattr(k, "name", getattr(k, "key", k)))
                    for k in path)


def params_to_dict(params: Flux2Weights) -> dict:
    """Flux2Weights (or a pytree of the same structure) -> nested dict keyed by field names."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        *parents, last = leaf_name(path).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _flat_dict(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _params_from_flat(flat: dict, config: Flux2Config) -> Flux2Weights:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    return jax.tree_util.tree_unflatten(treedef, [flat[leaf_name(p)] for p, _ in leaves])


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
    want = {leaf_name(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    have = {leaf_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise CheckpointError(f"{where}: missing parameter {name!r} for this {what}")
        if name not in want:
            raise CheckpointError(f"{where}: unexpected parameter {name!r}; this {what} has no such parameter")
        if have[name] != want[name]:
            raise CheckpointError(f"{where}: parameter {name!r} has shape {have[name]}, the config needs {want[name]}")


def check_params(params, config: Flux2Config, where: str = "params") -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of `config`."""
    check_leaves(params, param_shapes(config), where)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def named_leaves(params: Flux2Weights) -> Iterable[tuple[str, object]]:
    return ((leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])


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
    """Write a checkpoint from (leaf name, array) pairs in `param_shapes(config)` order, streaming.

    `leaves` may be a generator that builds each array on demand: at most about GROUP_BYTES of
    finished parameters (or one larger parameter) are held at a time.
    """
    path = os.path.abspath(os.fspath(path))
    check_destination(path, overwrite)
    expected = [(leaf_name(p), s.shape) for p, s in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]]
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    params_dir = os.path.join(tmp, PARAMS_DIR)
    try:
        dtype, group, size, arriving = None, {}, 0, iter(leaves)
        with _save_context():
            for want, shape in expected:
                name, array = next(arriving, (None, None))
                if name != want or tuple(array.shape) != shape:
                    got = "nothing" if name is None else f"parameter {name!r} {tuple(array.shape)}"
                    raise CheckpointError(f"{path}: {got} arrived where {want!r} {shape} was expected")
                if dtype is None:
                    dtype = np.dtype(array.dtype)
                elif np.dtype(array.dtype) != dtype:
                    raise CheckpointError(f"{path}: parameter {name!r} is {np.dtype(array.dtype).name}, the others "
                                          f"{dtype.name}; cast them to one dtype first")
                if group and size + array.nbytes > GROUP_BYTES:  # a large parameter goes alone
                    _save_group(params_dir, group)
                    group, size = {}, 0
                *parents, last = name.split(".")
                node = group
                for k in parents:
                    node = node.setdefault(k, {})
                node[last] = array
                size += array.nbytes
                del array
                if size >= GROUP_BYTES:
                    _save_group(params_dir, group)
                    group, size = {}, 0
            extra = next(arriving, None)
            if extra is not None:
                raise CheckpointError(f"{path}: unexpected parameter {extra[0]!r} after the last one of the config")
            if group:
                _save_group(params_dir, group)
            ocp.partial.finalize(params_dir)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_to_json(config),
                "dtype": dtype.name}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_group(params_dir: str, group: dict) -> None:
    ocp.partial.save(params_dir, group)
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


def _save_context():
    saving = ocp.options.ArrayOptions.Saving
    return ocp.Context(
        # Uncompressed: weights barely compress, and zstd buffers every chunk until commit.
        # shard_axes=(0,): chunks split the layer axis first, so a stacked parameter's chunks are layers.
        array_options=ocp.options.ArrayOptions(saving=saving(
            use_compression=False,
            storage_options=saving.StorageOptions(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,)))),
        memory_options=ocp.options.MemoryOptions(deepcopy_host_arrays=False),
    )


def check_destination(path: str, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise CheckpointError(f"{path}: already exists; choose a new destination or pass overwrite=True "
                              f"(--overwrite) to replace it")
    if not (os.path.isdir(path) and (is_checkpoint(path) or not os.listdir(path))):
        raise CheckpointError(f"{path}: exists and is not a fluxjax checkpoint; refusing to replace it even with "
                              f"overwrite (remove it yourself if it is yours to delete)")


def _replace(tmp: str, path: str) -> None:
    """Move the finished `tmp` to `path`; an old checkpoint there goes only once the new one is in place."""
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "checkpoint"))
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | os.PathLike, kind: str, how: str, config_file: str = CONFIG_FILE,
              fmt: str = FORMAT, version_max: int = FORMAT_VERSION) -> dict:
    """The validated JSON metadata of a native checkpoint directory (transformer or VAE); `kind`
    names the config class and `how` says how to make such a checkpoint, for the messages."""
    path = os.fspath(path)
    where = os.path.join(path, config_file)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(where):
        raise CheckpointError(f"{where}: missing; {path} is not a fluxjax checkpoint ({how})")
    try:
        with open(where) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{where}: key 'format' must be {fmt!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > version_max:
        raise CheckpointError(f"{where}: key 'format_version' is {version!r}; this fluxjax reads up to "
                              f"{version_max} (upgrade fluxjax)")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{where}: key 'config' must be an object of {kind} fields")
    return meta


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
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing; the checkpoint at {path} is incomplete")
    try:
        stored = _flat_dict(ocp.metadata(params_dir).metadata)
    except Exception as e:  # orbax raises assorted types for a damaged directory
        raise CheckpointError(f"{params_dir}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
    expected = _expected_names(config)
    for name in expected:
        if name not in stored:
            raise CheckpointError(f"{params_dir}: missing parameter {name!r} for the config in {CONFIG_FILE}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{params_dir}: unexpected parameter {extra[0]!r} for the config in {CONFIG_FILE}")
    shapes = _params_from_flat({k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()}, config)
    check_params(shapes, config, params_dir)

    if callable(shardings):
        shardings = shardings(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    else:
        _check_shardings(shardings, shapes)
    abstract = jax.tree_util.tree_map(
        lambda sds, sharding: jax.ShapeDtypeStruct(sds.shape, sds.dtype if dtype is None else jnp.dtype(dtype),
                                                   sharding=sharding),
        shapes, shardings)
    try:
        tree = ocp.load(params_dir, params_to_dict(abstract))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: restoring the params failed ({type(e).__name__}: {e})") from None
    return config, _params_from_flat(_flat_dict(tree), config)


def _expected_names(config: Flux2Config) -> list[str]:
    return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]]


def _check_shardings(shardings, shapes) -> None:
    want = jax.tree_util.tree_structure(shapes)
    have = jax.tree_util.tree_structure(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if want != have:
        raise ValueError(f"shardings must be a Flux2Weights pytree of jax.sharding.Sharding matching the params; "
                         f"got structure {have}")
