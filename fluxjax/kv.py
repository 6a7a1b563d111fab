"""The [klein] 9B KV variant: reference keys and values computed once, then reused (spec 3.8, 10).

Two forward modes (diffusers `Flux2Transformer2DModel.forward(kv_cache_mode=...)`, BFL
`forward_kv_extract` / `forward_kv_cached`):

    extract  image stream [refs, img] (references prepended), joint sequence [text, refs, img].
             Text and image queries attend to every key; reference queries attend to reference
             keys only (all references together). The references are modulated with the vec of
             t_ref = 0 (image-stream double modulation, and the single modulation at reference
             positions); text and the final layer use the current t. Returns the prediction for
             the noisy tokens and, per block, the references' keys and values after QK-norm and
             RoPE.
    cached   image stream [img], queries [text, img], keys and values [text, cached refs, img].

The cache is exact: the references never see text or x_t and use a fixed t, so their keys and
values are the same at every step. `sample_kv` runs the `Flux2KleinKVPipeline` loop as one
program: step 0 extracts, steps 1.. reuse the cache. Interventions are not supported here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.blocks import double_block, single_block
from fluxjax.config import Flux2Config
from fluxjax.model import conditioning, embed, final_layer, modulations, positions, scale_timestep
from fluxjax.sampler import SamplerOptions, euler_step, model_timestep, start


@struct.dataclass
class KVCache:
    """The references' keys and values after QK-norm and RoPE, per block."""

    double_k: jax.Array  # [depth, B, N_ref, H, K]
    double_v: jax.Array  # [depth, B, N_ref, H, K]
    single_k: jax.Array  # [depth_single_blocks, B, N_ref, H, K]
    single_v: jax.Array  # [depth_single_blocks, B, N_ref, H, K]

    @property
    def num_ref_tokens(self) -> int:
        return self.double_k.shape[2]


def _per_token(first, rest, n_first: int, n_rest: int):
    """[B, 1, D] chunks -> [B, n_first + n_rest, D]: `first` on the leading tokens, `rest` after."""
    b = first.shape[0]
    return jnp.concatenate([jnp.broadcast_to(first, (b, n_first, first.shape[-1])),
                            jnp.broadcast_to(rest, (b, n_rest, rest.shape[-1]))], axis=1)


def _guidance(guidance, dtype):
    return None if guidance is None else scale_timestep(guidance, dtype)


def forward_kv_extract(params, config: Flux2Config, img, refs, txt, timestep, img_ids, ref_ids, txt_ids,
                       guidance=None, *, ref_timestep: float = 0.0, attn_impl: str | None = None):
    """Extract mode. img: [B, N_img, in]; refs: [B, N_ref, in]; txt: [B, T, C]; timestep: [B];
    img_ids: int [N_img, 4]; ref_ids: int [N_ref, 4]; txt_ids: int [T, 4].

    Returns (prediction [B, N_img, out_channels], KVCache).
    """
    dtype = params.img_in.dtype
    n_txt, n_ref, n_img = txt.shape[1], refs.shape[1], img.shape[1]
    s, g = scale_timestep(timestep, dtype), _guidance(guidance, dtype)
    vec = conditioning(params, config, s, g)
    # diffusers: torch.full_like(timestep * 1000, ref_fixed_timestep * 1000), in the model dtype
    ref_vec = conditioning(params, config, jnp.full_like(s, ref_timestep * 1000), g)
    mods, ref_mods = modulations(params, vec), modulations(params, ref_vec)
    mod_img = tuple(tuple(_per_token(r, m, n_ref, n_img) for r, m in zip(rs, ms))
                    for rs, ms in zip(ref_mods.img, mods.img))  # image stream [refs, img]
    mod_single = tuple(jnp.concatenate([jnp.broadcast_to(m, (m.shape[0], n_txt, m.shape[-1])),
                                        _per_token(r, m, n_ref, n_img)], axis=1)
                       for m, r in zip(mods.single, ref_mods.single))  # joint [text, refs, img]

    x, c = embed(params, jnp.concatenate([refs.astype(dtype), img.astype(dtype)], axis=1), txt)
    rope = positions(config, txt_ids, jnp.concatenate([jnp.asarray(ref_ids), jnp.asarray(img_ids)], axis=0))
    group = np.concatenate([np.zeros(n_txt, bool), np.ones(n_ref, bool), np.zeros(n_img, bool)])
    allowed = ~(group[:, None] & ~group[None, :])  # reference queries see reference keys only
    mask = jnp.broadcast_to(jnp.asarray(allowed), (txt.shape[0], *allowed.shape))
    refs_at = slice(n_txt, n_txt + n_ref)

    def double(carry, p):
        x, c = carry
        x, c, (k, v) = double_block(p, x, c, mod_img, mods.txt, rope, mask, attn_impl, return_kv=True)
        return (x, c), (k[:, refs_at], v[:, refs_at])

    (x, c), (dk, dv) = jax.lax.scan(double, (x, c), params.double_blocks)

    def single(z, p):
        z, (k, v) = single_block(p, z, mod_single, rope, mask, attn_impl, return_kv=True)
        return z, (k[:, refs_at], v[:, refs_at])

    z, (sk, sv) = jax.lax.scan(single, jnp.concatenate([c, x], axis=1), params.single_blocks)
    out = final_layer(params, vec, z[:, n_txt + n_ref:])  # the final layer uses the current t
    return out, KVCache(double_k=dk, double_v=dv, single_k=sk, single_v=sv)


def forward_kv_cached(params, config: Flux2Config, img, txt, timestep, img_ids, txt_ids, cache: KVCache,
                      guidance=None, *, attn_impl: str | None = None):
    """Cached mode: the standard forward on [text, img], with the cached reference keys and values
    spliced in after the text keys in every block. Returns [B, N_img, out_channels]."""
    dtype = params.img_in.dtype
    n_txt = txt.shape[1]
    vec = conditioning(params, config, scale_timestep(timestep, dtype), _guidance(guidance, dtype))
    mods = modulations(params, vec)
    x, c = embed(params, img, txt)
    rope = positions(config, txt_ids, img_ids)

    def double(carry, xs):
        p, k, v = xs
        x, c = double_block(p, *carry, mods.img, mods.txt, rope, None, attn_impl, extra_kv=(k, v))
        return (x, c), None

    (x, c), _ = jax.lax.scan(double, (x, c), (params.double_blocks, cache.double_k, cache.double_v))

    def single(z, xs):
        p, k, v = xs
        return single_block(p, z, mods.single, rope, None, attn_impl, extra_kv=(k, v), extra_kv_at=n_txt), None

    z, _ = jax.lax.scan(single, jnp.concatenate([c, x], axis=1),
                        (params.single_blocks, cache.single_k, cache.single_v))
    return final_layer(params, vec, z[:, n_txt:])


def sample_kv(params, config: Flux2Config, options: SamplerOptions, txt, txt_ids, img_ids, refs, *, noise=None,
              seed=None, sigmas=None, attn_impl: str | None = None):
    """The `Flux2KleinKVPipeline` loop: step 0 in extract mode, later steps from the cache.

    Arguments as `fluxjax.sample` (img_ids lists the noisy tokens, then the references, as
    `TokenLayout.img_ids()`); refs: [B or 1, N_ref, in_channels] is required (without references
    use `fluxjax.sample`). Only guidance "none" (the KV checkpoint is distilled). Returns latents
    [B, N_img, in_channels].
    """
    if options.guidance != "none":
        raise ValueError("the KV sampler runs the distilled [klein] KV model: use guidance 'none'")
    if refs is None:
        raise ValueError("sample_kv needs reference tokens; without references use fluxjax.sample")
    noise, sigmas = start(params, config, options, txt, img_ids, refs, noise, seed, sigmas)
    return _denoise_kv(params, noise, jnp.asarray(txt), jnp.asarray(txt_ids), jnp.asarray(img_ids),
                       jnp.asarray(refs), sigmas, config=config, attn_impl=attn_impl)


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def _denoise_kv(params, noise, txt, txt_ids, img_ids, refs, sigmas, *, config, attn_impl):
    n_img = noise.shape[1]
    refs = jnp.broadcast_to(refs, (noise.shape[0], *refs.shape[1:]))
    noisy_ids, ref_ids = img_ids[:n_img], img_ids[n_img:]

    def t_of(sigma, x):
        return jnp.broadcast_to(model_timestep(sigma, x.dtype), x.shape[:1])

    v, cache = forward_kv_extract(params, config, noise, refs, txt, t_of(sigmas[0], noise), noisy_ids, ref_ids,
                                  txt_ids, attn_impl=attn_impl)
    x = euler_step(noise, v, sigmas[0], sigmas[1])

    def step(x, xs):
        sigma, sigma_next = xs
        v = forward_kv_cached(params, config, x, txt, t_of(sigma, x), noisy_ids, txt_ids, cache, attn_impl=attn_impl)
        return euler_step(x, v, sigma, sigma_next), None

    x, _ = jax.lax.scan(step, x, (sigmas[1:-1], sigmas[2:]))
    return x
