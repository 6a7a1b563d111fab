"""The cuDNN key-group path under vmap and grad, checked without a GPU.

Three levels:
  - numbers: `numerics._kernel_partial` (the cuDNN path's wrapper: one-head bias, vmap folded into
    the batch, reverse mode from the XLA reference) around a CPU stand-in for the cuDNN kernel
    that takes the same arguments, under vmap, nested vmap and grad, against the dense reference;
  - trace: the real cuDNN kernel traced under vmap on CPU (jax's batching rule runs at trace time);
  - lowering: a vmapped knockout sweep of the tiny model lowered for the CUDA platform, every
    cuDNN call and its bias shape read off the StableHLO.

Tracing and lowering the cuDNN kernel on a machine without CUDA needs one stand-in: jax asks the
CUDA plugin for cuDNN's version at trace time (`check_cudnn_version`), and the plugin is absent
here, so the `cudnn_version` fixture (conftest.py) reports 9.12 (any 9.x takes the bias path). Nothing else is faked:
the batching rule, abstract evaluation and CUDA lowering are jax's own.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY

import fluxjax
from fluxjax import numerics
from fluxjax.layout import key_segments

# float32 both ways, the same masked softmax summed in another order: rounding only (measured
# 2e-7 at most). Gradients go through the same dense reference, so they agree to rounding too.
TOL = 1e-6

LAYOUT = fluxjax.TokenLayout(n_txt=8, img_grid=(2, 3), ref_grids=((2, 2),))
CONTENT = np.zeros((2, LAYOUT.n_txt), bool)
CONTENT[0, 1:4] = True
CONTENT[1, [2, 6]] = True
SEGMENTS = key_segments(LAYOUT.n_txt, LAYOUT.total, LAYOUT.num_groups, (LAYOUT.n_img, *LAYOUT.ref_counts))
CELLS = ["ref->text", "ref->text[padding]", ["ref->text", "ref->image"]]


SEEN = []  # (batch of q, bias shape) of every trace of the stand-in kernel


def _stand_in_kernel(q, k, v, bias):
    """What cuDNN computes, in float32 on CPU, with the cuDNN call's contract checked: the bias None
    or [B, 1, Lq, S]. It records the batch it is traced with: V * B where vmap was folded in."""
    SEEN.append((q.shape[0], None if bias is None else tuple(bias.shape)))  # (custom_vmap also traces it unbatched)
    if bias is not None:
        assert bias.shape == (q.shape[0], 1, q.shape[1], k.shape[1]) and bias.dtype == q.dtype, bias.shape
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, H, Lq]
    o = jnp.einsum("bhqs,bshk->bqhk", jnp.exp(logits - lse[..., None]), v.astype(jnp.float32))
    return o, jnp.swapaxes(lse, 1, 2)


STAND_IN = numerics._kernel_partial(_stand_in_kernel)


def _tables(cells):
    knocks = [fluxjax.knockout(TINY, LAYOUT, CONTENT, c, blocks=[0]) for c in cells]
    return jnp.stack([kn.allowed[0] for kn in knocks]), knocks[0].groups  # [V, G, G], [B, L]


def _attend(q, k, v, allowed, groups, partial):
    kg = numerics.KeyGroups(allowed, groups, SEGMENTS)
    if partial == "xla":  # the dense masked reference
        return numerics.attention(q, k, v, kg, "xla")
    return numerics._grouped_attention(q, k, v, kg, partial)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    shape = (CONTENT.shape[0], LAYOUT.total, 2, 16)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


def test_sweep_under_vmap_equals_the_reference(qkv):
    """Tables vmapped (q, k, v shared: broadcast by the fold), and everything vmapped."""
    q, k, v = qkv
    allowed, groups = _tables(CELLS)
    ref = jax.jit(jax.vmap(lambda a: _attend(q, k, v, a, groups, "xla")))(allowed)
    jax.clear_caches()  # the kernel is traced anew (jax caches traces of equal shapes)
    SEEN.clear()
    out = jax.jit(jax.vmap(lambda a: _attend(q, k, v, a, groups, STAND_IN)))(allowed)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= TOL
    V, B, L = len(CELLS), CONTENT.shape[0], LAYOUT.total
    # only the text span depends on the table: the image and reference calls are not batched at all
    assert [seen for seen in SEEN if seen[0] != B] == [(V * B, (V * B, 1, L, LAYOUT.n_txt))]
    qs = jnp.stack([q, 2 * q, -q])  # queries batched too: every segment's call folds
    ref = jax.jit(jax.vmap(lambda q, a: _attend(q, k, v, a, groups, "xla")))(qs, allowed)
    jax.clear_caches()  # the kernel is traced anew (jax caches traces of equal shapes)
    SEEN.clear()
    out = jax.jit(jax.vmap(lambda q, a: _attend(q, k, v, a, groups, STAND_IN)))(qs, allowed)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= TOL
    folded = [(V * B, (V * B, 1, L, LAYOUT.n_txt)), (V * B, None), (V * B, None)]  # text, image, reference
    assert [seen for seen in SEEN if seen[0] != B] == folded
    # the cells differ: a sweep that returned one cell V times would fail above
    assert np.abs(np.asarray(ref[0]) - np.asarray(ref[1])).max() > 100 * TOL


def test_nested_vmap_and_batch_axis_not_first(qkv):
    """vmap of vmap folds twice; a batch axis given at position 1 reaches the kernel folded too."""
    q, k, v = qkv
    allowed, groups = _tables(CELLS)
    grid = jnp.stack([allowed, allowed[::-1]])  # [2, V, G, G]
    ref = jax.jit(jax.vmap(jax.vmap(lambda a: _attend(q, k, v, a, groups, "xla"))))(grid)
    jax.clear_caches()  # the kernel is traced anew (jax caches traces of equal shapes)
    SEEN.clear()
    out = jax.jit(jax.vmap(jax.vmap(lambda a: _attend(q, k, v, a, groups, STAND_IN))))(grid)
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= TOL
    both = 2 * len(CELLS) * CONTENT.shape[0]  # the two vmapped axes folded into the batch
    assert (both, (both, 1, LAYOUT.total, LAYOUT.n_txt)) in SEEN
    out = jax.jit(jax.vmap(lambda a: _attend(q, k, v, a, groups, STAND_IN), in_axes=1))(jnp.moveaxis(allowed, 0, 1))
    assert np.abs(np.asarray(out) - np.asarray(ref[0])).max() <= TOL


def _loss(q, k, v, allowed, groups, partial):
    return jnp.sum(jnp.sin(_attend(q, k, v, allowed, groups, partial)))


def test_gradients_include_the_log_sum_exp(qkv):
    """Reverse mode through the merged segments (the LSE weights carry gradient)."""
    q, k, v = qkv
    allowed, groups = _tables(CELLS)
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=5)
    ref, out = grad(q, k, v, allowed[0], groups, "xla"), grad(q, k, v, allowed[0], groups, STAND_IN)
    for r, o in zip(ref, out):
        assert np.abs(np.asarray(o) - np.asarray(r)).max() <= TOL


@pytest.mark.slow
def test_gradients_under_vmap(qkv):
    """vmap of grad: the backward pass (the XLA reference's) batched, the forward folded."""
    q, k, v = qkv
    allowed, groups = _tables(CELLS)
    swept = jax.jit(jax.vmap(jax.grad(_loss), in_axes=(None, None, None, 0, None, None)), static_argnums=5)
    ref = swept(q, k, v, allowed, groups, "xla")
    assert np.abs(np.asarray(swept(q, k, v, allowed, groups, STAND_IN)) - np.asarray(ref)).max() <= TOL


# --- the real cuDNN kernel, traced and lowered on a CPU machine -----------------------------------


def test_cudnn_kernel_traces_under_vmap(qkv, cudnn_version):
    """jax's batching rule for the cuDNN kernel reshapes a batched bias to [V * B, H, Lq, S], which a
    one-head bias does not fill; through the fold the kernel is bound once, with [V * B, 1, Lq, S]."""
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv)
    allowed, groups = _tables(CELLS)
    V, B, L, T = len(CELLS), CONTENT.shape[0], LAYOUT.total, LAYOUT.n_txt
    bias = jnp.zeros((V, B, 1, L, T), jnp.bfloat16)
    with pytest.raises(TypeError, match="reshape"):  # jax's own rule, without the fold
        jax.make_jaxpr(jax.vmap(lambda b: numerics._cudnn_kernel(q, k[:, :T], v[:, :T], b)))(bias)
    jaxpr = jax.make_jaxpr(jax.vmap(lambda a: _attend(q, k, v, a, groups, numerics._partial_cudnn)))(allowed)
    calls = [(tuple(c.invars[0].aval.shape), tuple(c.invars[3].aval.shape)) for c in _cudnn_calls(jaxpr.jaxpr)]
    # one call per segment: text (one-head bias, folded), image and reference (no bias: jax binds a
    # [0] placeholder; they do not depend on the table, so vmap leaves them alone)
    assert calls == [((V * B, L, 2, 16), (V * B, 1, L, T)), ((B, L, 2, 16), (0,)), ((B, L, 2, 16), (0,))]
    qs = jnp.stack([q] * V)  # queries batched too, as in every block after the first of a sweep
    jaxpr = jax.make_jaxpr(jax.vmap(lambda q, a: _attend(q, k, v, a, groups, numerics._partial_cudnn)))(qs, allowed)
    calls = [(tuple(c.invars[0].aval.shape), tuple(c.invars[3].aval.shape)) for c in _cudnn_calls(jaxpr.jaxpr)]
    assert calls == [((V * B, L, 2, 16), (V * B, 1, L, T)), ((V * B, L, 2, 16), (0,)), ((V * B, L, 2, 16), (0,))]


def _cudnn_calls(jaxpr):
    """The cuDNN forward primitives bound anywhere in a jaxpr (inside jit, scan, custom rules)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("dot_product_attention_fwd"):
            found.append(eqn)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    found += _cudnn_calls(item.jaxpr)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    found += _cudnn_calls(item)
    return found


# StableHLO of one cuDNN forward: the bias-taking custom call and the operands' types.
_CUSTOM_CALL = re.compile(r"custom_call @__cudnn\$fmha(\w*)\(.*?\) \{.*?\} : \(([^)]*)\)")


def _lowered_cudnn_calls(text):
    return [(name, [t.strip() for t in types_.split(", ")]) for name, types_ in _CUSTOM_CALL.findall(text)]


def _sweep_cudnn_calls(layout, cells, config=TINY):
    """The cuDNN calls of the experiments' vmapped sampler over `cells` (bf16 shapes, 2 steps),
    lowered for CUDA."""
    from experiments.sweep import _sample_many

    sds = jax.ShapeDtypeStruct
    traced = _sample_many.trace(
        fluxjax.param_shapes(config, jnp.bfloat16), sds((1, layout.n_txt, config.context_in_dim), jnp.bfloat16),
        jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids()),
        sds((1, layout.n_img, config.in_channels), jnp.bfloat16),
        sds((1, layout.n_ref, config.in_channels), jnp.bfloat16), None, cells,
        np.linspace(1, 0, 3, dtype=np.float32), config=config,
        options=fluxjax.SamplerOptions(num_steps=2, guidance="none"), runtime=fluxjax.RuntimeOptions(attention="cudnn"))
    return _lowered_cudnn_calls(traced.lower(lowering_platforms=("cuda",)).as_text())


def test_vmapped_knockout_sweep_lowers_for_cuda(cudnn_version):
    """The experiments' sweep program (`experiments.sweep._sample_many`: the sampler vmapped over
    knockout tables) at tiny size in bfloat16 with cuDNN attention, lowered for the CUDA platform:
    every block's segments are cuDNN calls, the text span's with a one-head bias over V * B."""
    from fluxjax.interventions import Interventions, stack

    config = TINY
    layout = fluxjax.TokenLayout(n_txt=16, img_grid=(4, 4), ref_grids=((4, 4),))
    content = np.zeros((1, layout.n_txt), bool)
    content[0, 2:6] = True
    cells = stack([Interventions(knockout=fluxjax.knockout(config, layout, content, c)) for c in CELLS])
    calls = _sweep_cudnn_calls(layout, cells)
    V, L = len(CELLS), layout.total
    # the scans hold one double and one single block body: three segments each (text, image, reference)
    assert len(calls) == 6, [c[0] for c in calls]
    biased = [operands for name, operands in calls if name == "ScaleBiasSoftmax"]
    assert len(biased) == 2
    for operands in biased:
        heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
        assert operands[0] == f"tensor<{V}x{L}x{heads}x{head_dim}xbf16>"
        assert operands[3] == f"tensor<{V}x1x{L}x{layout.n_txt}xbf16>"


def test_vmapped_substitution_sweep_lowers_for_cuda(cudnn_version):
    """The plain cuDNN path (no mask: `jax.nn.dot_product_attention`) under the same vmap, as the
    lens and patching experiments run it: jax's batching rule flattens V into the batch."""
    from fluxjax.interventions import Interventions, stack, substitution

    config = TINY
    layout = fluxjax.TokenLayout(n_txt=16, img_grid=(4, 4), ref_grids=((4, 4),))
    value = jnp.zeros((1, layout.n_txt, config.hidden_size), jnp.bfloat16)
    cells = stack([Interventions(substitutions=(substitution(b, value),)) for b in range(3)])
    calls = _sweep_cudnn_calls(layout, cells)
    assert len(calls) == 2 and all(name == "Softmax" for name, _ in calls), calls  # the no-bias kernel
    assert all(operands[0].startswith(f"tensor<3x{layout.total}x") for _, operands in calls)
