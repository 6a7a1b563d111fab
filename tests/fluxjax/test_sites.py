"""Sites as values: spellings, identities at every kind of site, captures keyed by site, the older
spellings, per-head knockouts, and compile counts (changing a site's value never recompiles; a
vmapped sweep over sites of one kind is one compiled call). On a tiny random fluxjax model.

Parity of the sites with PyTorch hooks on diffusers' modules is test_sites_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, inputs, rel_err

import fluxjax
from fluxjax.interventions import BLOCK0_INPUT, stack
from fluxjax.sites import POINTS, STREAMS, as_site

# vmapped vs looped forward: XLA batches the matmuls differently (float32 rounding, ~1e-7 measured).
SWEEP_TOL = 1e-6

LAYOUT = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=((2, 3), (2, 2)))
CONTENT = np.zeros((2, LAYOUT.n_txt), bool)
CONTENT[0, 1:5] = True
CONTENT[1, 2:4] = True
NB, D = TINY.num_blocks, TINY.hidden_size
SIZES = {"text": LAYOUT.n_txt, "image": LAYOUT.n_img, "reference": LAYOUT.n_ref}
KINDS = [(s, p) for s in STREAMS for p in POINTS]
EVERY_SITE = fluxjax.Capture(sites=tuple(fluxjax.site(-1, s, "output") for s in STREAMS) +
                             tuple(fluxjax.site(b, s, p) for b in range(NB) for s, p in KINDS))

fwd = jax.jit(fluxjax.forward, static_argnames=("config", "capture", "num_ref_tokens", "attn_impl"))


@pytest.fixture(scope="module")
def params():
    return fluxjax.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
    img, txt = inputs(TINY, LAYOUT, batch=2, seed=1)
    return dict(img=jnp.asarray(img), txt=jnp.asarray(txt), t=jnp.asarray([0.4, 0.9], jnp.float32))


def run(params, data, iv=None, capture=None, **kwargs):
    return fwd(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
               interventions=iv, capture=capture, num_ref_tokens=LAYOUT.n_ref, **kwargs)


@pytest.fixture(scope="module")
def every(params, data):
    """The plain output and every site's activation."""
    out, caps = run(params, data, capture=EVERY_SITE)
    return np.asarray(out), caps


# ------------------------------------------------------------------------------------------------
# spellings


def test_site_spellings():
    s = fluxjax.site(17, "text", "attn_out")
    assert s.name == str(s) == "b17.text.attn_out"
    assert as_site("b17.text.attn_out") == as_site((17, "text", "attn_out")) == fluxjax.site(s) == s
    assert as_site("embed.image.output") == as_site("b-1.image.output") == fluxjax.site(-1, "image", "output")
    assert as_site(BLOCK0_INPUT).name == "embed.text.output"  # the older integer sites: the text stream
    assert as_site(3) == fluxjax.site(3, "text", "output")
    assert sorted([as_site("b2.text.output"), as_site("b1.image.input")])[0].block == 1  # ordered: keys sort


@pytest.mark.parametrize("bad, error, match", [
    ("b3.txt.output", ValueError, "unknown stream 'txt'"),
    ("b3.text.attn", ValueError, "unknown point 'attn'"),
    ("block3.text.output", ValueError, "does not read 'b<block>.<stream>.<point>'"),
    ("embed.text.input", ValueError, "-1 with point 'output'"),
    ((2.5, "text", "output"), TypeError, "block must be an integer"),
    (-2, ValueError, "text site -2 out of range"),
    (object(), TypeError, "is not a site"),
])
def test_bad_sites_fail_in_one_line_naming_the_spelling(bad, error, match):
    with pytest.raises(error, match=match) as e:
        as_site(bad)
    assert "\n" not in str(e.value)


def test_older_spellings_keep_working(params, data, every):
    """Capture(text=...), integer sites and BLOCK0_INPUT give what the named sites give."""
    out, caps = run(params, data, capture=fluxjax.Capture(text=(3, BLOCK0_INPUT, 1), image=(0,),
                                                          image_tokens=LAYOUT.n_img))
    np.testing.assert_array_equal(np.asarray(out), every[0])
    assert caps.text.shape == (3, 2, LAYOUT.n_txt, D) and caps.image.shape == (1, 2, LAYOUT.n_img, D)
    for j, name in enumerate(("b3.text.output", "embed.text.output", "b1.text.output")):
        np.testing.assert_array_equal(np.asarray(caps.text[j]), np.asarray(every[1][name]))
    np.testing.assert_array_equal(np.asarray(caps.image[0]), np.asarray(every[1]["b0.image.output"]))
    rng = np.random.default_rng(8)  # (not a constant shift: every block reads its streams through a LayerNorm)
    value = rng.standard_normal((2, LAYOUT.n_txt, D)).astype(np.float32)
    older = run(params, data, fluxjax.Interventions(substitutions=(fluxjax.substitution(2, value),)))[0]
    named = run(params, data, fluxjax.Interventions(substitutions=(fluxjax.substitution("b2.text.output", value),)))[0]
    np.testing.assert_array_equal(np.asarray(older), np.asarray(named))
    assert rel_err(named, every[0]) > 1e-3
    image = rng.standard_normal((2, LAYOUT.n_img, D)).astype(np.float32)  # the older image-stream spelling
    older = run(params, data, fluxjax.Interventions(image_substitutions=(fluxjax.substitution(3, image),)))[0]
    named = run(params, data, fluxjax.Interventions(substitutions=(fluxjax.substitution("b3.image.output", image),)))[0]
    np.testing.assert_array_equal(np.asarray(older), np.asarray(named))
    assert rel_err(named, every[0]) > 1e-3


def test_captures_are_keyed_by_site(every):
    _, caps = every
    assert len(caps) == len(EVERY_SITE.sites) and "b4.reference.mlp_out" in caps
    assert caps[fluxjax.site(4, "reference", "mlp_out")].shape == (2, LAYOUT.n_ref, D)
    assert caps.text is None and caps.image is None  # nothing asked in the older spelling
    # nothing beyond the request: one buffer per kind, one slot per site
    assert sum(x.size for x in jax.tree_util.tree_leaves(caps)) == \
        2 * D * sum(SIZES[s.stream] for s in EVERY_SITE.sites)
    with pytest.raises(KeyError, match="b1.text.output was not captured"):
        fluxjax.Captures()["b1.text.output"]
    # the input of block b is the output of block b - 1, across the join of the streams too
    for b in range(1, NB):
        for s in STREAMS:
            np.testing.assert_array_equal(np.asarray(caps[f"b{b}.{s}.input"]), np.asarray(caps[f"b{b - 1}.{s}.output"]))


# ------------------------------------------------------------------------------------------------
# identities at every kind of site


def _one_per_kind(block, values=None, masks=None):
    """A substitution at every kind of site (stream, point) of `block`, in one structure: the tests
    below vary only its values, so they share one compiled program. values, masks: by site name
    (default: zeros, masks empty)."""
    values, masks = values or {}, masks or {}
    subs = []
    for s, p in KINDS:
        name = f"b{block}.{s}.{p}"
        subs.append(fluxjax.substitution(name, values.get(name, np.zeros((2, SIZES[s], D), np.float32)),
                                         masks.get(name, np.zeros((2, SIZES[s]), bool))))
    return fluxjax.Interventions(substitutions=tuple(subs))


def test_substituting_own_activations_at_every_kind_changes_nothing(params, data, every):
    """Twelve substitutions (every stream and point) at one block, each writing the site's own value
    everywhere: the output is bit-identical, in a double block and in a single block (where the
    fused output projection is kept wherever nothing changed)."""
    out_plain, caps = every
    for block in (1, 3):
        names = [f"b{block}.{s}.{p}" for s, p in KINDS]
        iv = _one_per_kind(block, {n: caps[n] for n in names}, {n: np.ones((2, caps[n].shape[1]), bool) for n in names})
        out, _ = run(params, data, iv, EVERY_SITE)
        np.testing.assert_array_equal(np.asarray(out), out_plain)


def test_empty_masks_at_every_kind_change_nothing(params, data, every):
    rng = np.random.default_rng(2)
    iv = _one_per_kind(3, {f"b3.{s}.{p}": rng.standard_normal((2, SIZES[s], D)).astype(np.float32) for s, p in KINDS})
    out, caps = run(params, data, iv, EVERY_SITE)
    np.testing.assert_array_equal(np.asarray(out), every[0])
    for name in caps.keys():
        np.testing.assert_array_equal(np.asarray(caps[name]), np.asarray(every[1][name]))


def test_a_substitution_writes_only_its_stream_and_tokens(params, data, every):
    """The image stream's attention contribution in block 1, where the mask says: the captured value
    is the new one there and the old one elsewhere; the text and reference streams of that point
    are untouched, and everything downstream moves."""
    noise = np.random.default_rng(4).standard_normal((2, LAYOUT.n_img, D)).astype(np.float32)
    mask = np.random.default_rng(5).random((2, LAYOUT.n_img)) < 0.5
    iv = _one_per_kind(1, {"b1.image.attn_out": noise}, {"b1.image.attn_out": mask})
    out, caps = run(params, data, iv, EVERY_SITE)
    old = every[1]
    np.testing.assert_array_equal(np.asarray(caps["b1.image.attn_out"]),
                                  np.where(mask[..., None], noise, np.asarray(old["b1.image.attn_out"])))
    for name in ("b1.text.attn_out", "b1.reference.attn_out", "b1.text.input", "b0.image.output"):
        np.testing.assert_array_equal(np.asarray(caps[name]), np.asarray(old[name]))
    assert rel_err(caps["b1.image.output"], old["b1.image.output"]) > 1e-2
    assert rel_err(caps["b2.text.output"], old["b2.text.output"]) > 1e-4  # through attention, one block later
    assert rel_err(out, every[0]) > 1e-3


def test_single_block_contributions_are_parts_of_one_projection(params, data, every):
    """A single block's output is input + gate * (attn_out + mlp_out): moving the attention's
    contribution into the MLP's (attn_out 0, mlp_out the sum) gives the same output, to the
    rounding of the fused projection against its two parts."""
    caps = every[1]
    both = np.asarray(caps["b3.text.attn_out"]) + np.asarray(caps["b3.text.mlp_out"])
    full = np.ones((2, LAYOUT.n_txt), bool)
    iv = _one_per_kind(3, {"b3.text.mlp_out": both}, {"b3.text.attn_out": full, "b3.text.mlp_out": full})
    out, after = run(params, data, iv, EVERY_SITE)
    np.testing.assert_array_equal(np.asarray(after["b3.text.attn_out"]), 0)
    assert rel_err(after["b3.text.output"], caps["b3.text.output"]) <= SWEEP_TOL
    assert rel_err(out, every[0]) <= SWEEP_TOL


# ------------------------------------------------------------------------------------------------
# per-head knockouts


def test_per_head_knockout_identities(params, data, every):
    shared = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text", "image->ref"], "1:4")
    all_heads = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text", "image->ref"], "1:4", heads="all")
    assert np.shape(all_heads.allowed) == (NB, TINY.num_heads, LAYOUT.num_groups, LAYOUT.num_groups)
    a = run(params, data, fluxjax.Interventions(knockout=shared))[0]
    b = run(params, data, fluxjax.Interventions(knockout=all_heads))[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    one = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text", "image->ref"], "1:4", heads=[1])
    c = run(params, data, fluxjax.Interventions(knockout=one))[0]
    assert rel_err(c, a) > 1e-4 and rel_err(c, every[0]) > 1e-4  # one head of two: neither none nor all
    both = one & fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text", "image->ref"], "1:4", heads=[0])
    np.testing.assert_array_equal(np.asarray(both.allowed), np.asarray(all_heads.allowed))
    mixed = one & shared  # a shared table combines with a per-head one head by head
    np.testing.assert_array_equal(np.asarray(mixed.allowed), np.asarray(all_heads.allowed))


def test_per_head_knockout_errors():
    with pytest.raises(ValueError, match="knockout heads \\[2\\] out of range: the valid heads are 0..1"):
        fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", heads=[2])
    with pytest.raises(ValueError, match=r"image queries of sample 0 .* block 0 \(head 1\)"):
        fluxjax.knockout(TINY, LAYOUT, CONTENT, ["text->image", "image->image", "ref->image"], blocks=0, heads=1)


# ------------------------------------------------------------------------------------------------
# errors


def test_stream_sites_need_to_know_the_references(params, data):
    value = np.zeros((2, LAYOUT.n_img, D), np.float32)
    iv = fluxjax.Interventions(substitutions=(fluxjax.substitution("b1.image.output", value),))
    with pytest.raises(ValueError, match="pass num_ref_tokens=layout.n_ref"):
        fluxjax.forward(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
                        interventions=iv)
    with pytest.raises(ValueError, match="does not fit the image stream"):
        run(params, data, fluxjax.Interventions(substitutions=(
            fluxjax.substitution("b1.image.output", np.zeros((2, LAYOUT.n_image_stream, D), np.float32)),)))
    drop = fluxjax.drop_reference(LAYOUT, 2)
    ref = np.zeros((2, LAYOUT.n_ref, D), np.float32)

    def eager(iv, capture=None):  # outside jit the blocks are concrete and checked
        return fluxjax.forward(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
                               interventions=iv, capture=capture, num_ref_tokens=LAYOUT.n_ref)

    with pytest.raises(ValueError, match="references leave the sequence at block 2"):
        eager(fluxjax.Interventions(substitutions=(fluxjax.substitution("b3.reference.input", ref),),
                                    drop_reference=drop))
    with pytest.raises(ValueError, match="capture site b2.reference.input: the references leave"):
        eager(fluxjax.Interventions(drop_reference=drop), fluxjax.Capture(sites=("b2.reference.input",)))
    with pytest.raises(ValueError, match="block -1 out of range for image.attn_out"):
        eager(fluxjax.Interventions(substitutions=(
            fluxjax.substitution(fluxjax.site(0, "image", "attn_out"), value).replace(block=jnp.int32(-1)),)))
    with pytest.raises(ValueError, match="num_ref_tokens 30 does not fit"):
        fluxjax.forward(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
                        num_ref_tokens=30)


# ------------------------------------------------------------------------------------------------
# compile once


def test_changing_a_sites_value_never_recompiles(params, data):
    """Blocks, values, masks and keep weights of substitutions of fixed kinds, and the knockout's
    tables: one trace for all of them."""
    traces = []

    def counted(params, iv):
        traces.append(1)  # runs only while tracing
        return fluxjax.forward(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
                               interventions=iv, num_ref_tokens=LAYOUT.n_ref)[0]

    f = jax.jit(counted)
    rng = np.random.default_rng(0)
    outs = []
    for block, keep, heads in ((0, 0.0, [0]), (3, 1.0, [1]), (4, 0.5, "all")):
        iv = fluxjax.Interventions(substitutions=(
            fluxjax.substitution(fluxjax.site(block, "image", "attn_out"),
                                 rng.standard_normal((2, LAYOUT.n_img, D)).astype(np.float32),
                                 rng.random((2, LAYOUT.n_img)) < 0.5, keep),
            fluxjax.substitution(fluxjax.site(NB - 1 - block, "reference", "mlp_out"),
                                 rng.standard_normal((2, LAYOUT.n_ref, D)).astype(np.float32))),
            knockout=fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", f"{block}:", heads=heads))
        outs.append(f(params, iv))
    assert len(traces) == 1
    assert rel_err(outs[0], outs[1]) > 1e-3 and rel_err(outs[1], outs[2]) > 1e-3  # the values did act


@pytest.mark.parametrize("kind", [("image", "attn_out"), ("reference", "output")])
def test_vmapped_sweep_over_sites_of_one_kind_is_one_compiled_call(params, data, every, kind):
    """Another run's activation at each block's site, substituted there: one vmapped call over every
    block (one trace, one compile) equals one call per block."""
    stream, point = kind
    other = dict(data, img=data["img"][::-1], txt=data["txt"][::-1])
    _, source = run(params, other, capture=EVERY_SITE)
    blocks = range(NB)
    cells = stack([fluxjax.Interventions(substitutions=(
        fluxjax.substitution(fluxjax.site(b, stream, point), source[f"b{b}.{stream}.{point}"]),)) for b in blocks])
    assert cells.substitutions[0].block.shape == (NB,)
    traces = []

    def one(iv):
        traces.append(1)
        return fluxjax.forward(params, TINY, data["img"], data["txt"], data["t"], LAYOUT.img_ids(), LAYOUT.txt_ids(),
                               interventions=iv, num_ref_tokens=LAYOUT.n_ref)[0]

    swept = jax.jit(jax.vmap(one))
    out = swept(cells)
    assert len(traces) == 1 and swept._cache_size() == 1
    for b in blocks:
        iv = jax.tree_util.tree_map(lambda a: a[b], cells)
        assert rel_err(out[b], run(params, data, iv)[0]) <= SWEEP_TOL
    assert rel_err(out[0], out[-1]) > 1e-4 and rel_err(out[0], every[0]) > 1e-4


def test_sampler_takes_stream_sites(params, data, every):
    """Through `fluxjax.sample`: image-stream captures with a step axis, and the captured values
    substituted back step by step (per_step) change nothing."""
    options = fluxjax.SamplerOptions(num_steps=2)
    noise = data["img"][:, :LAYOUT.n_img]
    refs = data["img"][:, LAYOUT.n_img:]
    cap = fluxjax.Capture(sites=("b1.image.output", "b3.reference.attn_out"))
    latents, caps = fluxjax.sample(params, TINY, options, data["txt"], LAYOUT.txt_ids(), LAYOUT.img_ids(),
                                   noise=noise, refs=refs, capture=cap)
    assert caps["b1.image.output"].shape == (2, 2, LAYOUT.n_img, D)
    assert caps["b3.reference.attn_out"].shape == (2, 2, LAYOUT.n_ref, D)
    iv = fluxjax.Interventions(substitutions=(
        fluxjax.substitution("b1.image.output", fluxjax.per_step(caps["b1.image.output"])),))
    again, _ = fluxjax.sample(params, TINY, options, data["txt"], LAYOUT.txt_ids(), LAYOUT.img_ids(),
                              noise=noise, refs=refs, interventions=iv)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(latents))
