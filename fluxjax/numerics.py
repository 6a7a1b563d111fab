"""The numerics of FLUX.2: norms, RoPE, attention, timestep embedding, SwiGLU.

Axis vocabulary, used in einsum strings and shape comments across the package:

    B  batch                      L  sequence (joint [text, image, references] unless said)
    T  text tokens                N  image-stream tokens (noisy image, then references)
    H  attention heads            K  head dim (128 in every released model)
    D  model width                M  SwiGLU hidden width (3D)
    C  text feature width         F  RoPE frequencies of one axis
    S  steps                      G  token groups of a layout (see fluxjax.layout)

Every float32 island below names the reference behaviour it reproduces (diffusers'
`transformer_flux2.py` and `embeddings.py`, torch 2.13 CPU). Matrices are stored (in, out).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.options import DEFAULT, RuntimeOptions, runtime_options

LN_EPS = 1e-6  # every LayerNorm and QK RMSNorm in FLUX.2
ROPE_TABLE_SIZE = 8192  # positions 0..8191 on every axis: 131k px per side, 8192 text tokens


def linear(x, w):
    """x @ w with w stored (in, out); no bias anywhere in FLUX.2."""
    return jnp.einsum("...i,io->...o", x, w)


def layer_norm(x, eps: float = LN_EPS):
    """LayerNorm without affine parameters.

    torch computes LayerNorm in float32 internally and returns the input dtype; so do we.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x, weight, eps: float = LN_EPS):
    """QK RMSNorm over the head dim with a learned weight.

    Mirrors torch.nn.RMSNorm on CPU (torch 2.13): normalise and scale in float32, round once to
    the input dtype. BFL rounds twice (before and after the weight); see spec section 10.
    """
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * inv * weight.astype(jnp.float32)).astype(x.dtype)


def modulate(x, shift, scale):
    """AdaLN: (1 + scale) * LN(x) + shift, in the activation dtype as in diffusers."""
    return (1 + scale) * layer_norm(x) + shift


def swiglu(u):
    """SiLU on the first half (the gate), times the second half (the value)."""
    gate, value = jnp.split(u, 2, axis=-1)
    return jax.nn.silu(gate) * value


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features of t (already multiplied by 1000), cos first.

    diffusers `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`: the
    frequencies and the arguments t * freq are float32 whatever the model dtype, and the result is
    cast back by the caller. Arguments reach 1000 rad (4000 for guidance 4), where float32
    resolution is ~6e-5: that is the parity floor for t > 0.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.exp(jnp.asarray(exponent, dtype=jnp.float32))  # [F]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, F]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=16)
def _rope_table(axis_dim: int, theta: float, size: int):
    """cos and sin of p * w_j for integer positions p in [0, size), float64 rounded to float32.

    diffusers computes RoPE angles in float64 (`get_1d_rotary_pos_embed(freqs_dtype=float64)`)
    and casts cos/sin to float32. Positions are integers, so a float64 table looked up by position
    reproduces that exactly without enabling x64 in JAX.
    """
    freqs = 1.0 / (float(theta) ** (np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim))  # [F]
    angles = np.outer(np.arange(size, dtype=np.float64), freqs)  # [P, F]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_tables(ids, axes_dim: tuple[int, ...], theta: float):
    """Interleaved RoPE tables for integer position ids.

    ids: [..., L, 4] integer (T, H, W, L) positions. Returns (cos, sin), each [..., L, K] float32,
    every frequency repeated twice (pairs (2j, 2j+1) share an angle). Positions outside
    [0, ROPE_TABLE_SIZE) give NaN, never a silently wrong angle.
    """
    cos_parts, sin_parts = [], []
    for axis, axis_dim in enumerate(axes_dim):
        cos_t, sin_t = _rope_table(axis_dim, float(theta), ROPE_TABLE_SIZE)
        pos = ids[..., axis].astype(jnp.int32)
        cos_parts.append(jnp.take(jnp.asarray(cos_t), pos, axis=0, mode="fill", fill_value=jnp.nan))
        sin_parts.append(jnp.take(jnp.asarray(sin_t), pos, axis=0, mode="fill", fill_value=jnp.nan))
    cos = jnp.repeat(jnp.concatenate(cos_parts, axis=-1), 2, axis=-1)
    sin = jnp.repeat(jnp.concatenate(sin_parts, axis=-1), 2, axis=-1)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs: out[2j] = x[2j] cos - x[2j+1] sin, out[2j+1] = x[2j] sin + x[2j+1] cos.

    x: [B, L, H, K]; cos, sin: [B or 1, L, K]. In float32, cast back (diffusers `apply_rotary_emb`).
    """
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


# --- attention ---------------------------------------------------------------------------------
#
# One function, `attention`, is the only place softmax attention happens. It takes either nothing,
# a dense boolean mask [B, Lq, Lk] (or per head [B, H, Lq, Lk]), or `KeyGroups`: a knockout table
# over token groups (shared by the heads or one per head) applied without any [Lq, Lk] array. With key groups the keys are cut into contiguous segments (text,
# image stream, or finer: see `KeyGroups`); a kernel attends to each segment and returns its
# normalised output and log-sum-exp, and the partial results are merged with weights
# exp(lse_s - lse) where lse = log sum_s exp(lse_s), a segment a query may not read entering with
# lse_s = -inf (weight 0). This is exact: softmax over a union of disjoint key sets is the
# LSE-weighted mixture of the softmaxes over each set (FlashAttention-2's rescaling, section 3.1).

ATTENTION_QUERY_BLOCK = DEFAULT.query_block  # queries per tile of the blocked kernel (RuntimeOptions)
PALLAS_BLOCK = DEFAULT.pallas_block  # query and key tile of the Pallas kernel (RuntimeOptions)
_MASKED = -1e30  # the Pallas kernel's masked logit: finite, so exp(masked - masked) is never NaN


@struct.dataclass
class KeyGroups:
    """A knockout table over token groups, as `attention` applies it (no [Lq, Lk] mask).

    allowed[gq, gk]: queries of group gq may attend to keys of group gk (one block's table; a value,
    so changing it never retraces); allowed[h, gq, gk] gives each head its own table. groups: int32
    [B or 1, Lq], every query's group; key_groups: int32 [B or 1, Lk], every key's group, or None
    when the keys are the queries' own sequence (keys from a cache are not). segments (static):
    ((start, stop, key_groups), ...), the
    contiguous key ranges that tile [0, Lk) in order, each with the groups its keys can belong to.
    A range of one group (the image, one reference) is read or skipped whole by every query: the
    table enters only through its LSE weight. A range of several groups (the text span, where
    content and padding positions interleave per sample) is attended with the per-key mask
    may_read[b, q, group(b, k)], which the kernels build tile by tile from the table row of each
    query and a [B, S, m] one-hot of the keys' groups: [Lq, S] at most, never [L, L] unless a
    single segment covers everything. A per-head table adds a head axis to each query's row
    ([B, Lq, H, m]), never to the keys.
    """

    allowed: jax.Array  # bool [G, G], or [H, G, G] per head
    groups: jax.Array  # int32 [B or 1, Lq]
    segments: tuple[tuple[int, int, tuple[int, ...]], ...] = struct.field(pytree_node=False)
    key_groups: jax.Array | None = None  # int32 [B or 1, Lk]; None: the keys are `groups`' tokens
    # float [G, G] or [H, G, G] (one table per head), or None: edge gates (`gated_attention`)
    gate: jax.Array | None = None
    # static: the gates' gradient with each query's softmax change taken exactly (`gated_attention`)
    softmax_fix: bool = struct.field(pytree_node=False, default=False)

    @property
    def keys(self):
        """int32 [B or 1, Lk]: every key's group."""
        return self.groups if self.key_groups is None else self.key_groups

    def may_read(self):
        """bool [B or 1, Lq, G] (per head [B or 1, Lq, H, G]): the key groups each query may read."""
        if self.allowed.ndim == 2:
            return self.allowed[self.groups]
        return jnp.moveaxis(self.allowed[:, self.groups], 0, 2)

    def dense_mask(self):
        """bool [B, Lq, Lk] (per head [B, H, Lq, Lk]): mask[b, (h,) q, k] = allowed[(h,) group(b, q),
        group(b, k)], the reference form."""
        G = self.allowed.shape[-1]
        key_group = self.keys[:, :, None] == jnp.arange(G)  # [B, Lk, G] one-hot
        may_read = self.may_read()
        # a fused compare-and-reduce rather than an [L, L] gather (which XLA on CPU runs slowly)
        if self.allowed.ndim == 2:
            return jnp.any(may_read[:, :, None, :] & key_group[:, None, :, :], axis=-1)
        return jnp.any(may_read[:, :, :, None, :] & key_group[:, None, None, :, :], axis=-1).swapaxes(1, 2)

    def whole(self) -> "KeyGroups":
        """The same table over one segment spanning every key (its mask still built per query tile):
        the CPU's form, where one blocked pass is faster than a pass per segment."""
        key_groups = tuple(sorted({g for _, _, gs in self.segments for g in gs}))
        return self.replace(segments=((0, self.segments[-1][1], key_groups),))

    def check(self, num_queries: int, length: int):
        """Raise if the keys need key_groups and have none, or if the segments do not tile the `length`
        keys [0, length) in order, each with at least one group."""
        if self.key_groups is None and length != num_queries:
            raise ValueError(f"KeyGroups without key_groups needs queries and keys from one sequence; got "
                             f"{num_queries} queries and {length} keys (give key_groups, every key's group, for "
                             "keys from elsewhere)")
        at = 0
        for start, stop, key_groups in self.segments:
            if start != at or stop <= start or not key_groups:
                raise ValueError(f"key segments {self.segments} must tile [0, {length}) in order, each non-empty "
                                 "with at least one key group; build them with fluxjax.layout.key_segments")
            at = stop
        if at != length:
            raise ValueError(f"key segments {self.segments} end at {at}, but the sequence has {length} keys")


def _unnormalised_softmax(logits, mask):
    """exp(logits - row max) and the row sums, float32, masked entries at zero.

    Attention divides by the sums after the value contraction, as torch's fused CPU kernel (SDPA's
    flash path) does: the [Q, K] result is divided once instead of the [Q, L] probabilities.
    Equal to softmax-then-contract up to float rounding, with one pass over the logits fewer.
    """
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return p, jnp.sum(p, axis=-1)


def _with_heads(mask):
    """A dense mask [B, Lq, Lk] (shared by the heads) or [B, H, Lq, Lk] as [B, 1 or H, Lq, Lk]."""
    return mask[:, None] if mask.ndim == 3 else mask


def _dense_attention(q, k, v, mask):
    """All heads and queries at once: the [B, H, Lq, Lk] float32 logits exist in full."""
    logits = jnp.einsum("bqhk,blhk->bhql", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    p, denom = _unnormalised_softmax(logits, None if mask is None else _with_heads(mask))  # [B, H, Q, L], [B, H, Q]
    o = jnp.einsum("bhql,blhk->bqhk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / jnp.swapaxes(denom, 1, 2)[..., None]).astype(v.dtype)


def _heads_and_query_blocks(q, k, v, per_query, query_side, block: int = ATTENTION_QUERY_BLOCK, head_side=()):
    """Run per_query(q_i [B, Q, K], kt_h [B, K, S], v_h [B, S, K], *extras_i) one head at a time and,
    within a head, one block of queries at a time (nested `lax.map`), so the [B, H, Lq, S] logits
    never exist at once. query_side: arrays [B, Lq, ...] blocked with the queries (padded with True,
    or -1, every bit set: a padding query reads every key); head_side: arrays [B, Lq, H, ...], one
    slice per head, blocked the same way and passed after them. per_query returns arrays
    [B, Q, ...]; they come back as [B, Lq, H, ...].

    K is transposed once, outside the loops, so every dot in the loop is a plain [Q, K] x [K, S]
    and [Q, S] x [S, K] product on contiguous slices. The batch axis stays a batch axis of the
    dots, so a batch sharded over a device mesh stays sharded.
    """
    B, Lq, H, K = q.shape
    n = -(-Lq // block) if Lq > block else 1
    block = -(-Lq // n)
    pad = n * block - Lq

    def blocks(a, fill):  # [B, Lq, ...] -> [n, B, Q, ...]
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
        return a.reshape(B, n, block, *a.shape[2:]).swapaxes(0, 1)

    def fill(a):  # padded queries see all keys
        return True if a.dtype == jnp.bool_ else -1

    qb = blocks(q, 0).transpose(3, 0, 1, 2, 4)  # [H, n, B, Q, K]
    extras = tuple(blocks(a, fill(a)) for a in query_side)
    per_head = tuple(jnp.moveaxis(blocks(a, fill(a)), 3, 0) for a in head_side)  # [H, n, B, Q, ...]
    kt = k.transpose(2, 0, 3, 1)  # [H, B, K, S]
    vh = v.transpose(2, 0, 1, 3)  # [H, B, S, K]

    def head(xs):
        q_h, kt_h, v_h, *own = xs  # [n, B, Q, K], [B, K, S], [B, S, K], each [n, B, Q, ...]
        return jax.lax.map(lambda ys: per_query(ys[0], kt_h, v_h, *ys[1:]), (q_h, *extras, *own))

    out = jax.lax.map(head, (qb, kt, vh, *per_head))  # each [H, n, B, Q, ...]
    return jax.tree_util.tree_map(
        lambda o: o.transpose(2, 1, 3, 0, *range(4, o.ndim)).reshape(B, n * block, H, *o.shape[4:])[:, :Lq], out)


def _blocked_attention(q, k, v, mask, block: int = ATTENTION_QUERY_BLOCK):
    """The computation of `_dense_attention` one (head, query block) at a time: every query row
    sees the same float32 logits, softmax and normalisation; results differ only by float rounding
    (dot kernels of different shapes sum in different orders). On CPU this makes attention run at
    matmul speed: the dense form streams the whole logits tensor through memory several times and
    runs both contractions as slow batched dots.
    """
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5

    def per_query(q_i, kt_h, v_h, *mask_i):  # [B, Q, K], [B, K, L], [B, L, K], [B, Q, L]?
        logits = jnp.einsum("bqk,bkl->bql", q_i, kt_h, preferred_element_type=jnp.float32) * scale
        p, denom = _unnormalised_softmax(logits, mask_i[0] if mask_i else None)
        o = jnp.einsum("bql,blk->bqk", p.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
        return (o / denom[..., None]).astype(v_h.dtype)

    if mask is not None and mask.ndim == 4:  # per head [B, H, Lq, Lk]: each head reads its own slice
        return _heads_and_query_blocks(q, k, v, per_query, (), block, head_side=(mask.swapaxes(1, 2),))
    return _heads_and_query_blocks(q, k, v, per_query, () if mask is None else (mask,), block)


# --- partial attention over one key segment: (normalised output, log-sum-exp) ----------------------
#
# Each kernel below takes q [B, Lq, H, K], the segment's k, v [B, S, H, K] and either nothing (every
# query reads every key of the segment) or (reads, key_onehot): reads bool [B, Lq, m], which of the
# segment's m key groups each query may read, and key_onehot bool [B, S, m], the group of each key;
# query q may read key s iff any_j reads[q, j] & key_onehot[s, j]; with a per-head table reads is
# [B, Lq, H, m], one row per head. It returns o float32
# [B, Lq, H, K] normalised over the keys the query read, and lse float32 [B, Lq, H], the
# log-sum-exp of those scaled logits (-inf, or below -1e29 for Pallas, where the query read none).


def _may_read(reads, key_onehot):
    """bool [B, Q, S] from reads [B, Q, m] and key_onehot [B, S, m] (m is a handful)."""
    return jnp.any(reads[:, :, None, :] & key_onehot[:, None, :, :], axis=-1)


def _head_mask(group_mask):
    """bool [B, 1 or H, Q, S]: the mask of (reads, key_onehot), reads shared [B, Q, m] or per head
    [B, Q, H, m]."""
    reads, key_onehot = group_mask
    if reads.ndim == 3:
        return _may_read(reads, key_onehot)[:, None]
    return jnp.any(reads[:, :, :, None, :] & key_onehot[:, None, None, :, :], axis=-1).swapaxes(1, 2)


def _lse_and_normalised(p_v, denom, row_max):
    """o = p_v / denom and lse = row_max + log(denom), with rows that read no key at lse -inf and o 0.

    The empty rows divide by 1 and take log(1) inside the `where`, so reverse mode sees no 0 / 0
    there (a NaN in an unselected branch of `where` still poisons its gradient)."""
    read = denom > 0
    safe = jnp.where(read, denom, 1.0)
    lse = jnp.where(read, jnp.where(jnp.isfinite(row_max), row_max, 0.0) + jnp.log(safe), -jnp.inf)
    return p_v / safe[..., None], lse


def _partial_dense(q, k, v, group_mask=None):
    """All heads and queries at once ([B, H, Lq, S] float32 logits): the reference of the kernels."""
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if group_mask is not None:
        logits = jnp.where(_head_mask(group_mask), logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None])
    p_v = jnp.einsum("bhqs,bshk->bhqk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o, lse = _lse_and_normalised(p_v, jnp.sum(p, axis=-1), row_max)
    return o.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)


def _partial_blocked(q, k, v, group_mask=None, block: int = ATTENTION_QUERY_BLOCK):
    """`_partial_dense` one (head, query block) at a time (CPU): the mask of a multi-group segment is
    built per query block from the table rows, in cache, and never exists for all queries."""
    scale = q.shape[-1] ** -0.5
    query_side = head_side = ()
    if group_mask is not None:  # each query's readable groups and each key's group as bit sets
        reads, key_onehot = group_mask
        if reads.shape[-1] > 31:
            raise ValueError(f"the blocked kernel takes at most 31 key groups in a segment, got {reads.shape[-1]}")
        bit = (1 << np.arange(reads.shape[-1])).astype(np.int32)
        bits = jnp.sum(jnp.where(reads, bit, 0), axis=-1)  # int32 [B, Lq], or per head [B, Lq, H]
        query_side, head_side = ((bits,), ()) if bits.ndim == 2 else ((), (bits,))
        key_bits = jnp.sum(jnp.where(key_onehot, bit, 0), axis=-1)  # int32 [B, S]

    def per_query(q_i, kt_h, v_h, *reads_i):  # [B, Q, K], [B, K, S], [B, S, K], int32 [B, Q]?
        logits = jnp.einsum("bqk,bks->bqs", q_i, kt_h, preferred_element_type=jnp.float32) * scale
        if reads_i:  # one AND per logit rather than m: the mask of the (head, query block), in cache
            logits = jnp.where((reads_i[0][:, :, None] & key_bits[:, None, :]) != 0, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None])
        p_v = jnp.einsum("bqs,bsk->bqk", p.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
        return _lse_and_normalised(p_v, jnp.sum(p, axis=-1), row_max)

    return _heads_and_query_blocks(q, k, v, per_query, query_side, block, head_side)


def _cudnn_kernel(q, k, v, bias):
    """jax's cuDNN fused flash attention (GPU, bfloat16 / float16) with an additive bias None or
    [B, 1 or H, Lq, S]: (o float32 [B, Lq, H, K], lse float32 [B, Lq, H]).

    The private entry point is used because `jax.nn.dot_product_attention(return_residual=True)`
    (jax 0.10.2) rounds the log-sum-exp to the output dtype: in bfloat16 an LSE near 10 is off by up
    to 0.03, i.e. 3 % in a segment's weight. This one returns cuDNN's float32 softmax statistics.
    """
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    o, lse = cudnn_attention(q, k, v, bias=bias, scale=q.shape[-1] ** -0.5, qkv_layout="BTNH",
                             return_residual=True)  # lse: float32 [B, H, Lq]
    return o.astype(jnp.float32), jnp.swapaxes(lse, 1, 2).astype(jnp.float32)


def _group_bias(group_mask, dtype):
    """The additive bias [B, 1, Lq, S] of a multi-group segment: 0 where a query may read a key, else
    -2^40 (what jax uses for bfloat16 masks: cuDNN mishandles -inf - -inf). One head for a table
    shared by the heads: cuDNN broadcasts it, so it is Lq x S per sample, not H x Lq x S; a table
    per head gives [B, H, Lq, S]."""
    return jnp.where(_head_mask(group_mask), 0.0, -2.0 ** 40).astype(dtype)


def _fold_vmap(fn):
    """`fn(*arrays)`, every array [B, ...] in and out, with a vmapped axis V folded into B: under vmap
    it runs once on [V * B, ...] arrays (operands without the axis broadcast to it), nested vmaps
    fold in turn, so `fn` itself is never batched.

    This is how the cuDNN kernel meets a sweep: jax's own batching rule for it flattens the axes
    into the batch too, but reshapes a batched bias to [V * B, H, Lq, S], so a one-head bias
    [V, B, 1, Lq, S] fails to reshape (jax 0.10.2 to 0.11.2), and it takes only batch axes at
    position 0. Folding before the bias is built keeps it one-headed: [V * B, 1, Lq, S].
    """
    folded = jax.custom_batching.custom_vmap(fn)

    @folded.def_vmap
    def _rule(axis_size, in_batched, *args):
        def fold(a, batched):
            a = a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            return a.reshape(axis_size * a.shape[1], *a.shape[2:])

        outs = folded(*jax.tree_util.tree_map(fold, args, tuple(in_batched)))
        unfolded = jax.tree_util.tree_map(lambda o: o.reshape(axis_size, -1, *o.shape[1:]), outs)
        return unfolded, jax.tree_util.tree_map(lambda _: True, outs)

    return folded


def _kernel_partial(kernel):
    """A partial-attention function (q, k, v, group_mask=None) -> (o, lse), as the kernels above, that
    runs `kernel(q, k, v, bias)` (bias None or `_group_bias`) with vmap folded into the batch
    (`_fold_vmap`).

    Reverse mode differentiates `_partial_dense` at the same inputs (float32 logits [B, H, Lq, S]):
    `custom_vmap` has no transpose, and jax's own VJP of the cuDNN kernel drops the cotangent of the
    log-sum-exp, which the merge of segments needs (jax 0.11.2 `_dot_product_attention_bwd_rule`
    keeps `grad_output[0]` only).
    """
    @_fold_vmap
    def folded(q, k, v, group_mask):
        return kernel(q, k, v, None if group_mask is None else _group_bias(group_mask, q.dtype))

    @jax.custom_vjp
    def partial(q, k, v, group_mask):
        return folded(q, k, v, group_mask)

    def forward(q, k, v, group_mask):
        return folded(q, k, v, group_mask), (q, k, v, group_mask)

    def backward(residuals, cotangents):
        q, k, v, group_mask = residuals
        _, vjp = jax.vjp(lambda q, k, v: _partial_dense(q, k, v, group_mask), q, k, v)
        return (*vjp(cotangents), None)

    partial.defvjp(forward, backward)
    return lambda q, k, v, group_mask=None: partial(q, k, v, group_mask)


# cuDNN's fused flash attention on one segment (GPU, bfloat16 / float16); a multi-group segment gets
# its mask as a one-head bias [B, 1, Lq, S] (`_group_bias`): for the text span that is Lq x T.
_partial_cudnn = _kernel_partial(_cudnn_kernel)


def _pallas_kernel(q_ref, k_ref, v_ref, reads_ref, keys_ref, acc_ref, m_ref, l_ref, *, scale, num_groups):
    """One (batch x head, query tile, key tile) step of the online softmax (FlashAttention-2): the
    accumulators stay resident across the key tiles (the last grid axis) and are rescaled by
    exp(m_old - m_new) each time the row maximum grows."""
    from jax.experimental import pallas as pl

    @pl.when(pl.program_id(2) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, _MASKED)
        l_ref[...] = jnp.zeros_like(l_ref)

    q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [bq, K], [bk, K], [bk, K]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    reads, keys = reads_ref[...], keys_ref[...]  # float32 0/1 [bq, m], [m, bk]
    ok = (reads[:, 0:1] * keys[0:1, :]) > 0
    for j in range(1, num_groups):  # m is a handful: elementwise, no odd-shaped matmul
        ok = ok | ((reads[:, j:j + 1] * keys[j:j + 1, :]) > 0)
    s = jnp.where(ok, s, _MASKED)
    m_old = m_ref[...]  # [bq, 1]
    m_new = jnp.maximum(m_old, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m_old - m_new)
    p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_ref[...] = m_new


def _partial_pallas(q, k, v, group_mask=None, block: int = PALLAS_BLOCK, interpret: bool | None = None):
    """A Pallas flash kernel (TPU; Pallas interpret mode elsewhere, which is how the tests run it):
    tiles of `block` queries x `block` keys, online softmax over the key tiles, the group mask built
    per tile from the table rows. Queries and keys are padded to whole tiles (padding keys masked)."""
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    B, Lq, H, K = q.shape
    S = k.shape[1]
    bq, bk = min(block, -(-Lq // 8) * 8), min(block, -(-S // 8) * 8)
    nq, nk = -(-Lq // bq), -(-S // bk)
    if group_mask is None:
        reads, key_onehot = jnp.ones((B, Lq, 1), bool), jnp.ones((B, S, 1), bool)
    else:
        reads, key_onehot = (jnp.broadcast_to(a, (B, *a.shape[1:])) for a in group_mask)
    m = reads.shape[-1]
    heads_per_row = H  # programs h = b H + head read row b of `reads`
    if reads.ndim == 4:  # per head [B, Lq, H, m]: a row of reads per (batch, head) program
        reads, heads_per_row = reads.swapaxes(1, 2).reshape(B * H, Lq, m), 1

    def pad(a, n, axis):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, n - a.shape[axis])
        return jnp.pad(a, widths)

    qh = pad(q, nq * bq, 1).transpose(0, 2, 1, 3).reshape(B * H, nq * bq, K)
    kh, vh = (pad(a, nk * bk, 1).transpose(0, 2, 1, 3).reshape(B * H, nk * bk, K) for a in (k, v))
    reads_f = pad(reads, nq * bq, 1).astype(jnp.float32)  # [B or B H, Lq', m]
    keys_f = pad(key_onehot, nk * bk, 1).astype(jnp.float32).swapaxes(1, 2)  # [B, m, S']: padding keys in no group
    kernel = functools.partial(_pallas_kernel, scale=K ** -0.5, num_groups=m)
    acc, row_max, denom = pl.pallas_call(
        kernel,
        grid=(B * H, nq, nk),
        in_specs=[pl.BlockSpec((None, bq, K), lambda h, i, j: (h, i, 0)),
                  pl.BlockSpec((None, bk, K), lambda h, i, j: (h, j, 0)),
                  pl.BlockSpec((None, bk, K), lambda h, i, j: (h, j, 0)),
                  pl.BlockSpec((None, bq, m), lambda h, i, j: (h // heads_per_row, i, 0)),
                  pl.BlockSpec((None, m, bk), lambda h, i, j: (h // H, 0, j))],
        out_specs=[pl.BlockSpec((None, bq, K), lambda h, i, j: (h, i, 0)),
                   pl.BlockSpec((None, bq, 1), lambda h, i, j: (h, i, 0)),
                   pl.BlockSpec((None, bq, 1), lambda h, i, j: (h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((B * H, nq * bq, K), jnp.float32),
                   jax.ShapeDtypeStruct((B * H, nq * bq, 1), jnp.float32),
                   jax.ShapeDtypeStruct((B * H, nq * bq, 1), jnp.float32)],
        interpret=interpret,
    )(qh, kh, vh, reads_f, keys_f)
    o, lse = _lse_and_normalised(acc, denom[..., 0], row_max[..., 0])
    o = o.reshape(B, H, nq * bq, K)[:, :, :Lq].transpose(0, 2, 1, 3)
    return o, lse.reshape(B, H, nq * bq)[:, :, :Lq].swapaxes(1, 2)


def _merge(lse, outs):
    """(o, w, total): the attention over every part of a merge from each part's normalised output
    outs[p] [B, Lq, H, K] and log-sum-exp lse[p] [P, B, Lq, H]; w [P, B, Lq, H] each part's weight
    (0 where it was not read) and total their sum. A part a query read nothing of may hold NaN
    (0 / 0) in its output: its weight is 0 and it adds 0."""
    top = jnp.max(lse, axis=0)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # any finite shift: the weights are ratios
    w = jnp.exp(lse - top)
    total = jnp.sum(w, axis=0)
    o = sum(jnp.where(wp[..., None] > 0, wp[..., None] * op, 0.0) for wp, op in zip(w, outs))
    return o / total[..., None], w, total


def _grouped_attention(q, k, v, kg: KeyGroups, partial, flow: bool = False, carried: bool = False):
    """Attend to each key segment with `partial` and merge the results with the table's weights.

    flow: also return where the attention went (`attention_flow`): a segment of several groups is
    then attended once per group (its mask narrowed to that group's keys), so that every part of
    the merge is one group and its weight exp(lse_part - lse) is that group's attention mass."""
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    kg.check(Lq, Lk)
    may_read = kg.may_read()
    may_read = jnp.broadcast_to(may_read, (B, *may_read.shape[1:]))  # [B, Lq, (H,) G]
    keys = jnp.broadcast_to(kg.keys, (B, Lk))
    parts = []  # (key group or None for several, o, lse) of every part of the merge
    for start, stop, key_groups in kg.segments:
        reads = may_read[..., np.asarray(key_groups)]  # [B, Lq, (H,) m]
        ks, vs = k[:, start:stop], v[:, start:stop]
        if len(key_groups) == 1:  # one group: read whole or not at all, through the LSE weight alone
            o, lse = partial(q, ks, vs)
            parts.append((key_groups[0], o, jnp.where(reads[..., 0] if reads.ndim == 4 else reads, lse, -jnp.inf)))
            continue
        key_onehot = keys[:, start:stop, None] == np.asarray(key_groups)  # [B, S, m]
        if not flow:
            parts.append((None, *partial(q, ks, vs, (reads, key_onehot))))
            continue
        for j, group in enumerate(key_groups):  # with flow: one part per group, the mask narrowed to it
            parts.append((group, *partial(q, ks, vs, (reads[..., j:j + 1], key_onehot[..., j:j + 1]))))
    part_groups, outs, lses = zip(*parts)
    if len(outs) == 1 and not flow:  # one segment: already normalised over every key a query may read
        return outs[0].astype(v.dtype)
    o, w, total = _merge(jnp.stack(lses), outs)
    o = o.astype(v.dtype)
    if not flow:
        return o
    share = w / total  # [P, B, Lq, H]: each part's (one group's) attention mass
    norms = [jnp.where(sp > 0, sp * jnp.linalg.norm(jnp.where(sp[..., None] > 0, op, 0.0), axis=-1), 0.0)
             for sp, op in zip(share, outs)] if carried else None
    return o, _per_group(share, part_groups, kg.allowed.shape[-1]), \
        None if norms is None else _per_group(norms, part_groups, kg.allowed.shape[-1])


def _per_group(parts, part_groups, num_groups: int):
    """float32 [B, Lq, H, G] from per-part values [B, Lq, H] (each part one group's keys); 0 for a
    group without keys here (a reference after its removal)."""
    zero = jnp.zeros_like(parts[0])
    return jnp.stack([sum((p for p, g in zip(parts, part_groups) if g == group), zero)
                      for group in range(num_groups)], axis=-1)


def _blocked_flow(q, k, v, kg: KeyGroups, carried: bool, block: int = ATTENTION_QUERY_BLOCK):
    """`attention_flow` on the CPU: the blocked kernel's one pass over every key (as `KeyGroups.whole`),
    which also sums each query block's unnormalised probabilities per key group (a [Q, S] x [S, G]
    product beside the [Q, S] x [S, K] one) and, for `carried`, contracts each group's keys with
    the values apart: a one-group segment by its slice of the keys (no extra work: the slices add
    up to the whole contraction), a segment of several groups once per group."""
    B, Lq, H, _ = q.shape
    G = kg.allowed.shape[-1]
    if G > 31:
        raise ValueError(f"the blocked kernel takes at most 31 key groups, got {G}")
    Lk = k.shape[1]
    kg.check(Lq, Lk)
    scale = q.shape[-1] ** -0.5
    keys = jnp.broadcast_to(kg.keys, (B, Lk))
    key_onehot = (keys[..., None] == jnp.arange(G)).astype(jnp.float32)  # [B, S, G]
    bit = (1 << np.arange(G)).astype(np.int32)
    may_read = kg.may_read()
    bits = jnp.broadcast_to(jnp.sum(jnp.where(may_read, bit, 0), axis=-1), (B, *may_read.shape[1:-1]))
    key_bits = jnp.asarray(bit)[keys]  # int32 [B, S]
    query_side, head_side = ((bits,), ()) if bits.ndim == 2 else ((), (bits,))

    def per_query(q_i, kt_h, v_h, reads_i):  # [B, Q, K], [B, K, S], [B, S, K], int32 [B, Q]
        logits = jnp.einsum("bqk,bks->bqs", q_i, kt_h, preferred_element_type=jnp.float32) * scale
        logits = jnp.where((reads_i[:, :, None] & key_bits[:, None, :]) != 0, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1)
        p = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)[..., None])
        denom = jnp.sum(p, axis=-1)
        p_v = jnp.einsum("bqs,bsk->bqk", p.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
        o, _ = _lse_and_normalised(p_v, denom, row_max)
        mass = jnp.einsum("bqs,bsg->bqg", p, key_onehot) / denom[..., None]
        if not carried:
            return o.astype(v_h.dtype), mass, None
        norms, part_groups = [], []
        for start, stop, key_groups in kg.segments:
            p_s, v_s = p[:, :, start:stop], v_h[:, start:stop]
            for g in key_groups:
                p_g = p_s if len(key_groups) == 1 else p_s * key_onehot[:, None, start:stop, g]
                part = jnp.einsum("bqs,bsk->bqk", p_g.astype(v_h.dtype), v_s, preferred_element_type=jnp.float32)
                norms.append(jnp.linalg.norm(part, axis=-1) / denom)
                part_groups.append(g)
        return o.astype(v_h.dtype), mass, _per_group(norms, part_groups, G)

    return _heads_and_query_blocks(q, k, v, per_query, query_side, block, head_side)


def _dense_flow(q, k, v, kg: KeyGroups, carried: bool):
    """`attention_flow` from the [B, H, Lq, Lk] float32 probabilities in full: the reference form."""
    G = kg.allowed.shape[-1]
    logits = jnp.einsum("bqhk,blhk->bhql", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    p, denom = _unnormalised_softmax(logits, _with_heads(kg.dense_mask()))
    p = p / denom[..., None]  # [B, H, Lq, Lk]
    key_onehot = (kg.keys[..., None] == jnp.arange(G)).astype(jnp.float32)  # [B or 1, Lk, G]
    o = jnp.einsum("bhql,blhk->bqhk", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(v.dtype)
    mass = jnp.einsum("bhql,blg->bqhg", p, key_onehot)
    if not carried:
        return o, mass, None
    parts = jnp.einsum("bhql,blg,blhk->bqhgk", p, key_onehot, v.astype(jnp.float32))
    return o, mass, jnp.linalg.norm(parts, axis=-1)


def attention_flow(q, k, v, groups: KeyGroups, options: RuntimeOptions | str | None = None, *,
                   carried: bool = False):
    """`attention` with `groups` (a `KeyGroups`: its table applied as a knockout, an all-True table
    for none) and where the attention went, per key group, without an [Lq, Lk] array.

    Returns (o [B, Lq, H, K], as `attention` returns it; mass float32 [B, Lq, H, G]; carried float32
    [B, Lq, H, G] or None):
      mass[b, q, h, g]     sum of the softmax probabilities of query q (head h) over the keys of
                           group g: exp(lse_g - lse), the share of the merge's part of group g
      carried[b, q, h, g]  || sum_{k in g} p[q, k] v_k ||_2 over the head dim: the norm of the
                           attention output that group g's keys contribute (`carried=True`)
    Every kernel of `attention`: "xla" from the dense probabilities (the reference); "blocked"
    in its one pass (`_blocked_flow`); "cudnn" and "pallas" per segment, from their log-sum-exp
    residuals, the text span's content and padding as two parts.
    """
    options = runtime_options(options)
    implementation = options.attention or default_implementation(q.dtype, head_dim=q.shape[-1])
    if implementation == "xla":
        return _dense_flow(q, k, v, groups, carried)
    if implementation == "blocked":
        return _blocked_flow(q, k, v, groups, carried, block=options.query_block)
    partial = {"cudnn": _partial_cudnn,
               "pallas": functools.partial(_partial_pallas, block=options.pallas_block)}[implementation]
    return _grouped_attention(q, k, v, groups, partial, flow=True, carried=carried)


def _rows(table, groups):
    """A table [G, G] or per head [H, G, G] looked up by query group: [B, Lq, 1 or H, G]."""
    if table.ndim == 2:
        return table[groups][:, :, None]
    return jnp.moveaxis(table[:, groups], 0, 2)


def gated_attention(q, k, v, kg: KeyGroups, partial):
    """Attention with edge gates: queries of group gq weigh the keys of group gk by gate[(h,) gq, gk].

    Each key group of each segment is attended apart (a multi-group segment once per group, its
    keys masked to that group), and the partial results are merged with log-weights
    lse + log(gate), -inf where the table cuts the edge. So p(q, k) is proportional to
    gate[group(q), group(k)] exp(s(q, k)) over the keys q reads: gate = 1 everywhere is the plain
    attention, gate = 0 on an edge is its knockout, exactly (the same partial kernels, the same
    merge; tests/fluxjax/test_edge_gates.py), and the gate is differentiable in between without an
    [Lq, Lk] array. d out / d gate at 1 is the knockout linearised (attribution patching).

    softmax_fix (AtP*'s remedy where linearising the softmax fails, Kramar et al. 2024): the
    gradient of each query's log-weight of group gk is scaled by 1 / (1 - w), w the query's
    attention mass on gk. Cutting the edge changes the query's output by exactly
    -w (o_gk - o) / (1 - w), the linear term divided by (1 - w); so the gradient at gate = 1 then
    takes the attention's own change exactly and linearises only what follows it. The forward at
    gate = 1 is unchanged (log 1 = 0); the gates then only serve their gradient.
    """
    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    kg.check(Lq, Lk)
    gate = jnp.broadcast_to(kg.gate, kg.allowed.shape) if kg.gate.ndim < kg.allowed.ndim else kg.gate
    allowed = jnp.broadcast_to(kg.allowed, gate.shape)
    # log(gate) where the edge is open; log(1) inside the where keeps reverse mode free of log(0)
    log_w = jnp.where(allowed & (gate > 0), jnp.log(jnp.where(allowed & (gate > 0), gate, 1.0)), -jnp.inf)
    log_w = jnp.broadcast_to(_rows(log_w, kg.groups), (B, Lq, log_w.shape[0] if log_w.ndim == 3 else 1,
                                                         log_w.shape[-1]))  # [B, Lq, 1 or H, G]
    keys = jnp.broadcast_to(kg.keys, (B, Lk))
    outs, lses, which = [], [], []
    for start, stop, key_groups in kg.segments:
        ks, vs = k[:, start:stop], v[:, start:stop]
        for g in key_groups:
            if len(key_groups) == 1:
                o, lse = partial(q, ks, vs)
            else:  # this group's keys of the segment only
                key_onehot = keys[:, start:stop, None] == g  # [B, S, 1]
                o, lse = partial(q, ks, vs, (jnp.ones((B, Lq, 1), bool), key_onehot))
            outs.append(o)
            lses.append(lse)
            which.append(g)
    lse = jnp.stack(lses)  # [P, B, Lq, H], without the gates
    gates = jnp.moveaxis(log_w[..., np.asarray(which)], -1, 0)  # [P, B, Lq, 1 or H]
    if kg.softmax_fix:
        weighted = jax.lax.stop_gradient(lse + gates)
        top = jnp.max(weighted, axis=0)
        share = jnp.exp(weighted - jnp.where(jnp.isfinite(top), top, 0.0))
        share = share / jnp.sum(share, axis=0)
        gates = gates * (1.0 / jnp.maximum(1.0 - share, 1e-6))
    return _merge(lse + gates, outs)[0].astype(v.dtype)


def default_implementation(dtype, masked: bool = False, head_dim: int = 128) -> str:
    """The attention implementation `attention` uses when none is named, per backend:

      CPU  "blocked" for every call (plain, dense mask, key groups): the [B, H, L, L] logits never
           exist and the dots run at matmul speed;
      GPU  "cudnn" (fused flash attention) for bfloat16 / float16 with head dim <= 128 (every
           transformer call: plain, masked and key groups alike); "xla" for float32 and for wide
           heads (the VAE's single 512-wide head), which cuDNN's fused kernel does not take;
      TPU  "pallas" (the flash kernel above) for plain calls and key groups with head dim <= 128;
           "xla" for a dense [B, Lq, Lk] mask, which the Pallas kernel does not take, and for
           wider heads.
    The GPU and TPU choices are made from what each kernel supports; their speed is measured by
    `python -m benchmarks.gpu_check` where a GPU is available.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 else "xla"
    if backend == "tpu":
        return "xla" if masked or head_dim > 128 else "pallas"
    return "blocked"


def attention(q, k, v, mask=None, options: RuntimeOptions | str | None = None, *,
              implementation: str | None = None):
    """The one softmax attention of the package: softmax(q k^T / sqrt(K)) v.

    q: [B, Lq, H, K]; k, v: [B, Lk, H, K]; mask: None, bool [B, Lq, Lk] or per head
    [B, H, Lq, Lk] (True = may attend), or `KeyGroups` (a knockout table over token groups, shared
    or per head, applied without an [Lq, Lk] mask). Every attention-edge knockout goes through
    here, so the clean and the masked paths share their numerics. `options`: a
    `fluxjax.RuntimeOptions` (or a kernel name as shorthand), whose `attention` picks the kernel
    (None: `default_implementation`) and whose tile sizes the blocked and Pallas kernels use
    (`implementation="xla"` is the older spelling of options="xla"):
      "xla"     one einsum over all heads and queries (float32 logits and softmax); with KeyGroups,
                the dense mask (`KeyGroups.dense_mask`): the reference every other path is tested
                against;
      "blocked" the same numerics one (head, 256-query block) at a time: "xla" up to float
                rounding, without the [B, H, Lq, Lk] logits in memory; with KeyGroups, per segment;
      "cudnn"   jax's cuDNN fused kernel (GPU, bfloat16 / float16); with KeyGroups, per segment;
      "pallas"  the Pallas flash kernel (TPU; interpret mode on other backends); no dense masks.
    """
    options = runtime_options(options, implementation)
    implementation = options.attention
    if implementation is None:
        implementation = default_implementation(q.dtype, masked=mask is not None and not isinstance(mask, KeyGroups),
                                                head_dim=q.shape[-1])
    partial = {"xla": _partial_dense, "cudnn": _partial_cudnn,
               "blocked": functools.partial(_partial_blocked, block=options.query_block),
               "pallas": functools.partial(_partial_pallas, block=options.pallas_block)}[implementation]
    if isinstance(mask, KeyGroups) and mask.gate is not None:  # every kernel: gates enter through the merge
        return gated_attention(q, k, v, mask, _partial_dense if implementation == "xla" else partial)
    if isinstance(mask, KeyGroups):
        if implementation == "xla":
            mask = mask.dense_mask()
        else:  # blocked (CPU): one pass over all keys, measured faster than one per segment
            groups = mask.whole() if implementation == "blocked" else mask
            return _grouped_attention(q, k, v, groups, partial)
    if implementation == "cudnn":
        m = None if mask is None else _with_heads(mask)
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
    if implementation == "xla":
        return _dense_attention(q, k, v, mask)
    if implementation == "blocked":
        return _blocked_attention(q, k, v, mask, block=options.query_block)
    if mask is not None:
        raise ValueError("the Pallas kernel takes KeyGroups, not a dense [B, Lq, Lk] mask; use "
                         "RuntimeOptions(attention='xla') or 'blocked' for a dense mask")
    return partial(q, k, v)[0].astype(v.dtype)
