"""The FLUX.2 flow-matching Euler sampler, the whole denoising loop compiled as one program.

    options = fluxjax.sampler.KLEIN_DISTILLED               # 4 steps, no guidance
    latents, _ = fluxjax.sample(params, config, options, txt, layout.txt_ids(), layout.img_ids(),
                                seed=1234, refs=ref_tokens)

Rectified flow (spec section 9): x_t = (1 - t) x_0 + t eps, the model predicts v ~ eps - x_0, and
each step moves x from sigma_i to sigma_{i+1} by x += (sigma_{i+1} - sigma_i) v, from t = 1 to 0.
The steps run under `lax.scan` inside one `jit`: one compile per (shapes, options, intervention
structure, capture spec), reused across seeds, noise, prompts, guidance scales and intervention
values.

Latents are packed tokens [B, N_img, in_channels] in the bn-normalised, 2x2-patchified latent
space: exactly what `Flux2Pipeline(output_type="latent")` returns. `Flux2KleinPipeline` and
`Flux2KleinKVPipeline` return instead the de-normalised, unpatchified VAE latents [B, c, H/8, W/8],
channels-first; `fluxjax.vae.diffusers_latents(vae_params, vae_config, latents, grid)` gives that
array. Reference tokens are context only: they are concatenated after the noisy tokens at every
step, never updated, and only the first N_img predictions are used.

Per-step interventions: a value wrapped in `fluxjax.interventions.per_step` carries a leading step
axis [S] (a substitution value [S, B, T, D], a knockout [S, ...], ...); step s then sees slice s.
Everything not wrapped is shared by every step. Captures come back with a leading step axis, so a
source run's `per_step(captures.text[:, j])` ([S, B, T, D]) is directly the per-step substitution
value of a target run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.captures import Capture, Captures, as_capture
from fluxjax.config import Flux2Config
from fluxjax.flow import TokenGroups, check_knockout_groups
from fluxjax.interventions import Interventions, check_sites, is_per_step
from fluxjax.model import forward
from fluxjax.options import RuntimeOptions, runtime_options
from fluxjax.schedule import NUM_TRAIN_TIMESTEPS, flux2_sigmas

GUIDANCE_MODES = ("none", "embedded", "cfg")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """Static sampler options.

    guidance:
        "none"      [klein] distilled: one forward per step, no guidance input.
        "embedded"  [dev]: the scale goes through the guidance embedder (as 1000 g); one forward.
        "cfg"       [klein] base: true classifier-free guidance against the empty-prompt
                    embeddings, v = v_u + g (v_c - v_u); two forwards per step.
    guidance_scale: g. It enters the compiled program as a value: changing it does not recompile.
    Note: diffusers switches CFG off when g <= 1; here "cfg" always applies the formula.
    """

    num_steps: int = 4
    guidance: str = "none"
    guidance_scale: float = 1.0

    def __post_init__(self):
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance mode {self.guidance!r}; use one of {GUIDANCE_MODES}")


KLEIN_DISTILLED = SamplerOptions(num_steps=4, guidance="none", guidance_scale=1.0)
KLEIN_BASE = SamplerOptions(num_steps=50, guidance="cfg", guidance_scale=4.0)
DEV = SamplerOptions(num_steps=50, guidance="embedded", guidance_scale=4.0)


def initial_noise(seed, batch: int, num_tokens: int, channels: int, dtype=jnp.float32):
    """N(0, 1) packed noise [batch, num_tokens, channels] from integer seeds, with JAX's PRNG.

    seed: an int in [0, 2**32) (every sample gets the same noise) or one per sample [batch]. The
    noise of a sample depends only on its seed and shape, not on its batch mates. It is drawn in
    float32 and rounded to `dtype`, so a bfloat16 run starts from the rounded float32 noise.
    (The torch generators of the references draw different numbers; no port can match them.)
    """
    seeds = np.asarray(seed, dtype=np.int64)
    if seeds.ndim == 0:
        seeds = np.full(batch, seeds)
    if seeds.shape != (batch,):
        raise ValueError(f"seed must be one int or one per sample ({batch}), got shape {seeds.shape}")
    if (seeds < 0).any() or (seeds >= 2**32).any():
        raise ValueError("seeds must lie in [0, 2**32), e.g. zlib.crc32 values")
    return _noise(jnp.asarray(seeds.astype(np.uint32)), num_tokens, channels, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _noise(seeds, num_tokens, channels, dtype):
    draw = lambda s: jax.random.normal(jax.random.key(s), (num_tokens, channels), jnp.float32)
    return jax.vmap(draw)(seeds).astype(dtype)


def _rounded(x, dtype):
    """float32 x rounded to `dtype`, kept in float32. The rounding is explicit because under jit XLA
    may drop a float32 -> bfloat16 -> float32 round trip as excess precision."""
    f = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=f.nexp, mantissa_bits=f.nmant)


def model_timestep(sigma, dtype):
    """The timestep the pipelines feed the model for `sigma` (in [0, 1]), in `dtype`.

    diffusers: the scheduler's timestep sigma * 1000 (float32) is cast to the latents' dtype and
    divided by 1000 in that dtype (a Python scalar: computed in float32, rounded once); the
    transformer casts again and multiplies by 1000. In float32 this is 1000 sigma up to rounding;
    in bfloat16 it quantises t (spec section 9).
    """
    t = _rounded(jnp.asarray(sigma, jnp.float32) * NUM_TRAIN_TIMESTEPS, dtype)
    return _rounded(t / NUM_TRAIN_TIMESTEPS, dtype).astype(dtype)


def euler_step(x, v, sigma, sigma_next):
    """x + (sigma_next - sigma) v with diffusers' precision chain (`FlowMatchEulerDiscreteScheduler.step`).

    The sample is upcast to float32. dt is a 0-dim float32 tensor, which torch rounds to v's dtype
    before the product, and the product is rounded to v's dtype (measured on CPU, torch 2.13); the
    float32 sum is cast back to v's dtype.
    """
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    update = _rounded(_rounded(dt, v.dtype) * v.astype(jnp.float32), v.dtype)
    return (x.astype(jnp.float32) + update).astype(v.dtype)


def cfg_combine(v_cond, v_uncond, scale):
    """diffusers' `neg + g * (pred - neg)` in the model dtype with g a Python float: every operation
    rounds to that dtype, and g itself is not rounded (torch keeps Python scalars in float32)."""
    dtype = v_cond.dtype
    diff = _rounded(v_cond.astype(jnp.float32) - v_uncond.astype(jnp.float32), dtype)
    return (v_uncond.astype(jnp.float32) + _rounded(jnp.asarray(scale, jnp.float32) * diff, dtype)).astype(dtype)


def check_step_axes(interventions: Interventions | None, num_steps: int) -> None:
    """Raise unless every `PerStep` value of `interventions` has a leading axis of `num_steps`."""
    leaves = jax.tree_util.tree_flatten_with_path(interventions, is_leaf=is_per_step)[0]
    for path, node in leaves:
        if not is_per_step(node):
            continue
        for array in jax.tree_util.tree_leaves(node.value):
            if np.ndim(array) == 0 or np.shape(array)[0] != num_steps:
                axis = np.shape(array)[0] if np.ndim(array) else "none"
                raise ValueError(f"per-step intervention value {jax.tree_util.keystr(path)} has a step axis of "
                                 f"{axis}, but the sampler runs {num_steps} steps")


def step_slices(interventions):
    """(the arrays of every `PerStep` value of `interventions`, each [S, ...], to scan along the steps;
    at_step(slices) -> the interventions of one step, every PerStep replaced by its slice)."""
    nodes, treedef = jax.tree_util.tree_flatten(interventions, is_leaf=is_per_step)
    per_step = [n.value for n in nodes if is_per_step(n)]

    def at_step(step_values):
        it = iter(step_values)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if is_per_step(n) else n for n in nodes])

    return per_step, at_step


def start(params, config: Flux2Config, options: SamplerOptions, txt, img_ids, refs, noise, seed, sigmas):
    """The checked initial latents [B, N_img, in_channels] (model dtype) and float32 sigmas
    [num_steps + 1] of a sampler run (arguments as `sample`)."""
    batch = txt.shape[0]
    n_ref = 0 if refs is None else refs.shape[1]
    n_img = np.shape(img_ids)[-2] - n_ref
    if n_img <= 0:
        raise ValueError(f"img_ids has {np.shape(img_ids)[-2]} rows for {n_ref} reference tokens: it must list the "
                         f"noisy-image tokens first, then the references")
    if (noise is None) == (seed is None):
        raise ValueError("pass exactly one of `noise` (explicit initial latents) or `seed`")
    if noise is None:
        noise = initial_noise(seed, batch, n_img, config.in_channels, params.img_in.dtype)
    if tuple(noise.shape) != (batch, n_img, config.in_channels):
        raise ValueError(f"noise must be [B, N_img, in_channels] = {(batch, n_img, config.in_channels)}, "
                         f"got {tuple(noise.shape)}")
    if sigmas is None:
        sigmas = flux2_sigmas(n_img, options.num_steps)
    if np.shape(sigmas) != (options.num_steps + 1,):
        raise ValueError(f"sigmas must have num_steps + 1 = {options.num_steps + 1} entries, got {np.shape(sigmas)}")
    return jnp.asarray(noise).astype(params.img_in.dtype), jnp.asarray(sigmas, jnp.float32)


def sample(params, config: Flux2Config, options: SamplerOptions, txt, txt_ids, img_ids, *, noise=None, seed=None,
           refs=None, uncond_txt=None, interventions: Interventions | None = None,
           capture: Capture | None = None, sigmas=None, runtime: RuntimeOptions | None = None,
           attn_impl: str | None = None, groups: TokenGroups | None = None):
    """Denoise from noise to clean latents.

    params, config: the transformer. txt: [B, T, C] prompt embeddings; txt_ids: int [T, 4].
    img_ids: int [N_img + N_ref, 4], position ids of the noisy tokens then the references
    (`TokenLayout.img_ids()`). noise: [B, N_img, in_channels], or seed: int or [B] ints
    (`initial_noise`); exactly one of the two. refs: None or [B or 1, N_ref, in_channels] clean
    reference tokens (`fluxjax.images.reference_tokens`). uncond_txt: [B, T, C] empty-prompt
    embeddings, required by guidance "cfg". interventions: applied to every forward of every step
    (both CFG branches, as a module hook in the reference would be); `per_step` values give each
    step its own slice (module docstring). capture: static spec (or sites); captures come from the
    conditional branch. sigmas: float32 [num_steps + 1] to override the FLUX.2 schedule of N_img
    tokens. runtime: the attention kernel (`fluxjax.RuntimeOptions`; `attn_impl=` is the older
    spelling). groups: every token's group (`fluxjax.token_groups(layout, content_mask)`), for a
    capture of the attention flow (`fluxjax.flow`).

    Latents live in the model's dtype (diffusers keeps them in the prompt embeddings' dtype, the
    same one whenever the embeddings are in the model dtype, as the pipelines produce them).
    Returns (latents [B, N_img, in_channels], Captures whose arrays have a leading [num_steps] axis;
    empty where nothing was asked for).
    """
    if options.guidance == "cfg" and uncond_txt is None:
        raise ValueError("guidance 'cfg' needs `uncond_txt`, the empty-prompt embeddings")
    if options.guidance == "embedded" and not config.use_guidance_embed:
        raise ValueError("guidance 'embedded' needs a model with a guidance embedder ([dev]); use 'none' or 'cfg'")
    noise, sigmas = start(params, config, options, txt, img_ids, refs, noise, seed, sigmas)
    check_step_axes(interventions, options.num_steps)
    check_sites(interventions, config)  # before compiling: inside, a site is a traced value
    capture = as_capture(capture)
    capture.validate(config)
    if capture.flow is not None:  # concrete here; inside the program they are traced
        check_knockout_groups(getattr(interventions, "knockout", None), groups)
    return _denoise(params, noise, jnp.asarray(txt), jnp.asarray(txt_ids),
                    jnp.asarray(img_ids), None if refs is None else jnp.asarray(refs),
                    None if uncond_txt is None else jnp.asarray(uncond_txt), sigmas,
                    jnp.asarray(options.guidance_scale, jnp.float32), interventions, groups,
                    config=config, guidance=options.guidance, capture=capture,
                    runtime=runtime_options(runtime, attn_impl))


@functools.partial(jax.jit, static_argnames=("config", "guidance", "capture", "runtime"))
def _denoise(params, noise, txt, txt_ids, img_ids, refs, uncond_txt, sigmas, guidance_scale, interventions, groups,
             *, config, guidance, capture, runtime):
    n_img, n_ref = noise.shape[1], 0 if refs is None else refs.shape[1]
    if refs is not None:  # the same clean references for every sample unless given per sample
        refs = jnp.broadcast_to(refs, (noise.shape[0], *refs.shape[1:])).astype(noise.dtype)
    per_step, at_step = step_slices(interventions)  # scanned along the steps

    def predict(x, text, t, iv, cap):
        model_in = x if refs is None else jnp.concatenate([x, refs], axis=1)
        g = jnp.full(x.shape[:1], guidance_scale) if guidance == "embedded" else None
        out, caps = forward(params, config, model_in, text, t, img_ids, txt_ids, g, interventions=iv, capture=cap,
                            num_ref_tokens=n_ref, runtime=runtime, groups=groups)
        return out[:, :n_img], caps

    def step(x, xs):
        sigma, sigma_next, step_leaves = xs
        iv = at_step(step_leaves)
        t = jnp.broadcast_to(model_timestep(sigma, x.dtype), x.shape[:1])
        v, caps = predict(x, txt, t, iv, capture)
        if guidance == "cfg":
            v_u, _ = predict(x, uncond_txt, t, iv, None)
            v = cfg_combine(v, v_u, guidance_scale)
        return euler_step(x, v, sigma, sigma_next), caps

    return jax.lax.scan(step, noise, (sigmas[:-1], sigmas[1:], per_step))
