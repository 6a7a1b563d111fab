"""The FLUX.2 transformer forward: embed, modulations once, double blocks, join, single blocks,
final layer (spec section 3), with interventions as an argument and captures as return values.

Blocks run under `lax.scan` over stacked parameters: compile time does not grow with depth, and
intervention values indexed by block (knockout matrices, substitution sites) are scanned along.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.blocks import double_block, single_block
from fluxjax.config import Flux2Config
from fluxjax.interventions import BLOCK0_INPUT, Capture, Captures, Interventions, validate
from fluxjax.numerics import linear, modulate, rope_tables, timestep_embedding
from fluxjax.params import Flux2Weights, MLPEmbedder


def _embed_scalar(p: MLPEmbedder, s, dtype, channels: int):
    """diffusers `Flux2TimestepGuidanceEmbeddings`: s (already x1000, model dtype) -> [B, D]."""
    emb = timestep_embedding(s, channels).astype(dtype)
    return linear(jax.nn.silu(linear(emb, p.in_layer)), p.out_layer)


def _scaled_in_model_dtype(x, dtype):
    """diffusers' `x.to(dtype) * 1000`: x rounded to the model dtype, times 1000, rounded again.

    The roundings are explicit (`reduce_precision` on float32 values) because under jit XLA may
    otherwise drop a float32 -> bf16 -> float32 round trip (excess precision), which moves a bf16
    timestep such as 0.9 from diffusers' 900 to 898.4.
    """
    f = jnp.finfo(dtype)

    def rounded(v):
        return jax.lax.reduce_precision(v, exponent_bits=f.nexp, mantissa_bits=f.nmant)

    return rounded(rounded(x.astype(jnp.float32)) * 1000)


def _chunks(mod, n: int):
    """[B, nD] -> n arrays [B, 1, D], in checkpoint row order."""
    return jnp.split(mod[:, None, :], n, axis=-1)


def _triples(mod, sets: int):
    c = _chunks(mod, 3 * sets)
    return tuple(tuple(c[3 * i:3 * i + 3]) for i in range(sets))


def _ids(ids):
    ids = jnp.asarray(ids)
    return ids[None] if ids.ndim == 2 else ids  # [N, 4] -> [1, N, 4]


def _slot_table(sites: tuple[int, ...], num_blocks: int) -> np.ndarray:
    """For each block, the capture slot its output goes to, or -1 where it is not captured."""
    slots = np.full(num_blocks, -1, np.int32)
    for j, s in enumerate(sites):
        if s >= 0:
            slots[s] = j
    return slots


def forward(params: Flux2Weights, config: Flux2Config, img, txt, timestep, img_ids, txt_ids, guidance=None, *,
            interventions: Interventions | None = None, capture: Capture | None = None,
            attn_impl: str | None = None):
    """FLUX.2 transformer forward with the semantics of diffusers' `Flux2Transformer2DModel.forward`.

    img: [B, N, in_channels], noisy-image tokens then reference tokens; txt: [B, T, C];
    timestep: [B] in [0, 1]; img_ids: int [N, 4] or [B, N, 4]; txt_ids: int [T, 4] or [B, T, 4];
    guidance: [B] or None (ignored by models without a guidance embedder, as in diffusers).
    interventions: see fluxjax.interventions; capture: static `Capture` spec.

    Returns [B, N', out_channels] (N' = N, or N minus the reference tokens when they are dropped),
    and, when `capture` is given, `(output, Captures)`. jit with config, capture and attn_impl static.
    """
    iv = interventions if interventions is not None else Interventions()
    cap = capture if capture is not None else Capture()
    n_txt, n_stream = txt.shape[1], img.shape[1]
    validate(iv, cap, config, img.shape[0], n_txt, n_stream)
    dtype = params.img_in.dtype
    nd, nb = config.depth, config.num_blocks

    # 1. Timestep (and guidance) embedding; diffusers casts t to the model dtype before x1000.
    vec = _embed_scalar(params.time_in, _scaled_in_model_dtype(timestep, dtype), dtype, config.timestep_channels)
    if guidance is not None and params.guidance_in is not None:
        vec = vec + _embed_scalar(params.guidance_in, _scaled_in_model_dtype(guidance, dtype), dtype,
                                  config.timestep_channels)
    act = jax.nn.silu(vec)
    mod_img = _triples(linear(act, params.double_stream_modulation_img.lin), 2)
    mod_txt = _triples(linear(act, params.double_stream_modulation_txt.lin), 2)
    mod_single = _triples(linear(act, params.single_stream_modulation.lin), 1)[0]

    # 2. Input projections and RoPE tables for the joint [text, image] sequence.
    x = linear(img.astype(dtype), params.img_in)
    c = linear(txt.astype(dtype), params.txt_in)
    t_ids, i_ids = _ids(txt_ids), _ids(img_ids)
    batch_ids = max(t_ids.shape[0], i_ids.shape[0])
    t_ids = jnp.broadcast_to(t_ids, (batch_ids, *t_ids.shape[1:]))
    i_ids = jnp.broadcast_to(i_ids, (batch_ids, *i_ids.shape[1:]))
    rope = rope_tables(jnp.concatenate([t_ids, i_ids], axis=1), config.axes_dim, config.theta)

    # 3. Interventions at the input of block 0.
    def substitute(h, layer):
        for sub in iv.substitutions:
            hit = (sub.site == layer) & sub.mask[..., None]
            h = jnp.where(hit, sub.value.astype(h.dtype) + sub.keep.astype(h.dtype) * h, h)
        return h

    c = substitute(c, BLOCK0_INPUT)
    keep = cap.image_tokens

    def image_part(h):
        return h if keep is None else h[:, :keep]

    text_buf = image_buf = None
    if cap.text:
        text_buf = jnp.zeros((len(cap.text), *c.shape), c.dtype)
    if cap.image:
        image_buf = jnp.zeros((len(cap.image), *image_part(x).shape), x.dtype)
    if BLOCK0_INPUT in cap.text:
        text_buf = text_buf.at[cap.text.index(BLOCK0_INPUT)].set(c)
    if BLOCK0_INPUT in cap.image:
        image_buf = image_buf.at[cap.image.index(BLOCK0_INPUT)].set(image_part(x))
    text_slots, image_slots = _slot_table(cap.text, nb), _slot_table(cap.image, nb)

    knock = iv.knockout
    drop = iv.drop_reference
    drop_at = drop.from_block if drop is not None else nb

    def attention_mask(layer_allowed, length):
        if layer_allowed is None:
            return None
        g = knock.groups[:, :length]  # [B, L]; the references are last, so dropping them truncates
        may_read = layer_allowed[g]  # [B, Lq, G]: the key groups each query may attend to
        key_group = g[:, :, None] == jnp.arange(layer_allowed.shape[-1])  # [B, Lk, G] one-hot
        # mask[b, q, k] = may_read[b, q, group(k)], as a fused compare-and-reduce rather than an
        # [L, L] gather (which XLA on CPU runs about 5 % slower than the attention it feeds).
        return jnp.any(may_read[:, :, None, :] & key_group[:, None, :, :], axis=-1)  # [B, Lq, Lk]

    def rope_for(length):
        return tuple(r[:, :length] for r in rope)

    def layer_xs(start, stop):
        """Per-layer scanned values for global blocks [start, stop)."""
        idx = np.arange(start, stop)
        allowed = None if knock is None else knock.allowed[start:stop]
        return idx, text_slots[idx], image_slots[idx], allowed

    def store(buf, slot, h):
        """Write h to capture slot `slot`; slot -1 (block not captured) rewrites slot 0 unchanged, so
        the buffers hold exactly the requested sites."""
        if buf is None:
            return None
        at = jnp.maximum(slot, 0)
        h = jnp.where(slot >= 0, h, jax.lax.dynamic_index_in_dim(buf, at, 0, keepdims=False))
        return jax.lax.dynamic_update_index_in_dim(buf, h, at, 0)

    # 4. Double blocks, in segments split where the references leave the sequence.
    def run_double(start, stop, x, c, text_buf, image_buf):
        if start >= stop:
            return x, c, text_buf, image_buf
        length = n_txt + x.shape[1]
        blocks = jax.tree_util.tree_map(lambda a: a[start:stop], params.double_blocks)

        def body(carry, xs):
            x, c, tb, ib = carry
            p, (layer, tslot, islot, allowed) = xs
            x, c = double_block(p, x, c, mod_img, mod_txt, rope_for(length), attention_mask(allowed, length), attn_impl)
            c = substitute(c, layer)
            return (x, c, store(tb, tslot, c), store(ib, islot, image_part(x))), None

        (x, c, text_buf, image_buf), _ = jax.lax.scan(body, (x, c, text_buf, image_buf),
                                                       (blocks, layer_xs(start, stop)))
        return x, c, text_buf, image_buf

    def run_single(start, stop, z, text_buf, image_buf):
        if start >= stop:
            return z, text_buf, image_buf
        length = z.shape[1]
        blocks = jax.tree_util.tree_map(lambda a: a[start - nd:stop - nd], params.single_blocks)

        def body(carry, xs):
            z, tb, ib = carry
            p, (layer, tslot, islot, allowed) = xs
            z = single_block(p, z, mod_single, rope_for(length), attention_mask(allowed, length), attn_impl)
            if iv.substitutions:
                z = z.at[:, :n_txt].set(substitute(z[:, :n_txt], layer))
            return (z, store(tb, tslot, z[:, :n_txt]), store(ib, islot, image_part(z[:, n_txt:]))), None

        (z, text_buf, image_buf), _ = jax.lax.scan(body, (z, text_buf, image_buf), (blocks, layer_xs(start, stop)))
        return z, text_buf, image_buf

    def without_refs(h):
        return h[:, :h.shape[1] - drop.num_ref_tokens]

    x, c, text_buf, image_buf = run_double(0, min(drop_at, nd), x, c, text_buf, image_buf)
    if drop is not None and drop_at <= nd:
        x = without_refs(x)
    x, c, text_buf, image_buf = run_double(min(drop_at, nd), nd, x, c, text_buf, image_buf)

    # 5. Join (text first) and single blocks.
    z = jnp.concatenate([c, x], axis=1)
    z, text_buf, image_buf = run_single(nd, max(drop_at, nd), z, text_buf, image_buf)
    if drop is not None and drop_at > nd:
        z = without_refs(z)
    z, text_buf, image_buf = run_single(max(drop_at, nd), nb, z, text_buf, image_buf)

    # 6. Final layer: BFL order (shift, scale); diffusers stores (scale, shift), swapped on conversion.
    shift, scale = _chunks(linear(act, params.final_layer.adaLN_modulation), 2)
    out = linear(modulate(z[:, n_txt:], shift, scale), params.final_layer.linear)
    if capture is None:
        return out
    return out, Captures(text=text_buf, image=image_buf)
