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


ATTENTION_QUERY_BLOCK = 256  # queries per block: a [B, 256, L] float32 logits tile stays in cache


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


def _dense_attention(q, k, v, mask):
    """All heads and queries at once: the [B, H, Lq, Lk] float32 logits exist in full."""
    logits = jnp.einsum("bqhk,blhk->bhql", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    p, denom = _unnormalised_softmax(logits, None if mask is None else mask[:, None])  # [B, H, Q, L], [B, H, Q]
    o = jnp.einsum("bhql,blhk->bqhk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / jnp.swapaxes(denom, 1, 2)[..., None]).astype(v.dtype)


def _blocked_attention(q, k, v, mask, block: int = ATTENTION_QUERY_BLOCK):
    """The same computation one head at a time and, within a head, one block of queries at a time
    (nested `lax.map`), so the [B, H, Lq, Lk] logits never exist at once.

    Every query row sees the same float32 logits, softmax and normalisation as in
    `_dense_attention`; results differ only by float rounding (dot kernels of different shapes sum
    in different orders). On CPU this makes attention run at matmul speed: the dense form streams
    the whole logits tensor through memory several times and runs both contractions as slow batched
    dots. K is transposed once, outside the loops, so every dot in the loop is a plain
    [Q, K] x [K, L] and [Q, L] x [L, K] product on contiguous slices. The batch axis stays a batch
    axis of the dots, so a batch sharded over a device mesh stays sharded.
    """
    q, k, v = (jnp.asarray(a) for a in (q, k, v))
    B, Lq, H, K = q.shape
    n = -(-Lq // block) if Lq > block else 1
    block = -(-Lq // n)
    pad = n * block - Lq
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qb = q.reshape(B, n, block, H, K).transpose(3, 1, 0, 2, 4)  # [H, n, B, Q, K]
    kt = k.transpose(2, 0, 3, 1)  # [H, B, K, L]
    vh = v.transpose(2, 0, 1, 3)  # [H, B, L, K]
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)), constant_values=True)  # padded queries see all keys
        mask = mask.reshape(B, n, block, -1).swapaxes(0, 1)  # [n, B, Q, L]
    scale = K ** -0.5

    def head(xs):
        q_h, kt_h, v_h = xs  # [n, B, Q, K], [B, K, L], [B, L, K]

        def query_block(ys):
            q_i, mask_i = ys  # [B, Q, K], [B, Q, L] or None
            logits = jnp.einsum("bqk,bkl->bql", q_i, kt_h, preferred_element_type=jnp.float32) * scale
            p, denom = _unnormalised_softmax(logits, mask_i)
            o = jnp.einsum("bql,blk->bqk", p.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
            return (o / denom[..., None]).astype(v_h.dtype)

        return jax.lax.map(query_block, (q_h, mask))  # [n, B, Q, K]

    o = jax.lax.map(head, (qb, kt, vh))  # [H, n, B, Q, K]
    return o.transpose(2, 1, 3, 0, 4).reshape(B, n * block, H, K)[:, :Lq]


def attention(q, k, v, mask=None, implementation: str | None = None):
    """The one softmax attention of the package: softmax(q k^T / sqrt(K)) v.

    q: [B, Lq, H, K]; k, v: [B, Lk, H, K]; mask: None or bool [B, Lq, Lk] (True = may attend).
    Every attention-edge knockout goes through here, so the clean and the masked paths share
    their numerics. `implementation`:
      None     "blocked" on CPU, "xla" on other backends;
      "xla"    one einsum over all heads and queries (float32 logits and softmax);
      "blocked" the same numerics one (head, 256-query block) at a time: "xla" up to float
               rounding, without the [B, H, Lq, Lk] logits in memory;
      "cudnn"  jax.nn.dot_product_attention's fused kernel on GPU.
    """
    if implementation is None:
        implementation = "blocked" if jax.default_backend() == "cpu" else "xla"
    if implementation == "cudnn":
        m = None if mask is None else mask[:, None, :, :]
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
    if implementation == "xla":
        return _dense_attention(q, k, v, mask)
    if implementation == "blocked":
        return _blocked_attention(q, k, v, mask)
    raise ValueError(f"unknown attention implementation {implementation!r}; use None, 'xla', 'blocked' or 'cudnn'")
