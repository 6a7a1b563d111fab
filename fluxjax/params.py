"""Parameters of the FLUX.2 transformer as immutable pytrees.

Field names follow Black Forest Labs' checkpoint keys (`img_attn.qkv`, `linear1`, ...). Two
exceptions, because a Python field cannot be called `0`: the SwiGLU Linears `X_mlp.0` and
`X_mlp.2` are `fc_in` and `fc_out`. Matrices are stored (in, out), the transpose of torch's
Linear weight. Block parameters are stacked on a leading layer axis, so the blocks run under
`lax.scan` and shard like any other array.

`param_infos(config)` declares each parameter's facts once, beside its shape (`ParamInfo`, after
jax-llm-examples' `ArrayInfo`): its logical axes and how it starts. Everything else is derived:
`param_shapes` (read by `jax.eval_shape` tests, checkpoints and the converter's validation),
`init_params` (the draw of each leaf) and `fluxjax.sharding` (which axis the fsdp mesh axis splits).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from fluxjax.config import FLUX2_DEV, Flux2Config
from fluxjax.init import NORM_SCALE, ONES, ZEROS, Draw, init_tree, matrix
from fluxjax.trees import named_leaves

# Logical axes, one per dimension of a parameter.
LAYERS = "layers"  # the stacked blocks of a kind: scanned, never split
IN, OUT = "in", "out"  # a matrix's axes, stored (in, out): fan-in for the init, fsdp splits `out`, else `in`
HEAD_DIM = "head_dim"  # a QK-norm scale [K]: a few KiB per layer, replicated

# How a parameter starts (`ParamInfo.draw`).
MATRIX = "matrix"  # N(0, 1/fan_in): unit-variance outputs for unit-variance inputs
NORM = "norm_scale"  # 1 + N(0, 0.1^2): every scale carries signal, so parity tests see it; 1 for training
ADALN_ZERO = "adaln_zero"  # a matrix, zero when training starts (the modulations and the final layer:
#                            DiT's adaLN-zero, every block starts as the identity and the prediction at 0)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter's facts: its shape, the logical axis of each dimension, and how it starts."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = MATRIX

    def draw(self, training: bool = False) -> Draw:
        """The leaf's initial value (`fluxjax.init.Draw`); training: the start of training."""
        if self.init == NORM:
            return ONES if training else NORM_SCALE
        if self.init == ADALN_ZERO and training:
            return ZEROS
        return matrix(self.shape[self.axes.index(IN)])

    def struct(self, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, dtype)


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


def param_infos(config: Flux2Config) -> Flux2Weights:
    """Every parameter's `ParamInfo`, in the params pytree structure: the one declaration."""
    D, M, K, C = config.hidden_size, config.mlp_hidden, config.head_dim, config.context_in_dim
    nd, ns = config.depth, config.depth_single_blocks

    def mat(n_in, n_out, init=MATRIX):
        return ParamInfo((n_in, n_out), (IN, OUT), init)

    def stacked(n, n_in, n_out):  # one matrix per block, on a leading layer axis
        return ParamInfo((n, n_in, n_out), (LAYERS, IN, OUT))

    def qk_norm(n):
        return QKNorm(*(ParamInfo((n, K), (LAYERS, HEAD_DIM), NORM) for _ in range(2)))

    def attn(n):
        return SelfAttention(qkv=stacked(n, D, 3 * D), norm=qk_norm(n), proj=stacked(n, D, D))

    def mlp(n):
        return SwiGLU(fc_in=stacked(n, D, 2 * M), fc_out=stacked(n, M, D))

    def embedder():
        return MLPEmbedder(in_layer=mat(config.timestep_channels, D), out_layer=mat(D, D))

    return Flux2Weights(
        img_in=mat(config.in_channels, D),
        txt_in=mat(C, D),
        time_in=embedder(),
        guidance_in=embedder() if config.use_guidance_embed else None,
        double_stream_modulation_img=Modulation(mat(D, 6 * D, ADALN_ZERO)),
        double_stream_modulation_txt=Modulation(mat(D, 6 * D, ADALN_ZERO)),
        single_stream_modulation=Modulation(mat(D, 3 * D, ADALN_ZERO)),
        double_blocks=DoubleBlocks(img_attn=attn(nd), img_mlp=mlp(nd), txt_attn=attn(nd), txt_mlp=mlp(nd)),
        single_blocks=SingleBlocks(linear1=stacked(ns, D, 3 * D + 2 * M), linear2=stacked(ns, D + M, D),
                                   norm=qk_norm(ns)),
        final_layer=LastLayer(adaLN_modulation=mat(D, 2 * D, ADALN_ZERO),
                              linear=mat(D, config.output_channels, ADALN_ZERO)),
    )


def param_shapes(config: Flux2Config, dtype=jnp.float32) -> Flux2Weights:
    """Every parameter's shape as a jax.ShapeDtypeStruct, in the params pytree structure."""
    return jax.tree_util.tree_map(lambda info: info.struct(dtype), param_infos(config))  # a ParamInfo is a leaf


@functools.cache
def leaf_axes() -> dict[str, tuple[str, ...]]:
    """Leaf name -> logical axes. The axes do not depend on the sizes, so the full architecture
    (FLUX.2 [dev], which has every leaf, the guidance embedder included) declares them for all."""
    return {name: info.axes for name, info in named_leaves(param_infos(FLUX2_DEV))}


def init_params(config: Flux2Config, key: jax.Array, dtype=jnp.float32, *, training: bool = False) -> Flux2Weights:
    """Random, well-conditioned parameters, each drawn as its `ParamInfo` says: matrices
    N(0, 1/fan_in), QK-norm weights 1 + N(0, 0.1^2), every leaf cut from one normal draw
    (`fluxjax.init`), compiled as one program.

    Every path carries signal, so parity tests see every weight. training: QK-norm weights 1 and the
    modulations and final layer 0 (adaLN-zero). Works under `jax.eval_shape` (nothing is allocated).
    """
    infos = dict(named_leaves(param_infos(config)))
    return init_tree(param_shapes(config, dtype), key, rule=lambda name, shape: infos[name].draw(training))


def count_params(params) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
