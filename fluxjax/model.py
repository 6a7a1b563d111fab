"""The FLUX.2 transformer forward: embed, modulations once, double blocks, join, single blocks,
final layer (spec section 3), with interventions as an argument and captures as return values.

Blocks run under `lax.scan` over stacked parameters: compile time does not grow with depth, and
intervention values indexed by block (knockout tables, capture slots) are scanned along. The
steps before and after the blocks are public functions (`scale_timestep`, `conditioning`,
`modulations`, `embed`, `positions`, `final_layer`), shared with the [klein] KV variant
(`fluxjax.kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fluxjax.blocks import double_block, single_block
from fluxjax.config import Flux2Config
from fluxjax.apply import (begin_captures, block_segments, layer_values, record_block, substitute,
                           substitute_leading)
from fluxjax.interventions import BLOCK0_INPUT, Capture, Captures, Interventions, validate
from fluxjax.numerics import linear, modulate, rope_tables, timestep_embedding
from fluxjax.params import Flux2Weights, MLPEmbedder


@struct.dataclass
class Modulations:
    """(shift, scale, gate) triples, each [B, 1, D] (or per token), shared by every block of a kind."""

    img: tuple  # two triples: attention, then MLP, of the double blocks' image stream
    txt: tuple  # two triples, text stream
    single: tuple  # one triple of the single blocks


def scale_timestep(x, dtype):
    """diffusers' `x.to(dtype) * 1000`: x rounded to the model dtype, times 1000, rounded again.

    The roundings are explicit (`reduce_precision` on float32 values) because under jit XLA may
    otherwise drop a float32 -> bf16 -> float32 round trip (excess precision), which moves a bf16
    timestep such as 0.9 from diffusers' 900 to 898.4.
    """
    f = jnp.finfo(dtype)

    def rounded(v):
        return jax.lax.reduce_precision(v, exponent_bits=f.nexp, mantissa_bits=f.nmant)

    return rounded(rounded(x.astype(jnp.float32)) * 1000)


def _embed_scalar(p: MLPEmbedder, s, dtype, channels: int):
    """diffusers `Flux2TimestepGuidanceEmbeddings`: s (already x1000, model dtype) -> [B, D]."""
    emb = timestep_embedding(s, channels).astype(dtype)
    return linear(jax.nn.silu(linear(emb, p.in_layer)), p.out_layer)


def conditioning(params: Flux2Weights, config: Flux2Config, s, guidance_s=None):
    """vec [B, D] from the timestep s [B] (and the guidance), both already `scale_timestep`ed.

    The guidance embedding is added only by models that have one (diffusers ignores it otherwise).
    """
    dtype = params.img_in.dtype
    vec = _embed_scalar(params.time_in, s, dtype, config.timestep_channels)
    if guidance_s is not None and params.guidance_in is not None:
        vec = vec + _embed_scalar(params.guidance_in, guidance_s, dtype, config.timestep_channels)
    return vec


def _triples(mod, sets: int) -> tuple:
    """[B, 3 sets D] -> `sets` (shift, scale, gate) triples of [B, 1, D], in checkpoint row order."""
    c = jnp.split(mod[:, None, :], 3 * sets, axis=-1)
    return tuple(tuple(c[3 * i:3 * i + 3]) for i in range(sets))


def modulations(params: Flux2Weights, vec) -> Modulations:
    """The three shared modulations of SiLU(vec), computed once per forward (spec 3.2)."""
    act = jax.nn.silu(vec)
    return Modulations(img=_triples(linear(act, params.double_stream_modulation_img.lin), 2),
                       txt=_triples(linear(act, params.double_stream_modulation_txt.lin), 2),
                       single=_triples(linear(act, params.single_stream_modulation.lin), 1)[0])


def embed(params: Flux2Weights, img, txt):
    """Input projections: image-stream tokens [B, N, in] -> [B, N, D], text [B, T, C] -> [B, T, D]."""
    dtype = params.img_in.dtype
    return linear(img.astype(dtype), params.img_in), linear(txt.astype(dtype), params.txt_in)


def batched_ids(ids):
    """Position ids [N, 4] or [B, N, 4] -> [B or 1, N, 4]."""
    ids = jnp.asarray(ids)
    return ids[None] if ids.ndim == 2 else ids


def positions(config: Flux2Config, txt_ids, img_ids):
    """RoPE (cos, sin) tables of the joint [text, image] sequence, each [B or 1, T + N, K]."""
    t_ids, i_ids = batched_ids(txt_ids), batched_ids(img_ids)
    batch = max(t_ids.shape[0], i_ids.shape[0])
    ids = jnp.concatenate([jnp.broadcast_to(t_ids, (batch, *t_ids.shape[1:])),
                           jnp.broadcast_to(i_ids, (batch, *i_ids.shape[1:]))], axis=1)
    return rope_tables(ids, config.axes_dim, config.theta)


def final_layer(params: Flux2Weights, vec, x):
    """The image tokens' output [B, N, out_channels]. BFL order (shift, scale); diffusers stores
    (scale, shift), swapped on conversion."""
    shift, scale = jnp.split(linear(jax.nn.silu(vec), params.final_layer.adaLN_modulation)[:, None, :], 2, axis=-1)
    return linear(modulate(x, shift, scale), params.final_layer.linear)


def forward(params: Flux2Weights, config: Flux2Config, img, txt, timestep, img_ids, txt_ids, guidance=None, *,
            interventions: Interventions | None = None, capture: Capture | None = None,
            attn_impl: str | None = None) -> tuple[jax.Array, Captures]:
    """FLUX.2 transformer forward with the semantics of diffusers' `Flux2Transformer2DModel.forward`.

    img: [B, N, in_channels], noisy-image tokens then reference tokens; txt: [B, T, C];
    timestep: [B] in [0, 1]; img_ids: int [N, 4] or [B, N, 4]; txt_ids: int [T, 4] or [B, T, 4];
    guidance: [B] or None (ignored by models without a guidance embedder, as in diffusers).
    interventions: see fluxjax.interventions; capture: static `Capture` spec.

    Returns (output [B, N', out_channels], Captures): N' = N, or N minus the reference tokens when
    they are dropped; the captures hold what `capture` asked for (None fields otherwise). jit with
    config, capture and attn_impl static.
    """
    iv, cap = interventions or Interventions(), capture or Capture()
    n_txt = txt.shape[1]
    validate(iv, cap, config, img.shape[0], n_txt, img.shape[1], params.img_in.dtype)
    dtype = params.img_in.dtype
    vec = conditioning(params, config, scale_timestep(timestep, dtype),
                       None if guidance is None else scale_timestep(guidance, dtype))
    mods = modulations(params, vec)
    x, c = embed(params, img, txt)
    rope = positions(config, txt_ids, img_ids)
    c = substitute(iv.substitutions, c, BLOCK0_INPUT)
    x = substitute_leading(iv.image_substitutions, x, BLOCK0_INPUT)
    captures = begin_captures(cap, c, x)
    z = None  # the joint [text, image] stream, from the first single block on

    for seg in block_segments(config, iv.drop_reference):
        if seg.drop_refs:  # the references are last: dropping them truncates the image stream
            n = iv.drop_reference.num_ref_tokens
            x, z = (x[:, :-n], None) if z is None else (None, z[:, :-n])
        values = layer_values(iv, cap, config, seg.start, seg.stop)
        if seg.double:
            x, c, captures = _double_blocks(params, seg, x, c, mods, rope, iv, values, captures, attn_impl)
        else:
            z = jnp.concatenate([c, x], axis=1) if z is None else z  # join, text first
            z, captures = _single_blocks(params, config, seg, z, n_txt, mods, rope, iv, values, captures, attn_impl)
    if z is None:  # a model without single blocks
        z = jnp.concatenate([c, x], axis=1)
    return final_layer(params, vec, z[:, n_txt:]), captures


def _rope(rope, length: int):
    return tuple(r[:, :length] for r in rope)


def _double_blocks(params, seg, x, c, mods, rope, iv, values, captures, attn_impl):
    """Double blocks [seg.start, seg.stop) under `lax.scan`; substitutions and captures at each output."""
    length = c.shape[1] + x.shape[1]
    blocks = jax.tree_util.tree_map(lambda a: a[seg.start:seg.stop], params.double_blocks)

    def body(carry, xs):
        x, c, captures = carry
        p, layer = xs
        x, c = double_block(p, x, c, mods.img, mods.txt, _rope(rope, length), layer.mask(iv.knockout, c.shape[1], length),
                            attn_impl)
        c = substitute(iv.substitutions, c, layer.index)
        x = substitute_leading(iv.image_substitutions, x, layer.index)
        return (x, c, record_block(captures, layer, c, x)), None

    (x, c, captures), _ = jax.lax.scan(body, (x, c, captures), (blocks, values))
    return x, c, captures


def _single_blocks(params, config, seg, z, n_txt, mods, rope, iv, values, captures, attn_impl):
    """Single blocks [seg.start, seg.stop) on the joint stream, as `_double_blocks`."""
    length, nd = z.shape[1], config.depth
    blocks = jax.tree_util.tree_map(lambda a: a[seg.start - nd:seg.stop - nd], params.single_blocks)

    def body(carry, xs):
        z, captures = carry
        p, layer = xs
        z = single_block(p, z, mods.single, _rope(rope, length), layer.mask(iv.knockout, n_txt, length), attn_impl)
        if iv.substitutions:
            z = z.at[:, :n_txt].set(substitute(iv.substitutions, z[:, :n_txt], layer.index))
        if iv.image_substitutions:
            z = z.at[:, n_txt:].set(substitute_leading(iv.image_substitutions, z[:, n_txt:], layer.index))
        return (z, record_block(captures, layer, z[:, :n_txt], z[:, n_txt:])), None

    (z, captures), _ = jax.lax.scan(body, (z, captures), (blocks, values))
    return z, captures
