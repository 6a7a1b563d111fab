"""Sharded execution over a device mesh, with JAX's own SPMD partitioner.

The mesh has two named axes:

    data  batches: seeds, tasks, sweep cells. Inputs are split along their leading (batch) axis.
    fsdp  the weights: every parameter matrix is split along one of its two matrix axes (fully
          sharded data parallel); XLA gathers or reduces what each matmul needs.

Nothing in the model knows about the mesh. Place the parameters with `shard_params` (or load them
straight into their shards with `load_transformer(path, shardings=partial(param_shardings, mesh))`),
place the batch with `shard_batch`, and call `fluxjax.forward` or `fluxjax.sampler.sample` as
usual: `jit` follows the input shardings and XLA partitions the program.

    mesh = make_mesh(data=2, fsdp=4)
    params = shard_params(params, mesh)
    img, txt, t = shard_batch((img, txt, t), mesh)
    out, _ = jax.jit(forward, static_argnums=1)(params, config, img, txt, t, img_ids, txt_ids)

The plan for each parameter comes from its logical axes, declared once beside its shape
(`fluxjax.params.param_infos`), so it is known before any weight exists (`jax.eval_shape`):

    out           split over fsdp when the fsdp size divides it
    in            split instead when `out` is not divisible
    layers        whole (the blocks' scan runs over it)
    head_dim      whole: QK-norm scales are replicated (a few KiB per layer)

A matrix with neither axis divisible stays replicated (`bytes_per_device` shows the cost). Every
matrix of the released presets splits over 2, 4 and 8 devices.

Several processes (multi-controller JAX, after `jax.distributed.initialize`): every process runs
the same program, and a mesh may span the devices of all of them (`global_mesh`). Each process
holds the same host values and places them with `put`, which fills only its own devices' shards;
`to_host` brings a result back whole to every process.

    mesh = global_mesh(data=1, fsdp=jax.device_count())  # the weights split over every process's devices
    params = put(params, param_shardings(mesh, config))
    out = to_host(jax.jit(forward, static_argnums=1)(params, config, img, txt, t, img_ids, txt_ids)[0])
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fluxjax.config import Flux2Config
from fluxjax.params import IN, OUT, Flux2Weights, leaf_axes, param_shapes
from fluxjax.trees import leaf_name

DATA = "data"
FSDP = "fsdp"


def make_mesh(data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices); fsdp None takes the rest.

    The axes are `AxisType.Auto`: XLA propagates shardings through the program.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or len(devices) % data:
        raise ValueError(f"data={data} must be a positive divisor of the {len(devices)} devices")
    fsdp = len(devices) // data if fsdp is None else fsdp
    if fsdp < 1 or data * fsdp != len(devices):
        raise ValueError(f"a ({data}, {fsdp}) mesh needs {data * fsdp} devices, got {len(devices)}; "
                         f"pass devices=jax.devices()[:{data * fsdp}] to use a subset")
    return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _leaf_spec(axes: tuple[str, ...], shape: tuple[int, ...], fsdp: int) -> P:
    """fsdp on the `out` axis, else on the `in` axis, where its size divides it; else replicated."""
    for name in (OUT, IN):
        if name in axes and shape[axes.index(name)] % fsdp == 0:
            return P(*(FSDP if a == name else None for a in axes))
    return P()


def partition_specs(tree, fsdp: int):
    """PartitionSpecs for a Flux2Weights-structured pytree of arrays or ShapeDtypeStructs."""
    if fsdp < 1:
        raise ValueError(f"fsdp must be >= 1, got {fsdp}")
    axes = leaf_axes()
    return jax.tree_util.tree_map_with_path(lambda path, x: _leaf_spec(axes[leaf_name(path)], tuple(x.shape), fsdp),
                                            tree)


def param_partition_specs(config: Flux2Config, fsdp: int) -> Flux2Weights:
    """The PartitionSpec of every parameter of `config` for an fsdp axis of size `fsdp`."""
    return partition_specs(param_shapes(config), fsdp)


def param_shardings(mesh: Mesh, config: Flux2Config) -> Flux2Weights:
    """NamedShardings of every parameter of `config` on `mesh` (replicated over `data`).

    This is the `shardings` argument of `fluxjax.load_transformer` and the `out_shardings` of a
    jitted `init_params`.
    """
    specs = param_partition_specs(config, mesh.shape[FSDP])
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Flux2Weights, mesh: Mesh) -> Flux2Weights:
    """Place `params` on `mesh` according to the plan (module docstring)."""
    specs = partition_specs(params, mesh.shape[FSDP])
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(params, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, every other axis whole; for arrays of any rank >= 1."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device (position ids, knockout tables, scalars)."""
    return NamedSharding(mesh, P())


def shard_batch(tree, mesh: Mesh):
    """Place every array of `tree` with its leading axis split over `data`."""
    size = mesh.shape[DATA]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % size:
            raise ValueError(f"an array of shape {x.shape} cannot be split over data={size}: its leading (batch) "
                             f"axis must be a multiple of {size}; pad the batch or use a smaller data axis")
        return jax.device_put(x, batch_sharding(mesh))

    return jax.tree_util.tree_map(put, tree)


def bytes_per_device(tree) -> int:
    """Largest number of bytes any one device holds of `tree` (placed arrays, or ShapeDtypeStructs
    carrying a `.sharding`, e.g. from `jax.eval_shape` of a function jitted with out_shardings)."""
    per_device: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        size = math.prod(shard) * np.dtype(x.dtype).itemsize
        for d in x.sharding.device_set:
            per_device[d] = per_device.get(d, 0) + size
    return max(per_device.values(), default=0)


# --- meshes spanning processes (multi-controller JAX) ----------------------------------------------


def global_mesh(data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh over the devices of every process, in (process, local device) order.

    devices: default every device of every process (`jax.devices()`); give a subset in the same
    order on every process. The devices fill the fsdp axis first: an fsdp axis larger than one
    process's devices spans processes (a model too large for one host), a smaller one stays within
    each process and `data` spans them. fsdp None takes every device.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    fsdp = len(devices) // data if fsdp is None else fsdp
    if data < 1 or fsdp < 1 or data * fsdp != len(devices):
        raise ValueError(f"a ({data}, {fsdp}) mesh needs {data * fsdp} devices, got {len(devices)} "
                         f"({jax.process_count()} processes); choose data x fsdp = {len(devices)}")
    return Mesh(np.array(devices, dtype=object).reshape(data, fsdp), (DATA, FSDP),
                axis_types=(AxisType.Auto, AxisType.Auto))


def put(tree, shardings):
    """Host values (numpy or JAX arrays, the same on every process) as arrays laid out by `shardings`
    (one Sharding for every leaf, or a pytree of them matching `tree`).

    Works on meshes within this process and on meshes spanning processes: each process builds only
    its own devices' shards from its copy (`jax.make_array_from_callback`), so nothing crosses
    processes and, unlike `jax.device_put`, no collective check that the copies agree is run.
    """
    host = jax.tree_util.tree_map(np.asarray, tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_callback(x.shape, shardings, x.__getitem__), host)
    return jax.tree_util.tree_map(lambda s, x: jax.make_array_from_callback(x.shape, s, x.__getitem__), shardings,
                                  host, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def put_params(params: Flux2Weights, mesh: Mesh) -> Flux2Weights:
    """`shard_params` for any mesh, including one spanning processes (`put`): the plan of the module
    docstring, every process passing the same params."""
    specs = partition_specs(params, mesh.shape[FSDP])
    return put(params, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                              is_leaf=lambda x: isinstance(x, P)))


def to_host(tree):
    """Every array of `tree` as one whole numpy array on this process.

    An array with shards on other processes' devices is gathered to every process
    (`multihost_utils.process_allgather`): every process must call this with the same tree, as for
    any program that spans processes.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)
