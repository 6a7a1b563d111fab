"""The two FLUX.2 blocks, each a pure function of one layer's parameters (spec sections 3.5, 3.6).

Axis names as in `fluxjax.numerics`. Modulation chunks are (shift, scale, gate) triples computed
once per forward and shared by every block of a kind.
"""

from __future__ import annotations

import jax.numpy as jnp

from fluxjax.numerics import apply_rope, attention, linear, modulate, rms_norm, swiglu
from fluxjax.params import QKNorm, SelfAttention


def _heads(x, head_dim: int):
    return x.reshape(*x.shape[:-1], -1, head_dim)  # [B, L, D] -> [B, L, H, K]


def _qkv(p: SelfAttention, x, head_dim: int):
    q, k, v = jnp.split(linear(x, p.qkv), 3, axis=-1)
    q, k, v = (_heads(a, head_dim) for a in (q, k, v))
    return rms_norm(q, p.norm.query_norm), rms_norm(k, p.norm.key_norm), v


def _splice(k, v, extra_kv, at: int):
    """Keys and values with `extra_kv` = (k, v) [B, Lx, H, K] inserted after the first `at` tokens."""
    if extra_kv is None:
        return k, v
    ek, ev = extra_kv
    return (jnp.concatenate([k[:, :at], ek.astype(k.dtype), k[:, at:]], axis=1),
            jnp.concatenate([v[:, :at], ev.astype(v.dtype), v[:, at:]], axis=1))


def double_block(p, img, txt, mod_img, mod_txt, rope, mask=None, attn_impl=None, *, extra_kv=None,
                 return_kv=False):
    """One double-stream block.

    p: one layer of `DoubleBlocks`; img: [B, N, D]; txt: [B, T, D]; mod_img, mod_txt: two
    (shift, scale, gate) triples each, [B, 1, D] (or per token, [B, N, D] / [B, T, D]); rope:
    (cos, sin) for the joint [text, image] sequence; mask: None, bool [B, Lq, Lk], or
    `numerics.KeyGroups` (a knockout table applied without an [L, L] mask), passed to `attention`.
    extra_kv: None or (k, v) [B, Lx, H, K] spliced into the keys and values right after the text
    (the [klein] KV-cached references: keys [text, extra, image]). return_kv: also return the
    joint keys and values after QK-norm and RoPE. Returns (img, txt) or (img, txt, (k, v)).
    """
    (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = mod_img
    (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = mod_txt
    head_dim = p.img_attn.norm.query_norm.shape[-1]
    n_txt = txt.shape[1]

    iq, ik, iv = _qkv(p.img_attn, modulate(img, i_shift1, i_scale1), head_dim)
    tq, tk, tv = _qkv(p.txt_attn, modulate(txt, t_shift1, t_scale1), head_dim)
    q = apply_rope(jnp.concatenate([tq, iq], axis=1), *rope)  # text first
    k = apply_rope(jnp.concatenate([tk, ik], axis=1), *rope)
    v = jnp.concatenate([tv, iv], axis=1)
    o = attention(q, *_splice(k, v, extra_kv, n_txt), mask, attn_impl)
    o = o.reshape(*o.shape[:2], -1)
    t_attn, i_attn = o[:, :n_txt], o[:, n_txt:]

    img = img + i_gate1 * linear(i_attn, p.img_attn.proj)
    img = img + i_gate2 * linear(swiglu(linear(modulate(img, i_shift2, i_scale2), p.img_mlp.fc_in)), p.img_mlp.fc_out)
    txt = txt + t_gate1 * linear(t_attn, p.txt_attn.proj)
    txt = txt + t_gate2 * linear(swiglu(linear(modulate(txt, t_shift2, t_scale2), p.txt_mlp.fc_in)), p.txt_mlp.fc_out)
    return (img, txt, (k, v)) if return_kv else (img, txt)


def single_block(p, z, mod, rope, mask=None, attn_impl=None, *, extra_kv=None, extra_kv_at: int = 0,
                 return_kv=False):
    """One single-stream (parallel attention + MLP) block on the joint stream z: [B, L, D].

    mod: (shift, scale, gate), [B, 1, D] or per token [B, L, D]. extra_kv: None or (k, v) spliced
    into the keys and values after the first `extra_kv_at` tokens; return_kv: also return the keys
    and values after QK-norm and RoPE (see `double_block`).
    """
    shift, scale, gate = mod
    norm: QKNorm = p.norm
    head_dim = norm.query_norm.shape[-1]
    D = z.shape[-1]

    f = linear(modulate(z, shift, scale), p.linear1)  # [B, L, 3D + 2M]
    q, k, v, mlp = jnp.split(f, [D, 2 * D, 3 * D], axis=-1)
    q = apply_rope(rms_norm(_heads(q, head_dim), norm.query_norm), *rope)
    k = apply_rope(rms_norm(_heads(k, head_dim), norm.key_norm), *rope)
    v = _heads(v, head_dim)
    a = attention(q, *_splice(k, v, extra_kv, extra_kv_at), mask, attn_impl)
    a = a.reshape(*a.shape[:2], -1)
    out = linear(jnp.concatenate([a, swiglu(mlp)], axis=-1), p.linear2)  # attention part first
    z = z + gate * out
    return (z, (k, v)) if return_kv else z
