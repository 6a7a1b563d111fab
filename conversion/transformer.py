"""Strict conversion of a FLUX.2 transformer state (diffusers or BFL keys) into fluxjax params.

`params_from_state(state, config, fmt)` reads from any mapping of key -> array (an in-memory state
dict, or a lazy reader over safetensors files that loads one tensor at a time). Before reading
any tensor it checks the full key set and every shape against `fluxjax.params.param_shapes`, and
raises naming the key on a missing key, an unexpected key or a wrong shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from conversion.transformer_keys import assemble, expected_source_shapes, leaf_name, rows_for, source_keys
from fluxjax.config import Flux2Config
from fluxjax.params import Flux2Params, param_shapes


class CheckpointError(ValueError):
    """A checkpoint that does not match what fluxjax expects; the message names file and key."""


def check_state(shapes: Mapping[str, tuple[int, ...]], config: Flux2Config, fmt: str, where: str = "checkpoint"):
    """Raise CheckpointError unless `shapes` (key -> shape) is exactly the key set of `config` in `fmt`."""
    expected = expected_source_shapes(config, fmt)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all) for a {fmt} "
                              f"checkpoint of this config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              f"it is not part of a {fmt} FLUX.2 transformer of this config")
    for k, want in expected.items():
        if tuple(shapes[k]) != want:
            raise CheckpointError(f"{where}: key {k!r} has shape {tuple(shapes[k])}, expected {want} for this config")


def params_from_state(state: Mapping, config: Flux2Config, fmt: str, dtype=None, where: str = "checkpoint",
                      shapes: Mapping[str, tuple[int, ...]] | None = None) -> Flux2Params:
    """Build numpy params from `state`; `dtype` None keeps the stored dtype."""
    check_state(shapes if shapes is not None else {k: np.shape(state[k]) for k in state}, config, fmt, where)
    rows = rows_for(config, fmt)
    template = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, sds in flat:
        name = leaf_name(path)
        row = rows[name]
        layers = [assemble(row, [np.asarray(state[k]) for k in keys]) for keys in source_keys(config, name, row)]
        leaf = layers[0] if len(layers) == 1 and sds.ndim == layers[0].ndim else np.stack(layers)
        if dtype is not None:
            leaf = leaf.astype(dtype)
        leaves.append(np.ascontiguousarray(leaf))
    return jax.tree_util.tree_unflatten(treedef, leaves)
