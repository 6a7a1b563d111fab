"""The two FLUX.2 blocks, each a pure function of one layer's parameters (spec sections 3.5, 3.6).

Axis names as in `fluxjax.numerics`. Modulation chunks are (shift, scale, gate) triples computed
once per forward and shared by every block of a kind (`Modulations`).

A block knows nothing of interventions, caches or kernels. It takes:

    attend  (q, k, v) [B, L, H, K] -> (o [B, L, H, K], measured), the attention of this layer:
            the runner's closure over `fluxjax.numerics.attention` with the layer's knockout, cached
            keys and kernel options; `measured` is what it measured besides (the attention flow,
            `fluxjax.flow`; None where nothing was asked for), handed back untouched
    edit    (point, value) -> value or None: applied to the attention and MLP contributions
            ("attn_out", "mlp_out"; `fluxjax.sites`) before they are gated into the residual stream

and returns one `BlockOut`: the new streams, those two contributions (after `edit`), the joint
keys and values after QK-norm and RoPE, and what `attend` measured. Streams are (text, image stream) pairs in double blocks
and the joint [text, image stream] array in single blocks; a contribution has its block's form.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from fluxjax.numerics import apply_rope, linear, modulate, rms_norm, swiglu
from fluxjax.params import QKNorm, SelfAttention

Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
Edit = Callable[[str, Any], Any]


@struct.dataclass
class Modulations:
    """(shift, scale, gate) triples, each [B, 1, D] (or per token), shared by every block of a kind."""

    img: tuple  # two triples: attention, then MLP, of the double blocks' image stream
    txt: tuple  # two triples, text stream
    single: tuple  # one triple of the single blocks


class BlockOut(NamedTuple):
    """What every block returns."""

    out: Any  # the streams: (text [B, T, D], image stream [B, N, D]), or the joint stream [B, L, D]
    attn_out: Any  # the attention's contribution before its gate, in the form of `out`
    mlp_out: Any  # the MLP's; both None in a single block called without an `edit` (its fused
    #               projection does not form them)
    kv: tuple[jax.Array, jax.Array]  # joint keys and values after QK-norm and RoPE, each [B, L, H, K]
    measured: Any = None  # what `attend` measured besides its output (the attention flow), or None


def _heads(x, head_dim: int):
    return x.reshape(*x.shape[:-1], -1, head_dim)  # [B, L, D] -> [B, L, H, K]


def _qkv(p: SelfAttention, x, head_dim: int):
    q, k, v = jnp.split(linear(x, p.qkv), 3, axis=-1)
    q, k, v = (_heads(a, head_dim) for a in (q, k, v))
    return rms_norm(q, p.norm.query_norm), rms_norm(k, p.norm.key_norm), v


def _unchanged(point, value):
    return value


def double_block(p, txt, img, mod_txt, mod_img, rope, attend: Attend, edit: Edit | None = None) -> BlockOut:
    """One double-stream block.

    p: one layer of `DoubleBlocks`; txt: [B, T, D]; img: the image stream [B, N, D]; mod_txt,
    mod_img: two (shift, scale, gate) triples each, [B, 1, D] (or per token); rope: (cos, sin) of
    the joint [text, image stream] sequence. Contributions are (text, image stream) pairs.
    """
    edit = edit or _unchanged
    (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = mod_img
    (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = mod_txt
    head_dim = p.img_attn.norm.query_norm.shape[-1]
    n_txt = txt.shape[1]

    iq, ik, iv = _qkv(p.img_attn, modulate(img, i_shift1, i_scale1), head_dim)
    tq, tk, tv = _qkv(p.txt_attn, modulate(txt, t_shift1, t_scale1), head_dim)
    q = apply_rope(jnp.concatenate([tq, iq], axis=1), *rope)  # text first
    k = apply_rope(jnp.concatenate([tk, ik], axis=1), *rope)
    v = jnp.concatenate([tv, iv], axis=1)
    o, measured = attend(q, k, v)
    o = o.reshape(*o.shape[:2], -1)
    t_attn, i_attn = edit("attn_out", (linear(o[:, :n_txt], p.txt_attn.proj), linear(o[:, n_txt:], p.img_attn.proj)))

    img = img + i_gate1 * i_attn
    txt = txt + t_gate1 * t_attn
    t_mlp, i_mlp = edit("mlp_out", (
        linear(swiglu(linear(modulate(txt, t_shift2, t_scale2), p.txt_mlp.fc_in)), p.txt_mlp.fc_out),
        linear(swiglu(linear(modulate(img, i_shift2, i_scale2), p.img_mlp.fc_in)), p.img_mlp.fc_out)))
    return BlockOut(out=(txt + t_gate2 * t_mlp, img + i_gate2 * i_mlp), attn_out=(t_attn, i_attn),
                    mlp_out=(t_mlp, i_mlp), kv=(k, v), measured=measured)


def single_block(p, z, mod, rope, attend: Attend, edit: Edit | None = None) -> BlockOut:
    """One single-stream (parallel attention + MLP) block on the joint stream z: [B, L, D].

    mod: (shift, scale, gate), [B, 1, D] or per token [B, L, D]. One matrix (`linear2`) projects
    the attention output and the SwiGLU output together. With an `edit`, the two contributions are
    formed apart (the attention's rows of linear2, then the MLP's: `fluxjax.sites`) and edited;
    every element the edit left unchanged keeps the fused projection's value, so an edit that
    changes nothing changes no bit of the block's output.
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
    a, measured = attend(q, k, v)
    a = a.reshape(*a.shape[:2], -1)
    m = swiglu(mlp)
    out = linear(jnp.concatenate([a, m], axis=-1), p.linear2)  # attention rows first
    attn_out = mlp_out = None
    if edit is not None:
        attn_part, mlp_part = linear(a, p.linear2[:D]), linear(m, p.linear2[D:])
        attn_out, mlp_out = edit("attn_out", attn_part), edit("mlp_out", mlp_part)
        out = jnp.where((attn_out != attn_part) | (mlp_out != mlp_part), attn_out + mlp_out, out)
    return BlockOut(out=z + gate * out, attn_out=attn_out, mlp_out=mlp_out, kv=(k, v), measured=measured)
