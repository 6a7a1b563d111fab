"""Strict conversion of a FLUX.2 transformer state (diffusers or BFL keys) into fluxjax params.

`params_from_state(state, config, fmt)` reads from any mapping of key -> array (an in-memory state
dict, or a lazy reader over safetensors files that loads one tensor at a time). Before reading
any tensor it checks the full key set and every shape against `fluxjax.params.param_shapes`, and
raises naming the key on a missing key, an unexpected key or a wrong shape. Each leaf is then
assembled in place, one layer at a time, into a preallocated array; `leaves_from_state` builds
them one by one, so a conversion streams them to disk instead of holding the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.conversion.safetensors_io import check_keys
from fluxjax.conversion.transformer_keys import assemble, expected_source_shapes, num_layers, rows_for, source_keys
from fluxjax.checkpoint import CheckpointError
from fluxjax.config import Flux2Config
from fluxjax.params import Flux2Weights, param_shapes
from fluxjax.trees import leaf_name

__all__ = ["CheckpointError", "check_state", "leaves_from_state", "params_from_state"]


def check_state(shapes: Mapping[str, tuple[int, ...]], config: Flux2Config, fmt: str, where: str = "checkpoint"):
    """Raise CheckpointError unless `shapes` (key -> shape) is exactly the key set of `config` in `fmt`."""
    check_keys(shapes, expected_source_shapes(config, fmt), f"{fmt} FLUX.2 transformer", where)


def _source_dtypes(state: Mapping, where: str) -> dict[str, np.dtype]:
    dtypes = getattr(state, "dtypes", None)
    if dtypes is None:
        dtypes = {k: np.asarray(v).dtype for k, v in state.items()}
    for k, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):  # numpy alone does not count bfloat16
            raise CheckpointError(f"{where}: key {k!r} has dtype {dt}; FLUX.2 weights are floating point")
    return dtypes


def leaves_from_state(state: Mapping, config: Flux2Config, fmt: str, dtype=None, where: str = "checkpoint",
                      shapes: Mapping[str, tuple[int, ...]] | None = None, progress=None):
    """Yield (leaf name, numpy array) in params order, each leaf built only when asked for.

    dtype: None keeps the stored dtype (the widest one if the tensors differ).
    shapes: key -> shape without reading tensors (default: `state.shapes` of a lazy reader, else
        the arrays' shapes). progress: anything with `update(n)`, told the source bytes consumed.
    """
    if shapes is None:
        shapes = getattr(state, "shapes", None)
    if shapes is None:
        shapes = {k: np.shape(v) for k, v in state.items()}
    check_state(shapes, config, fmt, where)
    dtypes = _source_dtypes(state, where)
    out_dtype = np.dtype(dtype) if dtype is not None else np.result_type(*dtypes.values())
    rows = rows_for(config, fmt)
    for path, sds in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
        name = leaf_name(path)
        row = rows[name]
        leaf = np.empty(sds.shape, out_dtype)
        stacked = num_layers(config, name) is not None
        for i, keys in enumerate(source_keys(config, name, row)):
            tensors = [state[k] for k in keys]
            (leaf[i] if stacked else leaf)[...] = assemble(row, tensors)  # transposes and casts in place
            if progress is not None:
                progress.update(sum(t.nbytes for t in tensors))
            del tensors
        yield name, leaf
        del leaf  # before the next leaf is allocated


def params_from_state(state: Mapping, config: Flux2Config, fmt: str, dtype=None, where: str = "checkpoint",
                      shapes: Mapping[str, tuple[int, ...]] | None = None, progress=None) -> Flux2Weights:
    """All of `leaves_from_state` as a Flux2Weights of numpy arrays (small models, tests)."""
    leaves = [leaf for _, leaf in leaves_from_state(state, config, fmt, dtype, where, shapes, progress)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(param_shapes(config)), leaves)
