"""The native checkpoint of the FLUX.2 autoencoder: the params as an Orbax checkpoint, the config as JSON.

A checkpoint is a directory, written and read by the one path of `fluxjax.checkpoint`:

    fluxjax_vae.json   {"format": "fluxjax-vae", "format_version": 2,
                        "config": {VAEConfig fields}, "dtype": "float32"}
    params/            Orbax (v1 API) PyTree checkpoint of the params as nested dicts keyed like VAEParams,
                       list positions as strings: {"encoder": {"down": {"0": {"block": {"1": ...}}}}}

Conv kernels are HWIO and matrices (in, out), exactly as in memory (see `fluxjax.vae`). Format
version 1 stored the params with Orbax's legacy PyTreeCheckpointer layout; it is no longer read
(convert the VAE again; `fluxjax.pipeline` re-converts its cache by itself).
"""

from __future__ import annotations

import os

from fluxjax.checkpoint import (PARAMS_DIR, check_leaves, config_from_json, config_to_json, expected_leaves,
                                is_checkpoint, read_meta, read_tree, write_native)
from fluxjax.trees import named_leaves
from fluxjax.vae import VAEConfig, VAEParams, vae_param_shapes

FORMAT = "fluxjax-vae"
FORMAT_VERSION = 2  # 2: the v1 API's layout (version 1: the legacy PyTreeCheckpointer's)
CONFIG_FILE = "fluxjax_vae.json"
HOW = "convert a diffusers vae/ folder or BFL ae.safetensors with `python -m conversion SRC DST`"


def check_vae_params(params, config: VAEConfig, where: str = "params") -> None:
    """Raise CheckpointError unless `params` has exactly the leaves and shapes of `config`."""
    check_leaves(params, vae_param_shapes(config), where, "VAE config")


def is_vae_checkpoint(path: str | os.PathLike) -> bool:
    return is_checkpoint(path, CONFIG_FILE)


def save_vae(path: str | os.PathLike, config: VAEConfig, params: VAEParams, *, overwrite: bool = False) -> None:
    """Write `params` (numpy or jax arrays, one dtype) and `config` as a native VAE checkpoint at `path`.

    An existing `path` is refused unless `overwrite`, and even then only an existing fluxjax VAE
    checkpoint or an empty directory is replaced.
    """
    check_vae_params(params, config)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_to_json(config)}
    write_native(path, CONFIG_FILE, meta, named_leaves(params), expected_leaves(vae_param_shapes(config)),
                 overwrite=overwrite, what="fluxjax VAE checkpoint")


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The config stored in a native VAE checkpoint directory."""
    meta = read_meta(path, "VAEConfig", HOW, CONFIG_FILE, FORMAT, FORMAT_VERSION, version_min=FORMAT_VERSION)
    return config_from_json(meta["config"], os.path.join(os.fspath(path), CONFIG_FILE), VAEConfig)


def load_vae(path: str | os.PathLike, dtype=None) -> tuple[VAEConfig, VAEParams]:
    """Read a native VAE checkpoint -> (config, params of jax arrays on the default device).

    dtype: cast every parameter on load (None keeps the stored dtype).
    """
    path = os.path.abspath(os.fspath(path))
    config = read_vae_config(path)
    params = read_tree(os.path.join(path, PARAMS_DIR), vae_param_shapes(config), dtype=dtype,
                       what=f"VAE config in {CONFIG_FILE}")
    return config, params
