"""Attention flow (`fluxjax.flow`, `numerics.attention_flow`) against the dense softmax probabilities.

The reference of every check is the [B, H, Lq, Lk] probabilities of `jax.nn.softmax` formed in full,
summed over each key group's keys (mass) or contracted with each group's values (carried): at the
attention level for every kernel (blocked, Pallas in interpret mode, the per-segment dense kernel,
a CPU stand-in for cuDNN through the cuDNN path's own wrapper, the dense "xla" path), with a table
shared by the heads, a knockout table and a table per head; through the forward and the sampler per
block, head and step, where the dense "xla" path (checked against that reference here) is the
reference of the others. The real cuDNN kernel is lowered for CUDA on this machine.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import GROUPS_CONTENT, GROUPS_LAYOUT, TINY, groups_forward_case, rel_err

import fluxjax
from fluxjax import numerics
from fluxjax.layout import key_segments

# Masses are sums of probabilities in [0, 1]: the kernels sum the same float32 terms in another
# order (measured 2.1e-7 at most at the attention level, 9e-8 through the forward).
FLOW_TOL = 1e-6
# Carried norms are norms of mixtures of N(0, 1) value vectors (up to ~6 here): the same rounding,
# relative to their size (measured 1.1e-6 absolute at most, 2e-7 relative).
CARRIED_TOL = 1e-6

LAYOUT, CONTENT = GROUPS_LAYOUT, GROUPS_CONTENT  # sample 2 has no content: an empty text[content] group
G = LAYOUT.num_groups
SEGMENTS = key_segments(LAYOUT.n_txt, LAYOUT.total, G, (LAYOUT.n_img, *LAYOUT.ref_counts))


def _stand_in_cudnn(q, k, v, bias):
    """What the cuDNN kernel computes (float32, CPU), with its arguments: bias None or [B, 1|H, Lq, S]."""
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    o = jnp.einsum("bhqs,bshk->bqhk", jnp.exp(logits - lse[..., None]), v.astype(jnp.float32))
    return o, jnp.swapaxes(lse, 1, 2)


def _flow(kernel):
    def run(q, k, v, kg):
        if kernel in ("xla", "blocked", "pallas"):
            options = fluxjax.RuntimeOptions(attention=kernel, query_block=16, pallas_block=16)
            return numerics.attention_flow(q, k, v, kg, options, carried=True)
        partial = {"dense": numerics._partial_dense, "cudnn": numerics._kernel_partial(_stand_in_cudnn)}[kernel]
        return numerics._grouped_attention(q, k, v, kg, partial, flow=True, carried=True)
    return jax.jit(run)


def dense_reference(q, k, v, kg: numerics.KeyGroups):
    """(o, mass, carried) from the softmax probabilities [B, H, Lq, Lk] in full."""
    logits = jnp.einsum("bqhk,blhk->bhql", q, k) / np.sqrt(q.shape[-1])
    mask = kg.dense_mask()
    p = jax.nn.softmax(jnp.where(mask[:, None] if mask.ndim == 3 else mask, logits, -jnp.inf), axis=-1)
    onehot = (kg.keys[..., None] == jnp.arange(G)).astype(jnp.float32)  # [B, Lk, G]
    per_group = jnp.einsum("bhql,blg,blhk->bqhgk", p, onehot, v)
    return jnp.einsum("bhql,blhk->bqhk", p, v), jnp.einsum("bhql,blg->bqhg", p, onehot), \
        jnp.linalg.norm(per_group, axis=-1)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    shape = (CONTENT.shape[0], LAYOUT.total, 2, 32)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def _tables():
    groups = jnp.asarray(LAYOUT.group_ids(CONTENT))
    cut = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text[padding]", "image->ref"]).allowed[0]
    per_head = jnp.stack([cut, fluxjax.knockout(TINY, LAYOUT, CONTENT, "text->image").allowed[0]])
    return {"all": numerics.KeyGroups(jnp.ones((G, G), bool), groups, SEGMENTS),
            "knockout": numerics.KeyGroups(cut, groups, SEGMENTS),
            "per head": numerics.KeyGroups(per_head, groups, SEGMENTS)}


# the default tier runs the CPU's kernel and the cuDNN path on the per-head table (the most general);
# every other (kernel, table) pair is in the slow tier
CASES = [(kernel, table) for kernel in ("blocked", "pallas", "dense", "cudnn", "xla")
         for table in ("all", "knockout", "per head")]
FAST = {("blocked", "per head"), ("cudnn", "per head")}


@pytest.mark.parametrize("kernel,table", [pytest.param(*c, marks=() if c in FAST else pytest.mark.slow) for c in CASES])
def test_attention_flow_equals_group_sums_of_dense_probabilities(qkv, kernel, table):
    """Every query's mass and carried norm on every key group, per head (the per-token form)."""
    kg = _tables()[table]
    o, mass, carried = _flow(kernel)(*qkv, kg)
    ref_o, ref_mass, ref_carried = dense_reference(*qkv, kg)
    assert mass.shape == carried.shape == (CONTENT.shape[0], LAYOUT.total, 2, G)
    assert np.abs(np.asarray(mass - ref_mass)).max() <= FLOW_TOL
    assert np.abs(np.asarray(carried - ref_carried)).max() <= CARRIED_TOL * max(1.0, float(ref_carried.max()))
    assert np.abs(np.asarray(o - ref_o)).max() <= FLOW_TOL * 10  # the output as `attention` gives it
    np.testing.assert_allclose(np.asarray(mass.sum(-1)), 1.0, atol=FLOW_TOL)
    # the table is in force: no mass where a query may not read a group (one head's cut per table)
    may_read = np.broadcast_to(np.asarray(kg.may_read()), mass.shape) if kg.allowed.ndim == 3 else \
        np.broadcast_to(np.asarray(kg.may_read())[..., None, :], mass.shape)
    assert (np.asarray(mass)[~may_read] == 0).all() and (~may_read).any() == (table != "all")
    # the carried norm is not the mass: groups weigh differently
    assert np.abs(np.asarray(carried / carried.sum(-1, keepdims=True) - mass)).max() > 0.01


# --- through the forward and the sampler ------------------------------------------------------------

fwd = jax.jit(fluxjax.forward, static_argnames=("config", "capture", "runtime", "num_ref_tokens"))
EVERY = fluxjax.Capture(flow=fluxjax.Flow(blocks=range(TINY.num_blocks), tokens=range(TINY.num_blocks),
                                          carried=True))


@pytest.fixture(scope="module")
def model():
    return groups_forward_case()


def _run(model, kernel, capture=EVERY, content=CONTENT, iv=None):
    params, data = model
    runtime = fluxjax.RuntimeOptions(attention=kernel, query_block=16, pallas_block=16)
    return fwd(params, TINY, *data, capture=capture, num_ref_tokens=LAYOUT.n_ref, runtime=runtime,
               groups=fluxjax.token_groups(LAYOUT, content), interventions=iv)


@pytest.mark.parametrize("kernel", ["blocked", pytest.param("pallas", marks=pytest.mark.slow)])
def test_forward_flow_per_block_and_head(model, kernel):
    """Every block, head and sample: the tables, the per-token maps and the carried variant against
    the dense probabilities (the "xla" path); the tables are the means of the maps over each group."""
    _, ref = _run(model, "xla")
    _, caps = _run(model, kernel)
    flow, ref = caps.flow, ref.flow
    assert flow.mass.shape == (TINY.num_blocks, CONTENT.shape[0], TINY.num_heads, G, G)
    assert flow.token_mass.shape == (TINY.num_blocks, CONTENT.shape[0], LAYOUT.total, TINY.num_heads, G)
    for a, b, tol in ((flow.mass, ref.mass, FLOW_TOL), (flow.token_mass, ref.token_mass, FLOW_TOL),
                      (flow.carried, ref.carried, CARRIED_TOL * float(jnp.nanmax(ref.carried))),
                      (flow.token_carried, ref.token_carried, CARRIED_TOL * float(jnp.nanmax(ref.token_carried)))):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(np.asarray(a - b))) <= tol
    groups = LAYOUT.group_ids(CONTENT)
    maps = np.asarray(flow.token_mass)
    for b in range(CONTENT.shape[0]):
        for gq in range(G):
            rows = maps[:, b, groups[b] == gq]  # [blocks, n, H, G]
            want = rows.mean(axis=1) if rows.shape[1] else np.full(maps[:, b, 0].shape, np.nan)
            np.testing.assert_allclose(np.asarray(flow.mass[:, b, :, gq]), want, atol=FLOW_TOL)
    assert np.isnan(np.asarray(flow.at(3)[2, :, 0])).all()  # sample 2 has no content queries
    np.testing.assert_allclose(np.nansum(np.asarray(flow.at(3)), axis=-1)[:2], 1.0, atol=FLOW_TOL)


@pytest.mark.slow
def test_flow_reads_the_knockout(model):
    """Under a knockout the cut edge has no mass, and the tables still match the dense reference."""
    knock = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->image", blocks="2:")
    iv = fluxjax.Interventions(knockout=knock)
    _, caps = _run(model, None, iv=iv)
    _, ref = _run(model, "xla", iv=iv)
    image, refs = fluxjax.layout.IMAGE, [3, 4]
    assert (np.asarray(caps.flow.mass[2:, :, :, image][..., refs]) == 0).all()
    assert (np.asarray(caps.flow.mass[:2, :, :, image][..., refs]) > 0).all()
    assert np.nanmax(np.abs(np.asarray(caps.flow.mass - ref.flow.mass))) <= FLOW_TOL


def test_chosen_blocks_compile_once(model):
    """Blocks asked for are static (a lax.cond skips the others); groups are values: another content
    mask reuses the program. Capturing changes the output by rounding only. (The tables of chosen
    blocks against the dense path: test_sampler_flow_per_step.)"""
    params, data = model
    fwd.clear_cache()
    chosen = fluxjax.Capture(flow=fluxjax.Flow(blocks=(1, 4), tokens=(4,)))
    out, caps = _run(model, None, chosen)
    other = CONTENT.copy()
    other[2, 3:7] = True
    _, caps_other = _run(model, None, chosen, content=other)
    assert fwd._cache_size() == 1
    assert not np.isnan(np.asarray(caps_other.flow.at(4)[2, :, 0])).any()  # sample 2 has content now
    plain = fwd(params, TINY, *data, num_ref_tokens=LAYOUT.n_ref)[0]
    assert rel_err(np.asarray(out), np.asarray(plain)) <= FLOW_TOL
    np.testing.assert_allclose(np.nansum(np.asarray(caps.flow.mass), -1)[:, :2], 1.0, atol=FLOW_TOL)
    np.testing.assert_array_equal(np.asarray(caps.flow.tokens_at(4)), np.asarray(caps.flow.token_mass[0]))
    with pytest.raises(KeyError, match="block 2"):
        caps.flow.at(2)
    with pytest.raises(KeyError, match="carried=True"):
        caps.flow.at(1, carried=True)


@pytest.mark.slow
def test_sampler_flow_per_step(model):
    """Under the sampler every step has its tables ([S] leading), each equal to the dense path's."""
    params, data = model
    img = data[0][:1, :LAYOUT.n_img]
    refs = data[0][:1, LAYOUT.n_img:]
    options = fluxjax.SamplerOptions(num_steps=2)
    capture = fluxjax.Capture(flow=fluxjax.Flow(blocks=(0, 3), tokens=(3,)))
    groups = fluxjax.token_groups(LAYOUT, CONTENT[:1])
    out = {}
    for kernel in ("xla", None):
        out[kernel] = fluxjax.sample(params, TINY, options, data[1][:1], data[4], data[3], noise=img, refs=refs,
                                     capture=capture, groups=groups, runtime=fluxjax.RuntimeOptions(attention=kernel))
    flow, ref = out[None][1].flow, out["xla"][1].flow
    assert flow.mass.shape == (2, 2, 1, TINY.num_heads, G, G) and flow.tokens_at(3).shape == (2, 1, LAYOUT.total,
                                                                                              TINY.num_heads, G)
    assert np.abs(np.asarray(flow.mass - ref.mass)).max() <= FLOW_TOL
    assert np.abs(np.asarray(flow.token_mass - ref.token_mass)).max() <= FLOW_TOL
    assert np.abs(np.asarray(flow.mass[0] - flow.mass[1])).max() > 1e3 * FLOW_TOL  # the steps differ


def test_flow_needs_groups_that_fit(model):
    params, data = model
    capture = fluxjax.Capture(flow=fluxjax.Flow(blocks=(0,)))
    with pytest.raises(ValueError, match="pass groups="):
        fluxjax.forward(params, TINY, *data, capture=capture, num_ref_tokens=LAYOUT.n_ref)
    small = fluxjax.TokenLayout(n_txt=24, img_grid=(5, 6))
    with pytest.raises(ValueError, match="this forward's layout"):
        fluxjax.forward(params, TINY, *data, capture=capture, num_ref_tokens=LAYOUT.n_ref,
                        groups=fluxjax.token_groups(small, CONTENT))
    other = CONTENT.copy()
    other[0, 10] = True
    knock = fluxjax.Interventions(knockout=fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->image"))
    with pytest.raises(ValueError, match="one layout and content mask"):
        fluxjax.forward(params, TINY, *data, capture=capture, num_ref_tokens=LAYOUT.n_ref, interventions=knock,
                        groups=fluxjax.token_groups(LAYOUT, other))
    with pytest.raises(ValueError, match="out of range"):
        fluxjax.Capture(flow=fluxjax.Flow(blocks=(TINY.num_blocks,))).validate(TINY)
    with pytest.raises(TypeError, match="block indices"):
        fluxjax.Flow(blocks="all")


# --- cuDNN, lowered for CUDA on this machine ------------------------------------------------------

_CUSTOM_CALL = re.compile(r"custom_call @__cudnn\$fmha(\w*)\(.*?\) \{.*?\} : \(([^)]*)\)")


def test_flow_lowers_for_cuda_with_cudnn(cudnn_version):
    """The forward with the flow at every block, bfloat16, cuDNN attention, lowered for CUDA: each
    block body attends the text span's content and padding as two biased calls (their log-sum-exp
    residuals are the two groups' masses), the image and the reference as one call each."""
    layout = fluxjax.TokenLayout(n_txt=16, img_grid=(4, 4), ref_grids=((4, 4),))
    content = np.zeros((1, layout.n_txt), bool)
    content[0, 2:6] = True
    sds = jax.ShapeDtypeStruct
    capture = fluxjax.Capture(flow=fluxjax.Flow(blocks=range(TINY.num_blocks), carried=True))

    def run(params, img, txt, t, groups):
        return fluxjax.forward(params, TINY, img, txt, t, jnp.asarray(layout.img_ids()), jnp.asarray(layout.txt_ids()),
                               capture=capture, num_ref_tokens=layout.n_ref, groups=groups,
                               runtime=fluxjax.RuntimeOptions(attention="cudnn"))

    lowered = jax.jit(run).trace(
        fluxjax.param_shapes(TINY, jnp.bfloat16), sds((1, layout.n_image_stream, TINY.in_channels), jnp.bfloat16),
        sds((1, layout.n_txt, TINY.context_in_dim), jnp.bfloat16), sds((1,), jnp.bfloat16),
        fluxjax.token_groups(layout, content)).lower(lowering_platforms=("cuda",))
    calls = _CUSTOM_CALL.findall(lowered.as_text())
    biased = [operands for name, operands in calls if name == "ScaleBiasSoftmax"]
    assert len(calls) == 8 and len(biased) == 4, [name for name, _ in calls]  # two block bodies x four calls
    assert all(f"1x1x{layout.total}x{layout.n_txt}xbf16" in operands for operands in biased)
