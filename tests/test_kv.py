"""The [klein] KV variant: extract and cached forwards vs diffusers' `kv_cache_mode="extract"` /
`"cached"`, and the cached sampler vs `Flux2KleinKVPipeline`, fp32 on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest

import fluxjax
from fluxjax import images, kv, sampler
from reference import pipeline_encoder, pipeline_tokens, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from test_sampler import (HEIGHT, KLEIN, LATENT_TOL, N_TXT, WIDTH, _params, klein_latent_output,  # noqa: E402
                          pil_image, tiny_vae)
from reference import diffusers_transformer  # noqa: E402

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


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    layout = fluxjax.TokenLayout(N_TXT, (3, 4), ref_grids=((2, 3), (3, 2)))
    img = rng.standard_normal((2, layout.n_img, KLEIN.in_channels)).astype(np.float32)
    refs = rng.standard_normal((2, layout.n_ref, KLEIN.in_channels)).astype(np.float32)
    txt = rng.standard_normal((2, N_TXT, KLEIN.context_in_dim)).astype(np.float32)
    ids = layout.img_ids()
    return layout, img, refs, txt, ids[:layout.n_img], ids[layout.n_img:]


def test_extract_matches_diffusers(model):
    module, params = model
    layout, img, refs, txt, img_ids, ref_ids = _inputs()
    t = np.array([0.7, 0.7], np.float32)
    with torch.no_grad():
        want, cache = module(torch.from_numpy(np.concatenate([refs, img], 1)), torch.from_numpy(txt),
                             torch.from_numpy(t), torch.from_numpy(np.concatenate([ref_ids, img_ids])),
                             torch.from_numpy(layout.txt_ids()), return_dict=False, kv_cache_mode="extract",
                             num_ref_tokens=layout.n_ref)
    got, ours = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t, img_ids, ref_ids, layout.txt_ids())
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
    other, _ = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t, img_ids, ref_ids, layout.txt_ids(),
                                     ref_timestep=0.3)
    assert rel_err(other, want.numpy()) > 100 * FORWARD_TOL


def test_cached_matches_diffusers(model):
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
    _, ours = kv.forward_kv_extract(params, KLEIN, img, refs, txt, t0, img_ids, ref_ids, layout.txt_ids())
    got = kv.forward_kv_cached(params, KLEIN, img, txt, t1, img_ids, layout.txt_ids(), ours)
    assert rel_err(got, want) <= FORWARD_TOL
    # diffusers' own cache in our cached forward gives the same
    stack = lambda caches, i: np.stack([c.get()[i].numpy() for c in caches])
    theirs = kv.KVCache(double_k=stack(cache.double_block_caches, 0), double_v=stack(cache.double_block_caches, 1),
                        single_k=stack(cache.single_block_caches, 0), single_v=stack(cache.single_block_caches, 1))
    assert rel_err(kv.forward_kv_cached(params, KLEIN, img, txt, t1, img_ids, layout.txt_ids(), theirs),
                   want) <= FORWARD_TOL


def test_empty_cache_is_the_plain_forward(model):
    _, params = model
    layout, img, _, txt, img_ids, _ = _inputs(seed=2)
    t = np.full(2, 0.4, np.float32)
    h, k = KLEIN.num_heads, KLEIN.head_dim
    empty = kv.KVCache(*(np.zeros((n, 2, 0, h, k), np.float32) for n in (KLEIN.depth, KLEIN.depth,
                                                                          KLEIN.depth_single_blocks,
                                                                          KLEIN.depth_single_blocks)))
    got = kv.forward_kv_cached(params, KLEIN, img, txt, t, img_ids, layout.txt_ids(), empty)
    want, _ = fluxjax.forward(params, KLEIN, img, txt, t, img_ids, layout.txt_ids())
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kv_sampler_matches_pipeline(model):
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
    latents = kv.sample_kv(params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids(), refs,
                           noise=pipeline_tokens(noise))
    got = klein_latent_output(latents, grid, vae)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= LATENT_TOL
    # the KV path is a different computation from the standard one (references modulated at t = 0)
    plain, _ = fluxjax.sample(params, KLEIN, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids(),
                              noise=pipeline_tokens(noise), refs=refs)
    assert rel_err(plain, latents) > 100 * LATENT_TOL
