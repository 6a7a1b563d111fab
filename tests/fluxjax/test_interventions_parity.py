"""Interventions against the same interventions done in the PyTorch reference (diffusers), fp32.

Knockouts: diffusers run with the equivalent boolean attention mask, [B, 1, L, L] (True = may
attend; SDPA broadcasts it over heads on diffusers' [B, H, L, K] layout after its permute),
either through `joint_attention_kwargs` (one mask for every block) or through per-block
attention processors that add it (a mask for a block range). Substitutions: torch forward hooks
on diffusers' modules that rewrite the text stream where fluxjax's sites are.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, diffusers_transformer, inputs, rel_err, run_diffusers, state_dict_numpy

import fluxjax
from fluxjax.conversion.transformer import params_from_state
from fluxjax.interventions import BLOCK0_INPUT

pytestmark = pytest.mark.parity  # checked against a PyTorch model (diffusers); see pyproject.toml

# The bars of the plain forward's parity (fp32 relative L2): at timestep 0 without guidance the
# only differences are float32 rounding orders; in general the fp32 timestep sinusoid (arguments
# up to 4000 rad, resolution ~6e-5 there) computed by two libraries sets the floor.
TOL_T0 = 1e-6
TOL_GENERAL = 5e-5

NB = TINY.num_blocks  # 2 double (0, 1) + 3 single (2, 3, 4)
SETTINGS = ("ref->text", "ref->image", "ref->text[padding]", "ref->text[content]", "text->ref", "image->ref",
            "image->text", "text->image", ("ref->image", "ref->text[content]", "image->text"))
RANGE, RANGE_BLOCKS = "1:4", (1, 2, 3)  # the last double block, the join and one more single block

fwd = jax.jit(fluxjax.forward, static_argnames=("config", "capture", "attn_impl"))


@pytest.fixture(scope="module")
def model():
    m = diffusers_transformer(TINY, seed=0)
    return m, params_from_state(state_dict_numpy(m), TINY, "diffusers")


@pytest.fixture(scope="module", params=[1, 2], ids=["1ref", "2refs"])
def case(request, model):
    refs = ((2, 3),) if request.param == 1 else ((2, 3), (2, 2))
    layout = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=refs)
    content = np.zeros((2, layout.n_txt), bool)
    content[0, 1:5] = True
    content[1, 2:4] = True
    img, txt = inputs(TINY, layout, batch=2, seed=request.param)
    return dict(layout=layout, content=content, img=img, txt=txt, model=model[0], params=model[1])


def ours(case, timestep, guidance=None, interventions=None):
    lay = case["layout"]
    return np.asarray(fwd(case["params"], TINY, jnp.asarray(case["img"]), jnp.asarray(case["txt"]),
                          jnp.asarray(timestep, jnp.float32), lay.img_ids(), lay.txt_ids(),
                          None if guidance is None else jnp.asarray(guidance, jnp.float32),
                          interventions=interventions)[0])


def theirs(case, timestep, guidance=None, **kwargs):
    return run_diffusers(case["model"], case["img"], case["txt"], np.asarray(timestep, np.float32), case["layout"],
                         guidance, **kwargs)


# ------------------------------------------------------------------------------------------------
# knockout


def torch_mask(layout, content, edges):
    """Edges 'A->B' (queries in B may not attend to keys in A) as diffusers' boolean attention mask
    [B, 1, L, L], written from the token masks alone, independently of fluxjax's knockout tables."""
    import torch
    edges = [edges] if isinstance(edges, str) else edges
    mask = np.ones((content.shape[0], layout.total, layout.total), bool)
    for e in edges:
        source, dest = e.split("->")
        mask &= ~(layout.token_mask(dest, content)[:, :, None] & layout.token_mask(source, content)[:, None, :])
    return torch.as_tensor(mask[:, None])


@functools.cache
def _masked_processors():
    """diffusers' double- and single-block attention processors, each applying a fixed mask
    (diffusers is imported here, on first use, not when the tests are collected)."""
    from diffusers.models.transformers import transformer_flux2

    class MaskedDouble(transformer_flux2.Flux2AttnProcessor):
        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, image_rotary_emb)

    class MaskedSingle(transformer_flux2.Flux2ParallelSelfAttnProcessor):
        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            return super().__call__(attn, hidden_states, self.mask, image_rotary_emb)

    return MaskedDouble, MaskedSingle


@contextlib.contextmanager
def per_block_masks(model, mask, blocks):
    """Install an attention processor that applies `mask` on each of `blocks` (global indices), then
    restore the model's own processors."""
    every = [*model.transformer_blocks, *model.single_transformer_blocks]
    saved = [b.attn.processor for b in every]
    double, single = _masked_processors()
    try:
        for i in blocks:
            cls = double if i < len(model.transformer_blocks) else single
            every[i].attn.set_processor(cls(mask))
        yield
    finally:
        for b, p in zip(every, saved):
            b.attn.set_processor(p)


def _name(setting):
    return setting if isinstance(setting, str) else "+".join(setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=_name)
def test_knockout_all_blocks(case, setting):
    knock = fluxjax.knockout(TINY, case["layout"], case["content"], setting, "all")
    t = np.zeros(2)
    out = ours(case, t, interventions=fluxjax.Interventions(knockout=knock))
    mask = torch_mask(case["layout"], case["content"], setting)
    ref = theirs(case, t, joint_attention_kwargs={"attention_mask": mask})
    assert rel_err(out, ref) <= TOL_T0
    assert rel_err(ref, theirs(case, t)) > 1e-3  # the knockout did act (the references are in play)


@pytest.mark.parametrize("setting", SETTINGS, ids=_name)
def test_knockout_block_range(case, setting):
    knock = fluxjax.knockout(TINY, case["layout"], case["content"], setting, RANGE)
    t = np.zeros(2)
    out = ours(case, t, interventions=fluxjax.Interventions(knockout=knock))
    with per_block_masks(case["model"], torch_mask(case["layout"], case["content"], setting), RANGE_BLOCKS):
        ref = theirs(case, t)
    assert rel_err(out, ref) <= TOL_T0
    assert rel_err(ref, theirs(case, t)) > 1e-4


@pytest.mark.parametrize("k", [1, 2, 4])
def test_cut_reference(case, k):
    """The mask form of reference removal (which equals the removal itself, see test_interventions)."""
    knock = fluxjax.cut_reference(TINY, case["layout"], case["content"], k)
    t = np.zeros(2)
    out = ours(case, t, interventions=fluxjax.Interventions(knockout=knock))
    mask = torch_mask(case["layout"], case["content"], ["ref->text", "ref->image", "text->ref", "image->ref"])
    with per_block_masks(case["model"], mask, range(k, NB)):
        ref = theirs(case, t)
    assert rel_err(out, ref) <= TOL_T0


def test_knockout_general_timestep(case):
    edges = ["ref->text[padding]", "image->ref"]
    knock = fluxjax.knockout(TINY, case["layout"], case["content"], edges, ":3")
    t, g = np.array([0.63, 0.2]), np.array([4.0, 2.5])
    out = ours(case, t, g, interventions=fluxjax.Interventions(knockout=knock))
    with per_block_masks(case["model"], torch_mask(case["layout"], case["content"], edges), range(3)):
        ref = theirs(case, t, g)
    assert rel_err(out, ref) <= TOL_GENERAL


def torch_head_mask(layout, content, edges_per_head):
    """Per-head edges as diffusers' boolean attention mask [B, H, L, L] (SDPA takes one mask per head)."""
    import torch
    return torch.cat([torch_mask(layout, content, edges) for edges in edges_per_head], dim=1)


@pytest.mark.parametrize("blocks", ["all", RANGE], ids=["all-blocks", "range"])
def test_per_head_knockout(case, blocks):
    """Head 0 and head 1 cut different edges; diffusers gets the per-head masked reference."""
    head0, head1 = ["ref->text", "image->text"], ["ref->image", "text->ref"]
    knock = (fluxjax.knockout(TINY, case["layout"], case["content"], head0, blocks, heads=[0]) &
             fluxjax.knockout(TINY, case["layout"], case["content"], head1, blocks, heads=[1]))
    t = np.zeros(2)
    out = ours(case, t, interventions=fluxjax.Interventions(knockout=knock))
    mask = torch_head_mask(case["layout"], case["content"], [head0, head1])
    if blocks == "all":
        ref = theirs(case, t, joint_attention_kwargs={"attention_mask": mask})
    else:
        with per_block_masks(case["model"], mask, RANGE_BLOCKS):
            ref = theirs(case, t)
    assert rel_err(out, ref) <= TOL_T0
    shared = theirs(case, t, joint_attention_kwargs={"attention_mask": torch_mask(case["layout"], case["content"],
                                                                                  head0 + head1)})
    assert rel_err(ref, shared) > 1e-3  # the heads' own tables matter


# ------------------------------------------------------------------------------------------------
# substitution


@contextlib.contextmanager
def substitution_hook(model, site: int, value, mask):
    """Rewrite diffusers' text stream at a fluxjax site: where(mask, value, stream)."""
    import torch
    value, mask = torch.as_tensor(np.asarray(value)), torch.as_tensor(np.asarray(mask))[..., None]
    nd = len(model.transformer_blocks)
    if site == BLOCK0_INPUT:
        module = model.context_embedder

        def hook(mod, args, out):
            import torch
            return torch.where(mask, value, out)
    elif site < nd:
        module = model.transformer_blocks[site]

        def hook(mod, args, out):  # (encoder_hidden_states, hidden_states)
            import torch
            return torch.where(mask, value, out[0]), out[1]
    else:
        module = model.single_transformer_blocks[site - nd]

        def hook(mod, args, out):  # the joint stream, text first
            import torch
            n_txt = value.shape[1]
            return torch.cat([torch.where(mask, value, out[:, :n_txt]), out[:, n_txt:]], dim=1)
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _substitution(case, site, seed):
    lay = case["layout"]
    value = np.random.default_rng(seed).standard_normal((2, lay.n_txt, TINY.hidden_size)).astype(np.float32)
    mask = lay.text_mask("text[padding]", case["content"])
    return fluxjax.substitution(site, value, mask), value, mask


@pytest.mark.parametrize("site", [BLOCK0_INPUT, 1, 3])  # block-0 input, a double block, a single block
def test_substitution(case, site):
    sub, value, mask = _substitution(case, site, seed=10 + site)
    t = np.zeros(2)
    out = ours(case, t, interventions=fluxjax.Interventions(substitutions=(sub,)))
    with substitution_hook(case["model"], site, value, mask):
        ref = theirs(case, t)
    assert rel_err(out, ref) <= TOL_T0
    assert rel_err(ref, theirs(case, t)) > 1e-3


def test_substitution_and_knockout_general_timestep(case):
    sub, value, mask = _substitution(case, 2, seed=3)
    knock = fluxjax.knockout(TINY, case["layout"], case["content"], "ref->text", "all")
    t, g = np.array([0.63, 0.2]), np.array([4.0, 2.5])
    out = ours(case, t, g, interventions=fluxjax.Interventions(substitutions=(sub,), knockout=knock))
    with substitution_hook(case["model"], 2, value, mask):
        ref = theirs(case, t, g, joint_attention_kwargs={
            "attention_mask": torch_mask(case["layout"], case["content"], "ref->text")})
    assert rel_err(out, ref) <= TOL_GENERAL
