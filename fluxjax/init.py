"""Random initial parameters: one rule for every leaf, every leaf cut from one flat normal draw.

The rule (`leaf_draw`) reads a leaf's name and shape:

    matrices, conv kernels   N(0, 1/fan_in); fan_in is the `in` axis of an (in, out) matrix (leading
                             axes stack layers) or kh * kw * in of an HWIO kernel
    norm scales              1 + N(0, 0.1^2) (QK-norm `query_norm` / `key_norm`, GroupNorm `weight`):
                             every scale carries signal, so parity tests see it; 1 exactly for training
    embeddings               N(0, 1) (`embed`, `position`)
    biases                   N(0, 0.1^2);  bn `running_mean` N(0, 0.5^2), `running_var` 0.5 + |N(0, 1)|
    modulations, final layer 0 for training (the DiT adaLN-zero convention: each block starts as the
                             identity and the first prediction is 0); drawn like any matrix otherwise

A leaf is offset + scale * z (`Draw`), and constant leaves (scale 0) take nothing from the draw.
`init_tree` cuts the leaves, in the tree's flattening order, from one flat standard-normal vector
of their summed size. The draw is JAX's (a key: one compiled draw; under `jit` or
`jax.eval_shape` the cutting is traced into the same program, and nothing is allocated) or a
numpy Generator's (float64 on the host, cast per leaf: the same numbers on any JAX version;
sequential numpy draws equal one flat draw, so a tree's init is the same whether drawn leaf by
leaf or at once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.trees import leaf_name

# Zero at the start of training: every modulation and the final layer (adaLN-zero).
ZERO_AT_INIT = frozenset({"double_stream_modulation_img", "double_stream_modulation_txt",
                          "single_stream_modulation", "final_layer"})
NORM_SCALES = frozenset({"query_norm", "key_norm", "weight"})
EMBEDDINGS = frozenset({"embed", "position"})


@dataclasses.dataclass(frozen=True)
class Draw:
    """A leaf's initial value: offset + scale * z, z standard normal (|z| if `magnitude`); scale 0
    gives the constant `offset` and takes nothing from the draw."""

    offset: float = 0.0
    scale: float = 1.0
    magnitude: bool = False


ZEROS = Draw(0.0, 0.0)
ONES = Draw(1.0, 0.0)
NORM_SCALE = Draw(1.0, 0.1)


def matrix(fan_in: int) -> Draw:
    """N(0, 1/fan_in): unit-variance outputs for unit-variance inputs."""
    return Draw(0.0, 1.0 / math.sqrt(fan_in))


def leaf_draw(name: str, shape: tuple[int, ...], training: bool = False) -> Draw:
    """The rule (module docstring) for the leaf `name` (dotted, `fluxjax.trees.leaf_name`) of `shape`."""
    parts = name.split(".")
    field = parts[-1]
    if field in NORM_SCALES:
        return ONES if training else NORM_SCALE
    if training and ZERO_AT_INIT.intersection(parts):
        return ZEROS
    if field in EMBEDDINGS:
        return Draw(0.0, 1.0)
    if field == "bias":
        return Draw(0.0, 0.1)
    if field == "running_mean":
        return Draw(0.0, 0.5)
    if field == "running_var":
        return Draw(0.5, 1.0, magnitude=True)
    return matrix(math.prod(shape[:-1]) if field == "kernel" else shape[-2])


Rule = Callable[[str, tuple[int, ...]], Draw]


def init_tree(shapes, source: jax.Array | np.random.Generator, *, training: bool = False, rule: Rule | None = None):
    """The leaves of `shapes` (a pytree of ShapeDtypeStructs) drawn by `rule` (default: `leaf_draw`
    with `training`) from one flat standard-normal vector.

    source: a JAX key (jax arrays: one compiled draw, cut on the host when called eagerly, traced
    into the caller's program under `jit` or `jax.eval_shape`) or a numpy Generator (numpy arrays,
    drawn in float64 on the host).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rule = rule or functools.partial(leaf_draw, training=training)
    specs = tuple((tuple(s.shape), np.dtype(s.dtype), rule(leaf_name(p), tuple(s.shape))) for p, s in leaves)
    if isinstance(source, np.random.Generator):
        return jax.tree_util.tree_unflatten(treedef, _cut(np, source.standard_normal(_drawn_size(specs)), specs))
    flat = _normal(source, _drawn_size(specs))
    if isinstance(flat, jax.core.Tracer):  # under jit / eval_shape: the cutting is part of the program
        return jax.tree_util.tree_unflatten(treedef, _cut(jnp, flat, specs))
    # Called eagerly, the cutting runs on the host: compiled, a program with hundreds of slices
    # (the VAE's 250 leaves) takes seconds to build, longer than the draw.
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in _cut(np, np.asarray(flat), specs)])


def _drawn_size(specs) -> int:
    return sum(math.prod(shape) for shape, _, d in specs if d.scale != 0)


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, size: int):
    return jax.random.normal(key, (size,), jnp.float32)


def _cut(xp, flat, specs) -> list:
    out, start = [], 0
    for shape, dtype, d in specs:
        if d.scale == 0:
            out.append(xp.full(shape, d.offset, dtype))
            continue
        size = math.prod(shape)
        z = flat[start:start + size].reshape(shape)
        start += size
        value = (xp.abs(z) if d.magnitude else z) * d.scale
        if d.offset:
            value = value + d.offset
        out.append(value.astype(dtype))
    return out
