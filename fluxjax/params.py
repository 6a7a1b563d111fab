"""Parameters of the FLUX.2 transformer as immutable pytrees.

Field names follow Black Forest Labs' checkpoint keys (`img_attn.qkv`, `linear1`, ...). Two
exceptions, because a Python field cannot be called `0`: the SwiGLU Linears `X_mlp.0` and
`X_mlp.2` are `fc_in` and `fc_out`. Matrices are stored (in, out), the transpose of torch's
Linear weight. Block parameters are stacked on a leading layer axis, so the blocks run under
`lax.scan` and shard like any other array.

`param_shapes(config)` is the one declaration of every shape: `init_params`, `jax.eval_shape`
tests and the checkpoint converter's validation all read it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from fluxjax.config import Flux2Config
from fluxjax.init import init_tree


@struct.dataclass
class QKNorm:
    query_norm: jax.Array  # [K] (BFL `norm.query_norm.scale`)
    key_norm: jax.Array  # [K]


@struct.dataclass
class SelfAttention:
    qkv: jax.Array  # [D, 3D]: q, k, v, each head-major
    norm: QKNorm
    proj: jax.Array  # [D, D]


@struct.dataclass
class SwiGLU:
    fc_in: jax.Array  # [D, 2M] (BFL `X_mlp.0`): gate half first, then value half
    fc_out: jax.Array  # [M, D] (BFL `X_mlp.2`)


@struct.dataclass
class DoubleBlocks:
    """All double-stream blocks, every leaf with a leading [depth] axis."""

    img_attn: SelfAttention
    img_mlp: SwiGLU
    txt_attn: SelfAttention
    txt_mlp: SwiGLU


@struct.dataclass
class SingleBlocks:
    """All single-stream blocks, every leaf with a leading [depth_single_blocks] axis."""

    linear1: jax.Array  # [D, 3D + 2M]: q | k | v | MLP gate | MLP value
    linear2: jax.Array  # [D + M, D]: attention rows first, then MLP rows
    norm: QKNorm


@struct.dataclass
class MLPEmbedder:
    in_layer: jax.Array  # [256, D]
    out_layer: jax.Array  # [D, D]


@struct.dataclass
class Modulation:
    lin: jax.Array  # [D, 6D] (double) or [D, 3D] (single): (shift, scale, gate) per set


@struct.dataclass
class LastLayer:
    adaLN_modulation: jax.Array  # [D, 2D]: BFL order, shift columns then scale columns
    linear: jax.Array  # [D, out_channels]


@struct.dataclass
class Flux2Weights:
    img_in: jax.Array  # [in_channels, D]
    txt_in: jax.Array  # [C, D]
    time_in: MLPEmbedder
    guidance_in: MLPEmbedder | None  # None unless config.use_guidance_embed
    double_stream_modulation_img: Modulation
    double_stream_modulation_txt: Modulation
    single_stream_modulation: Modulation
    double_blocks: DoubleBlocks
    single_blocks: SingleBlocks
    final_layer: LastLayer


def param_shapes(config: Flux2Config, dtype=jnp.float32) -> Flux2Weights:
    """Every parameter's shape as a jax.ShapeDtypeStruct, in the params pytree structure."""
    D, M, K, C = config.hidden_size, config.mlp_hidden, config.head_dim, config.context_in_dim
    nd, ns = config.depth, config.depth_single_blocks

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def attn(n):
        return SelfAttention(qkv=s(n, D, 3 * D), norm=QKNorm(s(n, K), s(n, K)), proj=s(n, D, D))

    def mlp(n):
        return SwiGLU(fc_in=s(n, D, 2 * M), fc_out=s(n, M, D))

    def embedder():
        return MLPEmbedder(in_layer=s(config.timestep_channels, D), out_layer=s(D, D))

    return Flux2Weights(
        img_in=s(config.in_channels, D),
        txt_in=s(C, D),
        time_in=embedder(),
        guidance_in=embedder() if config.use_guidance_embed else None,
        double_stream_modulation_img=Modulation(s(D, 6 * D)),
        double_stream_modulation_txt=Modulation(s(D, 6 * D)),
        single_stream_modulation=Modulation(s(D, 3 * D)),
        double_blocks=DoubleBlocks(img_attn=attn(nd), img_mlp=mlp(nd), txt_attn=attn(nd), txt_mlp=mlp(nd)),
        single_blocks=SingleBlocks(
            linear1=s(ns, D, 3 * D + 2 * M), linear2=s(ns, D + M, D), norm=QKNorm(s(ns, K), s(ns, K))
        ),
        final_layer=LastLayer(adaLN_modulation=s(D, 2 * D), linear=s(D, config.output_channels)),
    )


def init_params(config: Flux2Config, key: jax.Array, dtype=jnp.float32, *, training: bool = False) -> Flux2Weights:
    """Random, well-conditioned parameters (`fluxjax.init`): matrices N(0, 1/fan_in), QK-norm weights
    1 + N(0, 0.1^2), every leaf cut from one normal draw, compiled as one program.

    Every path carries signal, so parity tests see every weight. training: QK-norm weights 1 and the
    modulations and final layer 0 (adaLN-zero). Works under `jax.eval_shape` (nothing is allocated).
    """
    return init_tree(param_shapes(config, dtype), key, training=training)


def count_params(params) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
