"""Strict conversion of a FLUX.2 autoencoder state (BFL `ae.safetensors` or diffusers `vae/`) into fluxjax.

`vae_params_from_state(state, config, fmt)` reads from any mapping of key -> array (an in-memory
state dict, or a lazy reader over a safetensors file that loads one tensor at a time). Before
reading any tensor it checks the full key set and every shape against
`fluxjax.vae.vae_param_shapes`, and raises naming the key on a missing key, an unexpected key or a
wrong shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from conversion.transformer import CheckpointError
from conversion.vae_keys import OPTIONAL_KEYS, expected_source_shapes, leaf_name, rows_for, to_leaf
from fluxjax.vae import VAEConfig, VAEParams, vae_param_shapes


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
    expected = expected_source_shapes(config, fmt)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(OPTIONAL_KEYS))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all) for a {fmt} "
                              f"FLUX.2 autoencoder of this config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              f"it is not part of a {fmt} FLUX.2 autoencoder of this config")
    for k, want in expected.items():
        if tuple(shapes[k]) != want:
            raise CheckpointError(f"{where}: key {k!r} has shape {tuple(shapes[k])}, expected {want} for this config")


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
