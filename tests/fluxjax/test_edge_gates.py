"""Edge gates (`fluxjax.edge_gates`, `numerics.gated_attention`): gate = 1 is the plain forward,
gate = 0 the knockout, and their gradients (and those of substitution values, the other input of
attribution patching) agree with finite differences, through the blocked kernel, the dense one and
the sampler. The cuDNN kernel's custom VJP is checked where a GPU is present."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, inputs, rel_err

import fluxjax
from fluxjax import numerics
from fluxjax.layout import key_segments

# Per-group partial attentions merged by their LSE weights vs one softmax (or fewer partials): the
# same terms summed in another order, float32 rounding only (as tests/fluxjax/test_attention_groups.py's
# GROUP_TOL, measured there at 3.6e-7 to 4.8e-7 for the merge).
GROUP_TOL = 1e-6
# Central differences in float32 with step 1e-2: truncation O(1e-4) relative, rounding of a metric
# of order 1 about 1e-7 / 1e-2 = 1e-5; 2e-3 relative leaves room for both and still fails a gradient
# that misses a term (a dropped LSE cotangent changes it by tens of percent).
FD_STEP = 1e-2
FD_TOL = 2e-3

LAYOUT = fluxjax.TokenLayout(n_txt=12, img_grid=(3, 4), ref_grids=((2, 3),))
CONTENT = np.zeros((2, LAYOUT.n_txt), bool)
CONTENT[0, 2:7] = True  # sample 1 has no content tokens: an empty key group, which must not give NaN


@pytest.fixture(scope="module")
def model():
    params = fluxjax.init_params(TINY, jax.random.key(0))
    img, txt = inputs(TINY, LAYOUT, batch=2, seed=1)
    data = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray([0.4, 0.9], jnp.float32),
            jnp.asarray(LAYOUT.img_ids()), jnp.asarray(LAYOUT.txt_ids()))
    return params, data


_jit_forward = jax.jit(fluxjax.forward, static_argnames=("config", "attn_impl"))


def _forward(model, iv, attn_impl="blocked"):
    params, data = model
    return _jit_forward(params, TINY, *data, interventions=iv, attn_impl=attn_impl)[0]


def _gates(value=1.0, per_head=True, softmax_fix=False):
    return fluxjax.edge_gates(TINY, LAYOUT, CONTENT, per_head=per_head, value=value, softmax_fix=softmax_fix)


@pytest.mark.parametrize("attn_impl", ["blocked"])
def test_open_gates_are_the_plain_forward_and_closed_ones_the_knockout(model, attn_impl):
    plain = np.asarray(_forward(model, None, attn_impl))
    ones = _gates()
    assert rel_err(np.asarray(_forward(model, fluxjax.Interventions(gates=ones), attn_impl)), plain) <= GROUP_TOL
    # per head and per block: edges closed by a gate of 0 against the same edges cut by a knockout
    knock = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text[padding]", "image->text[content]"], blocks="1:4",
                             heads=[1])
    closed = ones.replace(gate=jnp.where(knock.allowed, 1.0, 0.0))
    cut = np.asarray(_forward(model, fluxjax.Interventions(knockout=knock), attn_impl))
    assert rel_err(cut, plain) > 1e2 * GROUP_TOL  # the knockout changes the output
    assert rel_err(np.asarray(_forward(model, fluxjax.Interventions(gates=closed), attn_impl)), cut) <= GROUP_TOL


def test_gates_that_do_not_fit_the_forward_fail_in_one_line(model):
    ones = _gates()
    wrong = [(ones.replace(gate=ones.gate[:-1]), ValueError, r"edge gates table has shape \(4, "),
             (ones.replace(gate=ones.gate.astype(jnp.int32)), TypeError, "edge gates must be floating point"),
             (ones.replace(groups=ones.groups[:, :-1]), ValueError, "edge gates groups of shape"),
             (ones.replace(stream_counts=(1,)), ValueError, "edge gates built for an image stream of 1 tokens")]
    for gates, error, match in wrong:
        with pytest.raises(error, match=match) as e:
            _forward(model, fluxjax.Interventions(gates=gates))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("attn_impl", ["blocked", "xla"])
def test_gated_attention_equals_key_group_attention(attn_impl):
    """Gates shared by the heads or per head, with a knockout: open gates leave the knockout as it is;
    closing an edge's gate equals cutting it."""
    (q, k, v), _, groups, segments = _attention_case()
    G = LAYOUT.num_groups
    attend = jax.jit(numerics.attention, static_argnums=4)
    cut = jnp.ones((2, G, G), bool).at[0, 2, 3].set(False).at[1, 0, 1].set(False)
    ref = attend(q, k, v, numerics.KeyGroups(cut, groups, segments), "xla")
    for gate in (jnp.ones((G, G)), jnp.ones((2, G, G))):
        out = attend(q, k, v, numerics.KeyGroups(cut, groups, segments, gate=gate), attn_impl)
        assert np.abs(np.asarray(out - ref)).max() <= GROUP_TOL
    more = cut.at[1, 3, 2].set(False)
    ref = attend(q, k, v, numerics.KeyGroups(more, groups, segments), "xla")
    out = attend(q, k, v, numerics.KeyGroups(cut, groups, segments, gate=jnp.where(more, 1.0, 0.0)), attn_impl)
    assert np.abs(np.asarray(out - ref)).max() <= GROUP_TOL


def _directional(f, x):
    """(|g|, the derivative of f at x along g / |g| by central differences), g = reverse mode's
    gradient: equal only if g is the gradient (a wrong g has g_true . g != |g|^2); along g the
    difference quotient has no cancellation for float32 rounding to swamp."""
    grad = jax.grad(f)(x)
    assert np.isfinite(np.asarray(grad)).all()
    norm = jnp.sqrt(jnp.vdot(grad, grad))
    direction = grad / norm
    fd = (f(x + FD_STEP * direction) - f(x - FD_STEP * direction)) / (2 * FD_STEP)
    return float(norm), float(fd)


def _metric(out):
    """A smooth scalar of the image tokens' output, of order 1."""
    w = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape[-1]), jnp.float32)
    return jnp.mean(jnp.tanh(out[:, :LAYOUT.n_img]) @ w)


def _attention_case():
    rng = np.random.default_rng(2)
    shape = (2, LAYOUT.total, 2, 16)
    q, k, v = (jnp.asarray(rng.standard_normal(shape) * s, jnp.float32) for s in (2.0, 2.0, 1.0))
    readout = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    segments = key_segments(LAYOUT.n_txt, LAYOUT.total, LAYOUT.num_groups, (LAYOUT.n_img, *LAYOUT.ref_counts))
    return (q, k, v), readout, jnp.asarray(LAYOUT.group_ids(CONTENT)), segments


@pytest.mark.parametrize("attn_impl", ["blocked", "xla"])
def test_attention_gradients_match_finite_differences(attn_impl):
    """Gates, queries, keys and values at the attention level, with a knockout cutting one edge and
    sample 1's empty text[content] group: every gradient finite and equal to central differences."""
    (q, k, v), readout, groups, segments = _attention_case()
    G = LAYOUT.num_groups
    allowed = jnp.ones((2, G, G), bool).at[1, 2, 3].set(False)  # head 1: ref->image cut

    def m(gate, q, k, v):
        kg = numerics.KeyGroups(allowed, groups, segments, gate=gate)
        return jnp.sum(jnp.tanh(numerics.attention(q, k, v, kg, attn_impl)) * readout) / 10

    ones = jnp.ones((2, G, G), jnp.float32)
    args = (ones, q, k, v)
    grads = jax.jit(jax.grad(m, argnums=(0, 1, 2, 3)))(*args)
    value = jax.jit(m)
    for i, grad in enumerate(grads):  # along each argument's gradient (see _directional)
        assert np.isfinite(np.asarray(grad)).all()
        norm = jnp.sqrt(jnp.vdot(grad, grad))
        step = [FD_STEP * grad / norm if j == i else 0.0 for j in range(4)]
        fd = (value(*(a + d for a, d in zip(args, step))) - value(*(a - d for a, d in zip(args, step)))) / (2 * FD_STEP)
        assert abs(float(norm) - float(fd)) <= FD_TOL * float(norm), (i, float(norm), float(fd))
    assert float(grads[0][1, 2, 3]) == 0.0  # a cut edge: its gate does nothing


@pytest.mark.slow
@pytest.mark.parametrize("attn_impl", ["blocked", "xla"])
def test_gate_gradients_of_the_forward_match_finite_differences(model, attn_impl):
    gates = _gates()

    def f(g):
        return _metric(_forward(model, fluxjax.Interventions(gates=gates.replace(gate=g)), attn_impl))

    norm, fd = _directional(jax.jit(f), gates.gate)
    assert abs(norm - fd) <= FD_TOL * norm


@pytest.mark.slow
def test_substitution_and_gate_gradients_through_the_sampler(model):
    """Two Euler steps: the gradient with respect to an additive substitution (zero, every step) and to
    the gates, against central differences of the whole sampler."""
    params, (img, txt, _, img_ids, txt_ids) = model
    n = LAYOUT.n_img
    zero = jnp.zeros((2, 2, LAYOUT.n_txt, TINY.hidden_size), jnp.float32)
    gates = _gates()

    def run(value, gate):
        iv = fluxjax.Interventions(
            substitutions=(fluxjax.substitution("b2.text.output", fluxjax.per_step(value), keep=1.0),),
            gates=gates.replace(gate=gate))
        latents, _ = fluxjax.sample(params, TINY, fluxjax.SamplerOptions(num_steps=2), txt, LAYOUT.txt_ids(),
                                    LAYOUT.img_ids(), noise=img[:, :n], refs=img[:1, n:], interventions=iv,
                                    attn_impl="xla")
        return _metric(latents)

    norm, fd = _directional(lambda x: run(x, gates.gate), zero)
    assert abs(norm - fd) <= FD_TOL * norm
    norm, fd = _directional(lambda g: run(zero, g), gates.gate)
    assert abs(norm - fd) <= FD_TOL * norm


def test_softmax_fix_gives_each_edge_its_exact_attention_change():
    """At the attention level (a linear read-out of its output), minus the gradient at gate = 1 with
    the softmax fix equals the exact change of cutting that one edge in that one head; without the
    fix it is only the linear term."""
    (q, k, v), readout, groups, segments = _attention_case()
    G = LAYOUT.num_groups
    allowed = jnp.ones((2, G, G), bool)

    def m(gate, fix=False):
        kg = numerics.KeyGroups(allowed, groups, segments, gate=gate, softmax_fix=fix)
        return jnp.sum(numerics.attention(q, k, v, kg, "blocked") * readout)

    ones = jnp.ones((2, G, G), jnp.float32)
    fixed, linear = jax.jit(jax.grad(lambda g: m(g, True)))(ones), jax.jit(jax.grad(m))(ones)
    value = jax.jit(m)
    for h, gq, gk in [(0, 2, 3), (1, 0, 2), (1, 1, 3)]:  # ref->image, image->text[content], ref->text[padding]
        exact = float(value(ones.at[h, gq, gk].set(0.0)) - value(ones))
        assert abs(-float(fixed[h, gq, gk]) - exact) <= 1e-4 * max(1.0, abs(exact))
        assert abs(-float(linear[h, gq, gk]) - exact) > 1e-3 * abs(exact)  # linearising alone misses


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
def test_cudnn_gate_gradients_match_the_dense_kernel(model):
    """bfloat16 on cuDNN (custom VJP through `_partial_dense`) against float32 xla: relative error of
    the gate gradient within bfloat16's reach (3e-2)."""
    params, data = model
    gates = _gates()
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    data16 = tuple(d.astype(jnp.bfloat16) if d.dtype == jnp.float32 else d for d in data)

    def f(g, p, d, impl):
        out = fluxjax.forward(p, TINY, *d, interventions=fluxjax.Interventions(gates=gates.replace(gate=g)),
                              attn_impl=impl)[0]
        return _metric(out.astype(jnp.float32))

    ref = jax.grad(f)(gates.gate, params, data, "xla")
    got = jax.grad(f)(gates.gate, params16, data16, "cudnn")
    assert np.isfinite(np.asarray(got)).all()
    assert rel_err(np.asarray(got), np.asarray(ref)) <= 3e-2
