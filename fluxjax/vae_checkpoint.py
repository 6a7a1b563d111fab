"""The native checkpoint of the FLUX.2 autoencoder: the params as an Orbax checkpoint, the config as JSON.

A checkpoint is a directory, laid out like the transformer's (`fluxjax.checkpoint`):

    fluxjax_vae.json   {"format": "fluxjax-vae", "format_version": 1,
                        "config": {VAEConfig fields}, "dtype": "float32"}
    params/            Orbax PyTree checkpoint of the params as nested dicts keyed like VAEParams,
                       list positions as strings: {"encoder": {"down": {"0": {"block": {"1": ...}}}}}

Conv kernels are HWIO and matrices (in, out), exactly as in memory (see `fluxjax.vae`). Writing
goes into a temporary sibling directory renamed into place at the end, so a failed save leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fluxjax.checkpoint import CheckpointError, check_leaves, config_from_json, config_to_json, read_meta
from fluxjax.vae import VAEConfig, VAEParams, leaf_name, vae_param_shapes

FORMAT = "fluxjax-vae"
FORMAT_VERSION = 1
CONFIG_FILE = "fluxjax_vae.json"
PARAMS_DIR = "params"


def _leaves(tree) -> dict:
    return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(flat: dict) -> dict:
    out: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _params_from_flat(flat: dict, config: VAEConfig) -> VAEParams:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(vae_param_shapes(config))
    return jax.tree_util.tree_unflatten(treedef, [flat[leaf_name(p)] for p, _ in leaves])


def check_vae_params(params, config: VAEConfig, where: str = "params") -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of `config`."""
    check_leaves(params, vae_param_shapes(config), where, "VAE config")


def vae_config_to_json(config: VAEConfig) -> dict:
    return config_to_json(config)


def vae_config_from_json(fields: dict, where: str) -> VAEConfig:
    return config_from_json(fields, where, VAEConfig)


def is_vae_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_vae(path: str | os.PathLike, config: VAEConfig, params: VAEParams, *, overwrite: bool = False) -> None:
    """Write `params` (numpy or jax arrays, one dtype) and `config` as a native VAE checkpoint at `path`.

    An existing `path` is refused unless `overwrite`, and even then only an existing fluxjax VAE
    checkpoint or an empty directory is replaced.
    """
    path = os.path.abspath(os.fspath(path))
    check_vae_params(params, config)
    dtypes = {np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1:
        raise CheckpointError(f"{path}: params mix dtypes {sorted(dtypes)}; cast them to one dtype first")
    if os.path.lexists(path):
        if not overwrite:
            raise CheckpointError(f"{path}: already exists; choose a new destination or pass overwrite=True")
        if not (os.path.isdir(path) and (is_vae_checkpoint(path) or not os.listdir(path))):
            raise CheckpointError(f"{path}: exists and is not a fluxjax VAE checkpoint; refusing to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), _nested(_leaves(params)))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": vae_config_to_json(config),
                "dtype": dtypes.pop()}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, "checkpoint"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The config stored in a native VAE checkpoint directory."""
    meta = read_meta(path, "VAEConfig", "convert a diffusers vae/ folder or BFL ae.safetensors with "
                     "`python -m conversion SRC DST`", CONFIG_FILE, FORMAT, FORMAT_VERSION)
    return vae_config_from_json(meta["config"], os.path.join(os.fspath(path), CONFIG_FILE))


def load_vae(path: str | os.PathLike, dtype=None) -> tuple[VAEConfig, VAEParams]:
    """Read a native VAE checkpoint -> (config, params of jax arrays on the default device).

    dtype: cast every parameter on load (None keeps the stored dtype).
    """
    path = os.path.abspath(os.fspath(path))
    config = read_vae_config(path)
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing; the checkpoint at {path} is incomplete")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        stored = _leaves(checkpointer.metadata(params_dir).item_metadata.tree)
    except Exception as e:  # orbax raises assorted types for a damaged directory
        raise CheckpointError(f"{params_dir}: unreadable Orbax metadata ({type(e).__name__}: {e})") from None
    expected = _leaves(vae_param_shapes(config))
    for name in expected:
        if name not in stored:
            raise CheckpointError(f"{params_dir}: missing parameter {name!r} for the config in {CONFIG_FILE}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{params_dir}: unexpected parameter {extra[0]!r} for the config in {CONFIG_FILE}")
    for name, sds in expected.items():
        if tuple(stored[name].shape) != tuple(sds.shape):
            raise CheckpointError(f"{params_dir}: parameter {name!r} has shape {tuple(stored[name].shape)}, the "
                                  f"config in {CONFIG_FILE} needs {tuple(sds.shape)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=device, global_shape=tuple(stored[k].shape),
                                            dtype=None if dtype is None else jnp.dtype(dtype)) for k in expected}
    try:
        tree = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=_nested(restore_args)))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: restoring the params failed ({type(e).__name__}: {e})") from None
    return config, _params_from_flat(_leaves(tree), config)
