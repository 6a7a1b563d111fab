"""The [klein] KV variant: extract and cached forwards vs diffusers' `kv_cache_mode="extract"` /
`"cached"`, the cached sampler vs `Flux2KleinKVPipeline` (fp32 on tiny random components), and the
KV path with interventions against the full forward with the same interventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import diffusers_transformer, pipeline_encoder, pipeline_tokens, rel_err
from test_sampler import HEIGHT, KLEIN, LATENT_TOL, N_TXT, WIDTH, _params, klein_latent_output, pil_image, tiny_vae

import fluxjax
from fluxjax import images, kv, sampler

FORWARD_TOL = 1e-5  # fp32 forward: the transformer parity floor (sinusoid arguments, RoPE angles) is ~1e-6


@pytest.fixture(scope="module")
def model():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    module = diffusers_transformer(KLEIN, seed=4)
    for block in module.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in module.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return module, _params(module, KLEIN)


@pytest.fixture(scope="module")
def params():
    """Random [klein] parameters for the tests that need no PyTorch model (fluxjax's init rule)."""
    return fluxjax.init_params(KLEIN, jax.random.key(4))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    layout = fluxjax.TokenLayout(N_TXT, (3, 4), ref_grids=((2, 3), (3, 2)))
    img = rng.standard_normal((2, layout.n_img, KLEIN.in_channels)).astype(np.float32)
    refs = rng.standard_normal((2, layout.n_ref, KLEIN.in_channels)).astype(np.float32)
    txt = rng.standard_normal((2, N_TXT, KLEIN.context_in_dim)).astype(np.float32)
    ids = layout.img_ids()
    return layout, img, refs, txt, ids[:layout.n_img], ids[layout.n_img:]


@pytest.mark.parity
def test_extract_matches_diffusers(model):
    import torch
    module, params = model
    layout, img, refs, txt, img_ids, ref_ids = _inputs()
    t = np.array([0.7, 0.7], np.float32)
    with torch.no_grad():
        want, cache = module(torch.from_numpy(np.concatenate([refs, img], 1)), torch.from_numpy(txt),
                             torch.from_numpy(t), torch.from_numpy(np.concatenate([ref_ids, img_ids])),
                             torch.from_numpy(layout.txt_ids()), return_dict=False, kv_cache_mode="extract",
                             num_ref_tokens=layout.n_ref)
    got, ours, _ = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t, img_ids, ref_ids, layout.txt_ids())
    assert got.shape == want.shape == (2, layout.n_img, KLEIN.in_channels)
    assert rel_err(got, want.numpy()) <= FORWARD_TOL
    assert ours.num_ref_tokens == layout.n_ref
    for i in range(KLEIN.depth):
        k, v = cache.get_double(i).get()
        assert rel_err(ours.double_k[i], k.numpy()) <= FORWARD_TOL
        assert rel_err(ours.double_v[i], v.numpy()) <= FORWARD_TOL
    for i in range(KLEIN.depth_single_blocks):
        k, v = cache.get_single(i).get()
        assert rel_err(ours.single_k[i], k.numpy()) <= FORWARD_TOL
        assert rel_err(ours.single_v[i], v.numpy()) <= FORWARD_TOL
    # the fixed reference timestep matters: another t_ref is another computation
    other, _, _ = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t, img_ids, ref_ids, layout.txt_ids(),
                                        ref_timestep=0.3)
    assert rel_err(other, want.numpy()) > 100 * FORWARD_TOL


@pytest.mark.parity
def test_cached_matches_diffusers(model):
    import torch
    module, params = model
    layout, img, refs, txt, img_ids, ref_ids = _inputs(seed=1)
    t0, t1 = np.full(2, 1.0, np.float32), np.full(2, 0.55, np.float32)
    with torch.no_grad():
        _, cache = module(torch.from_numpy(np.concatenate([refs, img], 1)), torch.from_numpy(txt),
                          torch.from_numpy(t0), torch.from_numpy(np.concatenate([ref_ids, img_ids])),
                          torch.from_numpy(layout.txt_ids()), return_dict=False, kv_cache_mode="extract",
                          num_ref_tokens=layout.n_ref)
        want = module(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(t1), torch.from_numpy(img_ids),
                      torch.from_numpy(layout.txt_ids()), kv_cache=cache, kv_cache_mode="cached").sample.numpy()
    _, ours, _ = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t0, img_ids, ref_ids, layout.txt_ids())
    got, _ = kv.forward_kv_cached(params, KLEIN, img, txt, t1, img_ids, layout.txt_ids(), ours)
    assert rel_err(got, want) <= FORWARD_TOL
    # diffusers' own cache in our cached forward gives the same
    stack = lambda caches, i: np.stack([c.get()[i].numpy() for c in caches])
    theirs = kv.KVCache(double_k=stack(cache.double_block_caches, 0), double_v=stack(cache.double_block_caches, 1),
                        single_k=stack(cache.single_block_caches, 0), single_v=stack(cache.single_block_caches, 1))
    assert rel_err(kv.forward_kv_cached(params, KLEIN, img, txt, t1, img_ids, layout.txt_ids(), theirs)[0],
                   want) <= FORWARD_TOL


def test_empty_cache_is_the_plain_forward(params):
    layout, img, _, txt, img_ids, _ = _inputs(seed=2)
    t = np.full(2, 0.4, np.float32)
    h, k = KLEIN.num_heads, KLEIN.head_dim
    empty = kv.KVCache(*(np.zeros((n, 2, 0, h, k), np.float32) for n in (KLEIN.depth, KLEIN.depth,
                                                                          KLEIN.depth_single_blocks,
                                                                          KLEIN.depth_single_blocks)))
    got, _ = kv.forward_kv_cached(params, KLEIN, img, txt, t, img_ids, layout.txt_ids(), empty)
    want, _ = fluxjax.forward(params, KLEIN, img, txt, t, img_ids, layout.txt_ids())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parity
def test_kv_sampler_matches_pipeline(model):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline

    module, params = model
    vae = tiny_vae(seed=3)
    pipe = Flux2KleinKVPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                                text_encoder=None, tokenizer=None, transformer=module)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(5)
    txt = rng.standard_normal((1, N_TXT, KLEIN.context_in_dim)).astype(np.float32)
    grid = images.image_grid(HEIGHT, WIDTH)
    noise = rng.standard_normal((1, KLEIN.in_channels, *grid)).astype(np.float32)
    refs_pil = [pil_image(64, 80, seed=8), pil_image(96, 64, seed=9)]
    with torch.no_grad():
        expected = pipe(image=refs_pil, prompt_embeds=torch.from_numpy(txt), height=HEIGHT, width=WIDTH,
                        num_inference_steps=4, latents=torch.from_numpy(noise), output_type="latent").images.numpy()
    refs, ref_grids = images.reference_tokens(refs_pil, pipeline_encoder(pipe))
    layout = images.reference_layout(N_TXT, grid, ref_grids)
    latents, _ = kv.sample_kv(params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids(), refs,
                              noise=pipeline_tokens(noise))
    got = klein_latent_output(latents, grid, vae)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= LATENT_TOL
    # the KV path is a different computation from the standard one (references modulated at t = 0)
    plain, _ = fluxjax.sample(params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids(),
                              noise=pipeline_tokens(noise), refs=refs)
    assert rel_err(plain, latents) > 100 * LATENT_TOL


# The KV path with interventions against the full forward with the same interventions. The extract
# forward at t1 computes everything; the cached forward at t1 reads the references' keys and values
# extracted at t0 under the same interventions. Their attention sums the same keys in the same order
# ([text, image, references]); measured equal to float32 rounding (below 1e-7).
KV_TOL = 1e-6
_extract = jax.jit(kv.forward_kv_extract, static_argnames=("config", "capture"))
_cached = jax.jit(kv.forward_kv_cached, static_argnames=("config", "capture"))


def _kv_interventions(layout, content, case):
    rng = np.random.default_rng(11)
    D = KLEIN.hidden_size
    if case == "drop":
        return fluxjax.Interventions(knockout=fluxjax.knockout(KLEIN, layout, content, "ref->image", ":1"),
                                     drop_reference=fluxjax.drop_reference(layout, 3))
    knock = (fluxjax.knockout(KLEIN, layout, content, ["ref->text[padding]", "image->text"], "1:", heads=[0]) &
             fluxjax.knockout(KLEIN, layout, content, "ref[1]->image", ":3"))
    subs = (fluxjax.substitution("b3.text.output", rng.standard_normal((2, layout.n_txt, D)).astype(np.float32),
                                 layout.text_mask("text[padding]", content)),
            fluxjax.substitution("b1.image.attn_out", rng.standard_normal((2, layout.n_img, D)).astype(np.float32),
                                 keep=1.0),
            fluxjax.substitution("b0.reference.output", rng.standard_normal((2, layout.n_ref, D)).astype(np.float32),
                                 rng.random((2, layout.n_ref)) < 0.5))  # acts at extraction: held by the cache
    return fluxjax.Interventions(substitutions=subs, knockout=knock)


def _null(iv):
    """`iv` with the same structure doing nothing: every mask empty, the knockout cutting nothing
    (the same compiled programs, so the tests compare against it without compiling again)."""
    return iv.replace(substitutions=tuple(s.replace(mask=jnp.zeros_like(s.mask)) for s in iv.substitutions),
                      knockout=iv.knockout.replace(allowed=jnp.ones_like(iv.knockout.allowed)))


@pytest.mark.parametrize("case", ["knockout-and-substitutions", pytest.param("drop", marks=pytest.mark.slow)])
def test_kv_path_with_interventions_equals_the_full_forward(params, case):
    layout, img, refs, txt, img_ids, ref_ids = _inputs(seed=3)
    content = np.zeros((2, layout.n_txt), bool)
    content[0, 1:4] = True
    content[1, 2:6] = True
    iv = _kv_interventions(layout, content, case)
    cap = fluxjax.Capture(sites=("b1.text.attn_out", "b3.image.output", "embed.text.output"))
    t0, t1 = np.full(2, 1.0, np.float32), np.full(2, 0.55, np.float32)

    def extract(t, iv):
        return _extract(params, KLEIN, img, refs, txt, t, img_ids, ref_ids, layout.txt_ids(), interventions=iv,
                        capture=cap)

    full, _, full_caps = extract(t1, iv)
    _, cache, _ = extract(t0, iv)
    got, caps = _cached(params, KLEIN, img, txt, t1, img_ids, layout.txt_ids(), cache, interventions=iv, capture=cap)
    assert rel_err(got, full) <= KV_TOL
    for name in cap.sites:
        assert rel_err(caps[name], full_caps[name]) <= KV_TOL, name
    _, null_cache, _ = extract(t0, _null(iv))
    assert rel_err(extract(t1, _null(iv))[0], full) > 1e-3  # the interventions acted
    if case != "drop":  # the reference substitution is in the cache
        assert rel_err(cache.single_k, null_cache.single_k) > 1e-3


@pytest.mark.slow
def test_kv_sampler_takes_interventions(params):
    """`sample_kv` with per-step interventions: a capture of the image stream at every step, and those
    values substituted back step by step, change nothing."""
    layout, img, refs, txt, img_ids, ref_ids = _inputs(seed=4)
    options = sampler.SamplerOptions(num_steps=3)
    cap = fluxjax.Capture(sites=("b2.image.output",))
    latents, caps = kv.sample_kv(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), refs, noise=img,
                                 capture=cap)
    assert caps["b2.image.output"].shape == (3, 2, layout.n_img, KLEIN.hidden_size)
    iv = fluxjax.Interventions(substitutions=(
        fluxjax.substitution("b2.image.output", fluxjax.per_step(caps["b2.image.output"])),))
    again, _ = kv.sample_kv(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), refs, noise=img,
                            interventions=iv)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(latents))
    with pytest.raises(ValueError, match="no reference tokens"):
        kv.sample_kv(params, KLEIN, options, txt, layout.txt_ids(), layout.img_ids(), refs, noise=img,
                     capture=("b1.reference.output",))
