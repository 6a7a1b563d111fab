"""The sampler: schedule vs diffusers, latent parity with the diffusers FLUX.2 pipelines on tiny random
components, per-step interventions and captures, and one compiled program per structure."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

import fluxjax
from fluxjax import images, sampler
from fluxjax.interventions import BLOCK0_INPUT, Capture, Interventions, per_step, substitution
from fluxjax.schedule import compute_empirical_mu, flux2_sigmas
from flux2ref.folder import tiny_vae
from reference import (LATENT_TOL, TINY, diffusers_transformer, pipeline_encoder, pipeline_tokens, rel_err,
                       state_dict_numpy)


SCHEDULE_TOL = 1e-6  # the issue's bar; the port reproduces diffusers' float32 arithmetic (0 measured)
RECOMPILED_TOL = 1e-5  # fp32, the same computation compiled as one scan vs per-step jits: XLA fuses differently

KLEIN = dataclasses.replace(TINY, use_guidance_embed=False)  # in_channels 16 = 4 latent channels x 2x2
N_TXT = 32  # the pipelines pad prompts to 512; given embeddings may have any length, and short is fast
HEIGHT, WIDTH = 64, 96  # a 4 x 6 token grid


# --- tiny components --------------------------------------------------------------------------


def klein_pipeline(transformer, vae, is_distilled=True):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=None, tokenizer=None, transformer=transformer, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dev_pipeline(transformer, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                         text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pil_image(height, width, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def klein_latent_output(tokens, grid, vae):
    """What `Flux2KleinPipeline(output_type="latent")` returns for packed tokens, by the pipeline's own
    helpers: unpacked by ids, bn-denormalised and unpatchified to the VAE latent grid."""
    import torch
    from diffusers import Flux2KleinPipeline as P

    x = torch.from_numpy(np.array(tokens, np.float32))
    ids = P._prepare_latent_ids(torch.zeros(x.shape[0], x.shape[2], *grid))
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return P._unpatchify_latents(P._unpack_latents_with_ids(x, ids, *grid) * std + mean).numpy()


@pytest.fixture(scope="module")
def models():
    klein_t = diffusers_transformer(KLEIN, seed=1)
    dev_t = diffusers_transformer(TINY, seed=2)
    return dict(
        klein=(klein_t, _params(klein_t, KLEIN)),
        dev=(dev_t, _params(dev_t, TINY)),
        vae=tiny_vae(),
    )


@pytest.fixture(scope="module")
def klein_params():
    """Random [klein] parameters for the tests that need no PyTorch model (fluxjax's init rule)."""
    return fluxjax.init_params(KLEIN, jax.random.key(1))


def _params(module, config):
    from fluxjax.conversion.transformer import params_from_state

    return jax.tree_util.tree_map(jnp.asarray, params_from_state(state_dict_numpy(module), config, "diffusers"))


def _inputs(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    txt = rng.standard_normal((batch, N_TXT, KLEIN.context_in_dim)).astype(np.float32)
    grid = images.image_grid(HEIGHT, WIDTH)
    noise = rng.standard_normal((batch, KLEIN.in_channels, *grid)).astype(np.float32)  # pipeline layout
    return txt, noise, grid


# --- schedule -----------------------------------------------------------------------------------


@pytest.mark.parity
def test_schedule_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as reference_mu

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    worst = 0.0
    for seq_len in [64, 100, 256, 1000, 1024, 2048, 4096, 4300, 4301, 6000, 8192, 12000, 16384]:
        for steps in [1, 2, 3, 4, 5, 8, 10, 20, 28, 50]:
            mu = reference_mu(seq_len, steps)
            assert compute_empirical_mu(seq_len, steps) == pytest.approx(mu, abs=1e-12)
            scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            ours = flux2_sigmas(seq_len, steps)
            assert ours.shape == (steps + 1,)
            worst = max(worst, float(np.abs(ours - scheduler.sigmas.numpy()).max()))
            np.testing.assert_allclose(ours[:-1] * 1000, scheduler.timesteps.numpy(), rtol=0, atol=1e-3)
    assert worst <= SCHEDULE_TOL


def test_schedule_worked_values():
    # spec section 9: 1024^2 and 512^2 at 4 steps
    np.testing.assert_allclose(flux2_sigmas(4096, 4), [1, 0.967384, 0.908144, 0.767200, 0], atol=1e-6)
    np.testing.assert_allclose(flux2_sigmas(1024, 4), [1, 0.958085, 0.883982, 0.717497, 0], atol=1e-6)
    assert compute_empirical_mu(16384, 7) == pytest.approx(3.229986, abs=1e-6)


# --- bfloat16 precision chain (tight: bit for bit with torch, under jit) ----------------------------


def _bits(a):
    import torch
    return np.asarray(a.view(torch.int16).numpy() if isinstance(a, torch.Tensor) else np.asarray(a).view(np.int16))


@pytest.mark.parity
def test_bf16_timestep_chain_matches_pipeline():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    to_model = jax.jit(lambda s: sampler.model_timestep(s, jnp.bfloat16))
    for seq_len, steps in [(4096, 50), (1024, 4), (16384, 28), (64, 7)]:
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
        sigmas = flux2_sigmas(seq_len, steps)
        for i, t in enumerate(scheduler.timesteps):
            want = t.expand(1).to(torch.bfloat16) / 1000  # what the pipeline passes as `timestep`
            np.testing.assert_array_equal(_bits(to_model(sigmas[i:i + 1])), _bits(want))


@pytest.mark.parity
def test_bf16_euler_step_and_cfg_match_torch():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    v = (3 * torch.randn(4, 64, generator=g)).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(4, sigmas=np.linspace(1.0, 0.25, 4), mu=compute_empirical_mu(1024, 4))
    scheduler.set_begin_index(0)
    sigmas = flux2_sigmas(1024, 4)
    step = jax.jit(sampler.euler_step)
    xj, vj = (jnp.asarray(a.float().numpy()).astype(jnp.bfloat16) for a in (x, v))
    for i, t in enumerate(scheduler.timesteps):
        want = scheduler.step(v, t, x, return_dict=False)[0]
        assert want.dtype == torch.bfloat16
        np.testing.assert_array_equal(_bits(step(xj, vj, sigmas[i], sigmas[i + 1])), _bits(want))
    u = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    uj = jnp.asarray(u.float().numpy()).astype(jnp.bfloat16)
    for scale in [4.3, 1.7, 7.123]:  # not representable in bfloat16
        want = u + scale * (v - u)
        np.testing.assert_array_equal(_bits(jax.jit(sampler.cfg_combine)(vj, uj, scale)), _bits(want))


# --- pipeline parity ----------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("ref_sizes", [(), ((64, 80),), ((64, 80), (96, 64))], ids=["t2i", "1ref", "2refs"])
def test_klein_pipeline_parity(models, ref_sizes):
    import torch
    transformer, params = models["klein"]
    vae = models["vae"]
    pipe = klein_pipeline(transformer, vae)
    txt, noise, grid = _inputs()
    refs_pil = [pil_image(h, w, seed=i) for i, (h, w) in enumerate(ref_sizes)]

    with torch.no_grad():
        expected = pipe(image=refs_pil or None, prompt_embeds=torch.from_numpy(txt), height=HEIGHT, width=WIDTH,
                        num_inference_steps=4, guidance_scale=1.0, latents=torch.from_numpy(noise),
                        output_type="latent").images.numpy()

    refs, ref_grids = (None, ())
    if refs_pil:
        refs, ref_grids = images.reference_tokens(refs_pil, pipeline_encoder(pipe))
    layout = images.reference_layout(N_TXT, grid, ref_grids)
    latents, _ = fluxjax.sample(params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids(),
                                noise=pipeline_tokens(noise), refs=refs)
    got = klein_latent_output(latents, grid, vae)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= LATENT_TOL


@pytest.mark.parity
def test_klein_base_cfg_parity(models):
    import torch
    transformer, params = models["klein"]
    pipe = klein_pipeline(transformer, models["vae"], is_distilled=False)
    txt, noise, grid = _inputs()
    uncond = np.random.default_rng(7).standard_normal(txt.shape).astype(np.float32)
    with torch.no_grad():
        expected = pipe(prompt_embeds=torch.from_numpy(txt), negative_prompt_embeds=torch.from_numpy(uncond),
                        height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=3.5,
                        latents=torch.from_numpy(noise), output_type="latent").images.numpy()
    layout = fluxjax.TokenLayout(N_TXT, grid)
    options = sampler.SamplerOptions(num_steps=4, guidance="cfg", guidance_scale=3.5)
    latents, _ = fluxjax.sample(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(),
                                noise=pipeline_tokens(noise), uncond_txt=uncond)
    assert rel_err(klein_latent_output(latents, grid, models["vae"]), expected) <= LATENT_TOL


@pytest.mark.parity
def test_dev_pipeline_embedded_guidance_parity(models):
    import torch
    transformer, params = models["dev"]
    vae = models["vae"]
    pipe = dev_pipeline(transformer, vae)
    txt, noise, grid = _inputs(batch=2, seed=3)
    ref = pil_image(80, 64, seed=5)
    with torch.no_grad():
        expected = pipe(image=ref, prompt_embeds=torch.from_numpy(txt), height=HEIGHT, width=WIDTH,
                        num_inference_steps=4, guidance_scale=2.5, latents=torch.from_numpy(noise),
                        output_type="latent").images.numpy()
    # Flux2Pipeline returns the packed, bn-normalised tokens for output_type="latent".
    refs, ref_grids = images.reference_tokens([ref], pipeline_encoder(pipe))
    layout = images.reference_layout(N_TXT, grid, ref_grids)
    options = sampler.SamplerOptions(num_steps=4, guidance="embedded", guidance_scale=2.5)
    latents, _ = fluxjax.sample(params, TINY, options, txt, layout.txt_ids(), layout.img_ids(),
                                noise=pipeline_tokens(noise), refs=refs)
    assert expected.shape == latents.shape
    assert rel_err(latents, expected) <= LATENT_TOL


# --- sampler mechanics --------------------------------------------------------------------------


def _python_loop(params, config, txt, layout, noise, refs, sigmas, per_step_iv):
    """The sampler written as a plain loop of forwards, the reading the scan must reproduce."""
    x = jnp.asarray(noise)
    n_img = layout.n_img
    model = jax.jit(lambda x, t, iv: fluxjax.forward(params, config, jnp.concatenate([x, refs], 1), txt, t,
                                                     layout.img_ids(), layout.txt_ids(), interventions=iv))
    for s in range(len(sigmas) - 1):
        t = jnp.full((x.shape[0],), sampler.model_timestep(jnp.float32(sigmas[s]), x.dtype))
        v = model(x, t, per_step_iv(s))[0][:, :n_img]
        x = sampler.euler_step(x, v, jnp.float32(sigmas[s]), jnp.float32(sigmas[s + 1]))
    return x


def _edit_setup(params_batch=1):
    rng = np.random.default_rng(11)
    layout = fluxjax.TokenLayout(N_TXT, (2, 3), ref_grids=((2, 2),))
    txt = rng.standard_normal((params_batch, N_TXT, KLEIN.context_in_dim)).astype(np.float32)
    refs = rng.standard_normal((params_batch, layout.n_ref, KLEIN.in_channels)).astype(np.float32)
    noise = rng.standard_normal((params_batch, layout.n_img, KLEIN.in_channels)).astype(np.float32)
    return layout, txt, refs, noise


def test_per_step_substitution_equals_python_loop(klein_params):
    params = klein_params
    layout, txt, refs, noise = _edit_setup()
    steps = 2
    options = sampler.SamplerOptions(num_steps=steps)
    values = np.random.default_rng(2).standard_normal((steps, 1, N_TXT, KLEIN.hidden_size)).astype(np.float32)
    mask = np.zeros((1, N_TXT), bool)
    mask[:, 8:24] = True
    iv = Interventions(substitutions=(substitution(3, per_step(values), per_step(np.broadcast_to(mask, (steps, 1, N_TXT)))),))
    got, _ = fluxjax.sample(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), noise=noise, refs=refs,
                         interventions=iv)
    sigmas = flux2_sigmas(layout.n_img, steps)
    want = _python_loop(params, KLEIN, txt, layout, noise, refs, sigmas,
                        lambda s: Interventions(substitutions=(substitution(3, values[s], mask),)))
    assert rel_err(got, want) <= RECOMPILED_TOL
    # the step axis is honoured: the same values in another order give another result
    shuffled = Interventions(substitutions=(substitution(3, per_step(values[::-1].copy()),
                                                         per_step(np.broadcast_to(mask, (steps, 1, N_TXT)))),))
    other, _ = fluxjax.sample(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), noise=noise, refs=refs,
                           interventions=shuffled)
    assert rel_err(other, got) > 1e-3


def test_captures_are_per_step_and_self_patching_is_identity(klein_params):
    params = klein_params
    layout, txt, refs, noise = _edit_setup()
    options = sampler.SamplerOptions(num_steps=2)
    args = (params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids())
    plain, _ = fluxjax.sample(*args, noise=noise, refs=refs)
    source, caps = fluxjax.sample(*args, noise=noise, refs=refs, capture=Capture(text=(BLOCK0_INPUT, 1, 4)))
    np.testing.assert_array_equal(np.asarray(source), np.asarray(plain))  # capturing changes nothing
    assert caps.text.shape == (2, 3, 1, N_TXT, KLEIN.hidden_size)  # [S, sites, B, T, D]
    assert caps.image is None
    # the text stream differs between steps (the modulation depends on t), so the axis is real
    assert rel_err(caps.text[0, 2], caps.text[1, 2]) > 1e-3
    patched, _ = fluxjax.sample(*args, noise=noise, refs=refs,
                                interventions=Interventions(substitutions=(substitution(1, per_step(caps.text[:, 1])),)))
    np.testing.assert_array_equal(np.asarray(patched), np.asarray(plain))


def test_one_compiled_program_across_seeds_and_values(klein_params):
    params = klein_params
    layout, txt, refs, _ = _edit_setup()
    options = sampler.SamplerOptions(num_steps=2)
    mask = np.ones((2, 1, N_TXT), bool)

    def run(seed, value, scale):
        iv = Interventions(substitutions=(substitution(KLEIN.num_blocks - 1, per_step(np.full(
            (2, 1, N_TXT, KLEIN.hidden_size), value, np.float32)), per_step(mask)),))
        opts = dataclasses.replace(options, guidance_scale=scale)
        return fluxjax.sample(params, KLEIN, opts, txt, layout.txt_ids(), layout.img_ids(), seed=seed, refs=refs,
                              interventions=iv)[0]

    first = run(0, 0.0, 1.0)
    before = sampler._denoise._cache_size()
    outs = [run(seed, value, scale) for seed, value, scale in [(1, 0.0, 1.0), (2, 0.5, 1.0), (2**32 - 1, -1.0, 2.0)]]
    assert sampler._denoise._cache_size() == before  # no retrace
    assert rel_err(outs[0], first) > 1e-2  # the seed matters
    assert rel_err(outs[1], outs[0]) > 1e-3  # so do the values
    # a new capture spec (a structure no other test uses) compiles once more
    fluxjax.sample(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), seed=0, refs=refs,
                   capture=Capture(image=(0, 3)))
    assert sampler._denoise._cache_size() == before + 1


def test_seed_noise_is_deterministic_and_per_sample():
    a = sampler.initial_noise(123, 2, 6, 16)
    b = sampler.initial_noise([123, 7], 2, 6, 16)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(sampler.initial_noise(123, 2, 6, 16)))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(a[1]))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(b[0]), np.asarray(b[1]))
    assert abs(float(jnp.std(sampler.initial_noise(0, 1, 4096, 16))) - 1) < 0.02
    with pytest.raises(ValueError, match="2\\*\\*32"):
        sampler.initial_noise(-1, 1, 4, 4)


def test_argument_errors(klein_params):
    params = klein_params
    layout, txt, refs, noise = _edit_setup()
    args = (params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids())
    with pytest.raises(ValueError, match="exactly one"):
        fluxjax.sample(*args, refs=refs)
    with pytest.raises(ValueError, match="uncond_txt"):
        fluxjax.sample(params, KLEIN, sampler.KLEIN_BASE, txt, layout.txt_ids(), layout.img_ids(), seed=0, refs=refs)
    with pytest.raises(ValueError, match="guidance embedder"):
        fluxjax.sample(params, KLEIN, sampler.DEV, txt, layout.txt_ids(), layout.img_ids(), seed=0, refs=refs)
    bad = Interventions(substitutions=(substitution(1, per_step(np.zeros((3, 1, N_TXT, KLEIN.hidden_size), np.float32))),))
    with pytest.raises(ValueError, match="step axis of 3"):
        fluxjax.sample(*args, seed=0, refs=refs, interventions=bad)
    with pytest.raises(ValueError, match="per_step"):  # a step axis is never guessed from the rank
        substitution(1, np.zeros((2, 1, N_TXT, KLEIN.hidden_size), np.float32))
    stepped = Interventions(substitutions=(substitution(1, per_step(np.zeros((2, 1, N_TXT, KLEIN.hidden_size),
                                                                             np.float32))),))
    with pytest.raises(ValueError, match="PerStep"):  # one step's forward takes no per-step value
        fluxjax.forward(params, KLEIN, np.zeros((1, layout.n_image_stream, KLEIN.in_channels), np.float32), txt,
                        np.zeros(1, np.float32), layout.img_ids(), layout.txt_ids(), interventions=stepped)
    with pytest.raises(ValueError, match="guidance mode"):
        sampler.SamplerOptions(guidance="true-cfg")
