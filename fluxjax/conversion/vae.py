"""Strict conversion of a FLUX.2 autoencoder state (BFL `ae.safetensors` or diffusers `vae/`) into fluxjax.

`vae_params_from_state(state, config, fmt)` reads from any mapping of key -> array (an in-memory
state dict, or a lazy reader over a safetensors file that loads one tensor at a time). Before
reading any tensor it checks the full key set and every shape against
`fluxjax.vae.vae_param_shapes`, and raises naming the key on a missing key, an unexpected key or a
wrong shape.

`convert_vae(src, dst)` converts a diffusers `vae/` folder (config.json + safetensors) or a single
safetensors file (BFL `ae.safetensors`) into a native checkpoint (`fluxjax.vae_checkpoint`),
reading tensors lazily and without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np

from fluxjax.conversion.safetensors_io import SafetensorsFile, check_keys
from fluxjax.conversion.vae_keys import OPTIONAL_KEYS, expected_source_shapes, rows_for, to_leaf
from fluxjax.checkpoint import CheckpointError
from fluxjax.trees import leaf_name
from fluxjax.vae import FLUX2_VAE, VAEConfig, VAEParams, vae_param_shapes


def detect_vae_format(keys) -> str:
    """'bfl' or 'diffusers' from the key names (BFL keeps quant_conv inside the encoder)."""
    keys = set(keys)
    if any(k.startswith("encoder.down.") for k in keys):
        return "bfl"
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return "diffusers"
    raise CheckpointError("not a FLUX.2 autoencoder checkpoint: no 'encoder.down.*' (BFL) or "
                          "'encoder.down_blocks.*' (diffusers) keys")


def check_vae_state(shapes: Mapping[str, tuple[int, ...]], config: VAEConfig, fmt: str, where: str = "checkpoint"):
    """Raise CheckpointError unless `shapes` (key -> shape) is exactly the key set of `config` in `fmt`."""
    check_keys(shapes, expected_source_shapes(config, fmt), f"{fmt} FLUX.2 autoencoder", where, OPTIONAL_KEYS)


def vae_params_from_state(state: Mapping, config: VAEConfig, fmt: str, dtype=None, where: str = "checkpoint",
                          shapes: Mapping[str, tuple[int, ...]] | None = None) -> VAEParams:
    """Build numpy VAEParams from `state`; `dtype` None keeps the stored dtype."""
    check_vae_state(shapes if shapes is not None else {k: np.shape(state[k]) for k in state}, config, fmt, where)
    rows = rows_for(config, fmt)
    flat, treedef = jax.tree_util.tree_flatten_with_path(vae_param_shapes(config))
    leaves = []
    for path, _ in flat:
        row = rows[leaf_name(path)]
        leaf = to_leaf(np.asarray(state[row.key]), row.op)
        if dtype is not None:
            leaf = leaf.astype(dtype)
        leaves.append(np.ascontiguousarray(leaf))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --- files and folders -----------------------------------------------------------------------

DIFFUSERS_CLASS = "AutoencoderKLFlux2"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
# diffusers config.json fields that fluxjax reads; the others (sample_size, force_upcast,
# batch_norm_momentum, ...) do not change inference
_CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "decoder_block_out_channels",
                  "layers_per_block", "latent_channels", "norm_num_groups", "batch_norm_eps", "patch_size",
                  "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def is_vae_source(src: str | os.PathLike) -> bool:
    """Whether `src` looks like a FLUX.2 autoencoder: a diffusers folder whose config.json names
    `AutoencoderKLFlux2`, or a safetensors file with autoencoder keys. Reads headers only."""
    src = os.fspath(src)
    if os.path.isdir(src):
        try:
            with open(os.path.join(src, "config.json")) as f:
                return json.load(f).get("_class_name") == DIFFUSERS_CLASS
        except (OSError, ValueError, AttributeError):
            return False
    if not os.path.isfile(src):
        return False
    try:
        keys = SafetensorsFile(src).shapes
    except CheckpointError:
        return False
    return any(k.startswith(("encoder.down.", "encoder.down_blocks.")) for k in keys)


def vae_config_from_diffusers(cfg: Mapping, where: str = "config.json") -> VAEConfig:
    """VAEConfig of a diffusers `AutoencoderKLFlux2` config.json (absent fields: diffusers' defaults)."""
    name = cfg.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise CheckpointError(f"{where}: key '_class_name' is {name!r}, not {DIFFUSERS_CLASS!r}")
    if cfg.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"{where}: key 'act_fn' is {cfg['act_fn']!r}; the FLUX.2 autoencoder uses 'silu'")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if key in cfg and any(t != kind for t in cfg[key]):
            raise CheckpointError(f"{where}: key {key!r} is {cfg[key]!r}; fluxjax implements {kind} levels only")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in _CONFIG_FIELDS}
    try:
        config = VAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != config.num_levels:
            raise CheckpointError(f"{where}: key {key!r} has {len(cfg[key])} entries for "
                                  f"{config.num_levels} levels of block_out_channels")
    return config


def open_vae_source(src: str | os.PathLike, config: VAEConfig | None = None) -> tuple[Mapping, str, VAEConfig, str]:
    """-> (lazy state, format, config, path for messages) of a diffusers `vae/` folder or a single
    safetensors file (BFL `ae.safetensors`, or diffusers keys). A folder's config.json is the
    config (a given `config` must equal it); a single file uses `config`, by default FLUX2_VAE."""
    src = os.path.abspath(os.fspath(src))
    if os.path.isdir(src):
        config_path, weights = os.path.join(src, "config.json"), os.path.join(src, SAFETENSORS_NAME)
        try:
            with open(config_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: a diffusers vae/ folder needs a readable config.json "
                                  f"({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{config_path}: must be a JSON object")
        from_json = vae_config_from_diffusers(cfg, config_path)
        if config is not None and config != from_json:
            raise CheckpointError(f"{config_path}: describes {from_json}, not the config asked for ({config})")
        if not os.path.isfile(weights):
            raise CheckpointError(f"{src}: no {SAFETENSORS_NAME} in this diffusers vae/ folder")
        state = SafetensorsFile(weights)
        fmt = detect_vae_format(state.shapes)
        if fmt != "diffusers":
            raise CheckpointError(f"{weights}: holds BFL keys but sits in a diffusers folder; pass the file itself")
        return state, fmt, from_json, weights
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    state = SafetensorsFile(src)
    return state, detect_vae_format(state.shapes), config or FLUX2_VAE, src


def convert_vae(src: str | os.PathLike, dst: str | os.PathLike, config: VAEConfig | None = None, dtype=None, *,
                overwrite: bool = False) -> VAEConfig:
    """Convert a diffusers `vae/` folder or BFL `ae.safetensors` into a native VAE checkpoint at `dst`.

    dtype: a numpy/jax dtype name ("float32", "bfloat16") or None to keep the stored dtype. The
    whole key set and every shape are checked before any tensor is read; `dst` is written only
    once everything was converted. Returns the config.
    """
    from fluxjax.vae_checkpoint import save_vae

    state, fmt, config, where = open_vae_source(src, config)
    check_vae_state(state.shapes, config, fmt, where)
    if dtype is None:
        stored = {np.dtype(state.dtypes[k]).name for k in expected_source_shapes(config, fmt)}
        if len(stored) > 1:
            raise CheckpointError(f"{where}: tensors mix dtypes {sorted(stored)}; choose one with dtype=")
    else:
        import ml_dtypes  # registers bfloat16 with numpy

        name = {"bf16": "bfloat16", "fp32": "float32"}.get(str(dtype), str(dtype))
        dtype = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    params = vae_params_from_state(state, config, fmt, dtype, where, shapes=state.shapes)
    save_vae(dst, config, params, overwrite=overwrite)
    return config
