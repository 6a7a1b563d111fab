"""The [klein] 9B KV variant: reference keys and values computed once, then reused (spec 3.8, 10).

Two forward modes (diffusers `Flux2Transformer2DModel.forward(kv_cache_mode=...)`, BFL
`forward_kv_extract` / `forward_kv_cached`), both configurations of the one block runner
(`fluxjax.runner`):

    extract  the joint sequence [text, img, refs]. Text and image queries attend to every key;
             reference queries attend to reference keys only (all references together), a knockout
             table combined with any the caller gives. The references are modulated with the vec
             of t_ref = 0 (image-stream double modulation, and the single modulation at reference
             positions); text and the final layer use the current t. Returns the prediction for the
             noisy tokens and, per block, the references' keys and values after QK-norm and RoPE.
    cached   the joint sequence [text, img]; every block's keys and values get the cached
             references' appended: keys [text, img, cached refs].

diffusers orders the extract sequence [text, refs, img]; the order of keys does not change
attention (a sum over them) beyond float rounding, and this one is the standard forward's.

The cache is exact: the references never see text or x_t and use a fixed t, so their keys and
values are the same at every step. `sample_kv` runs the `Flux2KleinKVPipeline` loop as one
program: step 0 extracts, steps 1.. reuse the cache.

Interventions: both modes take every intervention of the standard forward, and one
`Interventions` serves a whole KV run. Text and image sites act in every step. Reference sites
exist only where the references are tokens, in extract mode: what a substitution there does is in
the cache, so the cached forward accepts it and has nothing left to apply (and captures no
reference site). A knockout is built from the layout with the references (`TokenLayout.img_ids()`
order): in cached mode its reference groups are the cached keys'; edges into the references act at
extraction. `DropReference` from block k removes the references' tokens (extract) or their cached
keys (cached) from block k on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.blocks import Modulations
from fluxjax.captures import Capture, Captures, as_capture
from fluxjax.config import Flux2Config
from fluxjax.interventions import Interventions, Knockout, check_sites, validate
from fluxjax.layout import IMAGE, TEXT_PADDING
from fluxjax.model import conditioning, embed, final_layer, modulations, positions, scale_timestep
from fluxjax.options import RuntimeOptions, runtime_options
from fluxjax.runner import run_blocks
from fluxjax.sampler import SamplerOptions, check_step_axes, euler_step, model_timestep, start, step_slices
from fluxjax.sites import Lanes

REFERENCES = 3  # the first reference group of `fluxjax.layout` (text content, text padding, image, ref[0], ...)


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


def _references_read_references(knockout: Knockout | None, config: Flux2Config, lanes: Lanes) -> Knockout:
    """`knockout` and the extract mode's own table (reference queries read reference keys only),
    in every block; without a knockout, a table over text, image and one reference group."""
    if knockout is None:
        groups = np.concatenate([np.full(lanes.n_txt, TEXT_PADDING), np.full(lanes.n_img, IMAGE),
                                 np.full(lanes.n_ref, REFERENCES)]).astype(np.int32)[None]
        knockout = Knockout(allowed=jnp.ones((config.num_blocks, REFERENCES + 1, REFERENCES + 1), bool),
                            groups=jnp.asarray(groups), stream_counts=(lanes.n_img, lanes.n_ref))
    G = knockout.allowed.shape[-1]
    is_ref = np.arange(G) >= REFERENCES
    own = ~(is_ref[:, None] & ~is_ref[None, :])  # [G, G]
    return knockout.replace(allowed=jnp.logical_and(knockout.allowed, own))


def _no_flow(capture: Capture) -> None:
    if capture.flow is not None:
        raise ValueError("the KV forwards do not measure attention flow; measure it with fluxjax.forward or "
                         "fluxjax.sample (Capture(flow=...), groups=...)")


def forward_kv_extract(params, config: Flux2Config, img, refs, txt, timestep, img_ids, ref_ids, txt_ids,
                       guidance=None, *, ref_timestep: float = 0.0, interventions: Interventions | None = None,
                       capture: Capture | None = None, runtime: RuntimeOptions | None = None):
    """Extract mode. img: [B, N_img, in]; refs: [B, N_ref, in]; txt: [B, T, C]; timestep: [B];
    img_ids: int [N_img, 4]; ref_ids: int [N_ref, 4]; txt_ids: int [T, 4]. interventions, capture,
    runtime: as `fluxjax.forward` (the references are the image stream's last N_ref tokens).

    Returns (prediction [B, N_img, out_channels], KVCache, Captures).
    """
    runtime = runtime_options(runtime)
    iv, cap = interventions or Interventions(), as_capture(capture)
    dtype = params.img_in.dtype
    n_txt, n_ref, n_img = txt.shape[1], refs.shape[1], img.shape[1]
    lanes = Lanes(n_txt, n_img, n_ref)
    validate(iv, cap, config, img.shape[0], lanes, True, dtype)
    _no_flow(cap)
    s, g = scale_timestep(timestep, dtype), _guidance(guidance, dtype)
    vec = conditioning(params, config, s, g)
    # diffusers: torch.full_like(timestep * 1000, ref_fixed_timestep * 1000), in the model dtype
    ref_vec = conditioning(params, config, jnp.full_like(s, ref_timestep * 1000), g)
    mods, ref_mods = modulations(params, vec), modulations(params, ref_vec)
    per_token = Modulations(
        img=tuple(tuple(_per_token(m, r, n_img, n_ref) for m, r in zip(ms, rs))
                  for ms, rs in zip(mods.img, ref_mods.img)),  # image stream [img, refs]
        txt=mods.txt,
        single=tuple(_per_token(m, r, n_txt + n_img, n_ref) for m, r in zip(mods.single, ref_mods.single)))

    x, c = embed(params, jnp.concatenate([img.astype(dtype), refs.astype(dtype)], axis=1), txt)
    rope = positions(config, txt_ids, jnp.concatenate([jnp.asarray(img_ids), jnp.asarray(ref_ids)], axis=0))
    iv = iv.replace(knockout=_references_read_references(iv.knockout, config, lanes))
    z, captures, (double, single) = run_blocks(params, config, c, x, per_token, rope, lanes, iv, cap, runtime,
                                               keep_kv=True)
    out = final_layer(params, vec, z[:, n_txt:n_txt + n_img])  # the final layer uses the current t
    return out, KVCache(double_k=double[0], double_v=double[1], single_k=single[0], single_v=single[1]), captures


def forward_kv_cached(params, config: Flux2Config, img, txt, timestep, img_ids, txt_ids, cache: KVCache,
                      guidance=None, *, interventions: Interventions | None = None, capture: Capture | None = None,
                      runtime: RuntimeOptions | None = None):
    """Cached mode: the standard forward on [text, img], every block's keys and values followed by
    the cached references'. Returns ([B, N_img, out_channels], Captures)."""
    runtime = runtime_options(runtime)
    iv, cap = interventions or Interventions(), as_capture(capture)
    dtype = params.img_in.dtype
    n_txt = txt.shape[1]
    lanes = Lanes(n_txt, img.shape[1], 0)
    validate(iv, cap, config, img.shape[0], lanes, True, dtype, cached_refs=cache.num_ref_tokens)
    _no_flow(cap)
    vec = conditioning(params, config, scale_timestep(timestep, dtype), _guidance(guidance, dtype))
    x, c = embed(params, img, txt)
    z, captures, _ = run_blocks(params, config, c, x, modulations(params, vec), positions(config, txt_ids, img_ids),
                                lanes, iv, cap, runtime,
                                cache=((cache.double_k, cache.double_v), (cache.single_k, cache.single_v)))
    return final_layer(params, vec, z[:, n_txt:]), captures


def sample_kv(params, config: Flux2Config, options: SamplerOptions, txt, txt_ids, img_ids, refs, *, noise=None,
              seed=None, sigmas=None, interventions: Interventions | None = None, capture: Capture | None = None,
              runtime: RuntimeOptions | None = None):
    """The `Flux2KleinKVPipeline` loop: step 0 in extract mode, later steps from the cache.

    Arguments as `fluxjax.sample` (img_ids lists the noisy tokens, then the references, as
    `TokenLayout.img_ids()`); refs: [B or 1, N_ref, in_channels] is required (without references
    use `fluxjax.sample`). Only guidance "none" (the KV checkpoint is distilled). interventions:
    every step's (`per_step` values: step s sees slice s; the cache is extracted with step 0's);
    capture: text and image sites only (the cached steps have no reference tokens). Returns
    (latents [B, N_img, in_channels], Captures with a leading [num_steps] axis).
    """
    if options.guidance != "none":
        raise ValueError("the KV sampler runs the distilled [klein] KV model: use guidance 'none'")
    if refs is None:
        raise ValueError("sample_kv needs reference tokens; without references use fluxjax.sample")
    capture = as_capture(capture)
    capture.validate(config)
    if any(s.stream == "reference" for s in capture.sites) or (capture.image and capture.image_tokens is None):
        raise ValueError("the KV sampler's cached steps have no reference tokens: capture text and image sites "
                         "(and older image captures with image_tokens=layout.n_img)")
    noise, sigmas = start(params, config, options, txt, img_ids, refs, noise, seed, sigmas)
    check_step_axes(interventions, options.num_steps)
    check_sites(interventions, config)
    return _denoise_kv(params, noise, jnp.asarray(txt), jnp.asarray(txt_ids), jnp.asarray(img_ids),
                       jnp.asarray(refs), sigmas, interventions, config=config, capture=capture,
                       runtime=runtime_options(runtime))


@functools.partial(jax.jit, static_argnames=("config", "capture", "runtime"))
def _denoise_kv(params, noise, txt, txt_ids, img_ids, refs, sigmas, interventions, *, config, capture, runtime):
    n_img = noise.shape[1]
    refs = jnp.broadcast_to(refs, (noise.shape[0], *refs.shape[1:]))
    noisy_ids, ref_ids = img_ids[:n_img], img_ids[n_img:]
    per_step, at_step = step_slices(interventions)

    def t_of(sigma, x):
        return jnp.broadcast_to(model_timestep(sigma, x.dtype), x.shape[:1])

    v, cache, first = forward_kv_extract(params, config, noise, refs, txt, t_of(sigmas[0], noise), noisy_ids, ref_ids,
                                         txt_ids, interventions=at_step([a[0] for a in per_step]), capture=capture,
                                         runtime=runtime)
    x = euler_step(noise, v, sigmas[0], sigmas[1])

    def step(x, xs):
        sigma, sigma_next, step_leaves = xs
        v, caps = forward_kv_cached(params, config, x, txt, t_of(sigma, x), noisy_ids, txt_ids, cache,
                                    interventions=at_step(step_leaves), capture=capture, runtime=runtime)
        return euler_step(x, v, sigma, sigma_next), caps

    x, rest = jax.lax.scan(step, x, (sigmas[1:-1], sigmas[2:], [a[1:] for a in per_step]))
    captures = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
    return x, captures
