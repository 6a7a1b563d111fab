"""Interventions as identities, shapes, errors, sweeps and traces, on a tiny random fluxjax model.

Parity with the same interventions done in diffusers lives in test_interventions_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, inputs, rel_err

import fluxjax
from fluxjax.interventions import BLOCK0_INPUT, block_indices, stack

# Removing the references from the sequence vs masking every edge into and out of them: the same
# nonzero terms in every softmax sum, in a different reduction order (float32 rounding, ~1e-7).
DROP_TOL = 1e-6
# An all-True knockout mask vs no mask: XLA fuses the masked softmax differently (float32
# rounding, 1.5e-7 measured).
MASK_TOL = 1e-6
# vmapped vs looped forward: XLA batches the matmuls differently (float32 rounding, ~1e-7).
SWEEP_TOL = 1e-6

LAYOUT = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=((2, 3), (2, 2)))
CONTENT = np.zeros((2, LAYOUT.n_txt), bool)
CONTENT[0, 1:5] = True
CONTENT[1, 2:4] = True
NB = TINY.num_blocks  # 2 double (0, 1) + 3 single (2, 3, 4)

# Every distinct intervention structure or capture spec is one more compile (seconds each here), so
# the tests share a few of them.
CAP_TEXT = fluxjax.Capture(text=range(BLOCK0_INPUT, NB))  # the text stream at every site
CAP_DROP = fluxjax.Capture(text=(1, NB - 1), image=(0, 3), image_tokens=LAYOUT.n_img)

fwd = jax.jit(fluxjax.forward, static_argnames=("config", "capture", "attn_impl"))


@pytest.fixture(scope="module")
def params():
    return fluxjax.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
    img, txt = inputs(TINY, LAYOUT, batch=2, seed=1)
    return dict(img=jnp.asarray(img), txt=jnp.asarray(txt), timestep=jnp.asarray([0.4, 0.9], jnp.float32),
                img_ids=jnp.asarray(LAYOUT.img_ids()), txt_ids=jnp.asarray(LAYOUT.txt_ids()))


def run(params, data, **kwargs):
    d = dict(data, **{k: kwargs.pop(k) for k in list(kwargs) if k in data})
    return fwd(params, TINY, d["img"], d["txt"], d["timestep"], d["img_ids"], d["txt_ids"], **kwargs)


@pytest.fixture(scope="module")
def plain(params, data):
    return np.asarray(run(params, data)[0])


@pytest.fixture(scope="module")
def all_text(params, data):
    """The plain run's output and its text stream at every site, -1..NB-1."""
    out, caps = run(params, data, capture=CAP_TEXT)
    assert caps.image is None
    return np.asarray(out), caps.text


# ------------------------------------------------------------------------------------------------
# identities


def test_no_intervention_is_bit_identical(params, data, plain):
    """`plain` ran with interventions=None and no capture spec; an empty Interventions() and an
    empty Capture() change nothing either (one call, to save a compile)."""
    out, caps = run(params, data, interventions=fluxjax.Interventions(), capture=fluxjax.Capture())
    np.testing.assert_array_equal(np.asarray(out), plain)
    assert caps.text is None and caps.image is None


def test_all_allowed_knockout_equals_no_knockout(params, data, plain):
    iv = fluxjax.Interventions(knockout=fluxjax.allow_all(TINY, LAYOUT, CONTENT))
    out = np.asarray(run(params, data, interventions=iv)[0])
    assert rel_err(out, plain) <= MASK_TOL


@pytest.mark.parametrize("site", [BLOCK0_INPUT, 1, 3])  # block-0 input, a double block, a single block
def test_substituting_own_activations_changes_nothing(params, data, all_text, site):
    out_plain, text = all_text
    sub = fluxjax.substitution(site, text[site - BLOCK0_INPUT])
    out, _ = run(params, data, interventions=fluxjax.Interventions(substitutions=(sub,)), capture=CAP_TEXT)
    np.testing.assert_array_equal(np.asarray(out), out_plain)


@pytest.mark.parametrize("site", [BLOCK0_INPUT, 1, 3])
def test_empty_substitution_mask_changes_nothing(params, data, all_text, site):
    noise = jax.random.normal(jax.random.key(3), (2, LAYOUT.n_txt, TINY.hidden_size))
    sub = fluxjax.substitution(site, noise, np.zeros((2, LAYOUT.n_txt), bool))
    out, caps = run(params, data, interventions=fluxjax.Interventions(substitutions=(sub,)), capture=CAP_TEXT)
    np.testing.assert_array_equal(np.asarray(out), all_text[0])
    np.testing.assert_array_equal(np.asarray(caps.text), np.asarray(all_text[1]))


def test_substitution_changes_only_what_its_mask_selects(params, data, all_text):
    """Padding-only substitution at block 1: the captured stream at block 1 is the new value at
    padding positions and the old one at content positions."""
    _, text = all_text
    noise = jax.random.normal(jax.random.key(4), (2, LAYOUT.n_txt, TINY.hidden_size))
    padding = LAYOUT.text_mask("text[padding]", CONTENT)
    iv = fluxjax.Interventions(substitutions=(fluxjax.substitution(1, noise, padding),))
    out, caps = run(params, data, interventions=iv, capture=CAP_TEXT)
    np.testing.assert_array_equal(np.asarray(caps.text[:2]), np.asarray(text[:2]))  # upstream of block 1
    np.testing.assert_array_equal(np.asarray(caps.text[2]),
                                  np.where(padding[..., None], np.asarray(noise), np.asarray(text[2])))
    assert rel_err(out, all_text[0]) > 1e-2


CAP_IMAGE = fluxjax.Capture(image=range(BLOCK0_INPUT, NB))  # the whole image stream at every site


@pytest.fixture(scope="module")
def all_image(params, data):
    """The plain run's output and its image stream (noisy image, then references) at every site."""
    out, caps = run(params, data, capture=CAP_IMAGE)
    return np.asarray(out), caps.image


@pytest.mark.parametrize("site", [BLOCK0_INPUT, 1, 3])  # block-0 input, a double block, a single block
def test_substituting_own_image_activations_changes_nothing(params, data, all_image, site):
    """The image-stream substitution (the study's image-category T2I Lens): the noisy-image tokens'
    own activations written back leave the output bit-identical."""
    out_plain, image = all_image
    sub = fluxjax.substitution(site, image[site - BLOCK0_INPUT][:, :LAYOUT.n_img])
    out, _ = run(params, data, interventions=fluxjax.Interventions(image_substitutions=(sub,)), capture=CAP_IMAGE)
    np.testing.assert_array_equal(np.asarray(out), out_plain)


@pytest.mark.parametrize("site", [1, 3])
def test_image_substitution_writes_only_the_leading_tokens_its_mask_selects(params, data, all_image, site):
    """A value of the noisy image's N tokens, half of them masked: the stream at the site holds the
    value there and its own activations elsewhere, the references untouched; the text stream's
    substitutions are not touched by it."""
    _, image = all_image
    noise = jax.random.normal(jax.random.key(5), (2, LAYOUT.n_img, TINY.hidden_size))
    mask = np.zeros((2, LAYOUT.n_img), bool)
    mask[:, ::2] = True
    iv = fluxjax.Interventions(image_substitutions=(fluxjax.substitution(site, noise, mask),))
    out, caps = run(params, data, interventions=iv, capture=CAP_IMAGE)
    at = site - BLOCK0_INPUT
    np.testing.assert_array_equal(np.asarray(caps.image[:at]), np.asarray(image[:at]))  # upstream of the site
    got, own = np.asarray(caps.image[at]), np.asarray(image[at])
    np.testing.assert_array_equal(got[:, :LAYOUT.n_img], np.where(mask[..., None], np.asarray(noise),
                                                                  own[:, :LAYOUT.n_img]))
    np.testing.assert_array_equal(got[:, LAYOUT.n_img:], own[:, LAYOUT.n_img:])  # the references
    assert rel_err(out, all_image[0]) > 1e-2


def test_an_image_substitution_longer_than_the_stream_is_refused(params, data):
    too_long = jnp.zeros((1, LAYOUT.n_img + LAYOUT.n_ref + 1, TINY.hidden_size))
    with pytest.raises(ValueError, match="image substitution 0: value"):
        run(params, data, interventions=fluxjax.Interventions(image_substitutions=(fluxjax.substitution(1, too_long),)))
    with pytest.raises(ValueError, match="image substitution 0: site 99 out of range"):
        fluxjax.interventions.check_sites(fluxjax.Interventions(
            image_substitutions=(fluxjax.substitution(99, too_long[:, :2]),)), TINY)


# ------------------------------------------------------------------------------------------------
# captures


def test_captures_are_exactly_the_requested_sites(params, data, plain, all_text):
    _, text = all_text
    cap = fluxjax.Capture(text=(4, BLOCK0_INPUT, 2), image=(0,), image_tokens=LAYOUT.n_img)
    out, caps = run(params, data, capture=cap)
    np.testing.assert_array_equal(np.asarray(out), plain)
    B, T, D = 2, LAYOUT.n_txt, TINY.hidden_size
    assert caps.text.shape == (3, B, T, D) and caps.image.shape == (1, B, LAYOUT.n_img, D)
    leaves = jax.tree_util.tree_leaves(caps)
    assert sum(x.size for x in leaves) == 3 * B * T * D + B * LAYOUT.n_img * D  # nothing beyond the request
    for j, site in enumerate(cap.text):  # in the order asked, each its own site
        np.testing.assert_array_equal(np.asarray(caps.text[j]), np.asarray(text[site - BLOCK0_INPUT]))
    _, whole = run(params, data, capture=fluxjax.Capture(image=(BLOCK0_INPUT, 0)))  # the whole image stream
    assert whole.text is None and whole.image.shape == (2, B, LAYOUT.n_image_stream, D)
    np.testing.assert_allclose(whole.image[0], data["img"] @ params.img_in, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(whole.image[1, :, :LAYOUT.n_img]), np.asarray(caps.image[0]))


def test_block0_input_capture_is_the_text_projection(params, data, all_text):
    np.testing.assert_allclose(all_text[1][0], data["txt"] @ params.txt_in, rtol=1e-6, atol=1e-6)


def test_capture_errors():
    with pytest.raises(ValueError, match="repeat"):
        fluxjax.Capture(text=(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        fluxjax.Capture(text=(NB,)).validate(TINY)
    with pytest.raises(ValueError, match="out of range"):
        fluxjax.Capture(image=(-2,)).validate(TINY)


# ------------------------------------------------------------------------------------------------
# knockout builders


def test_block_ranges():
    assert block_indices("all", 5) == [0, 1, 2, 3, 4]
    assert block_indices(":2", 5) == [0, 1]
    assert block_indices("3:", 5) == [3, 4]
    assert block_indices("1:3", 5) == [1, 2]
    assert block_indices(2, 5) == [2]
    assert block_indices([4, 0, 4], 5) == [0, 4]
    assert block_indices(range(1, 3), 5) == [1, 2]
    for bad in (5, [0, 7], "-1:", "1:2:3"):
        with pytest.raises(ValueError):
            block_indices(bad, 5)


@pytest.mark.parametrize("blocks, expect", [("all", [0, 1, 2, 3, 4]), (":2", [0, 1]), ("3:", [3, 4]),
                                            (2, [2]), ([0, 4], [0, 4]), (range(1, 4), [1, 2, 3])])
def test_knockout_blocks_and_edges(blocks, expect):
    k = fluxjax.knockout(TINY, LAYOUT, CONTENT, ["ref->text[padding]", "image->ref"], blocks)
    allowed = np.asarray(k.allowed)
    assert allowed.shape == (NB, LAYOUT.num_groups, LAYOUT.num_groups)
    cut = np.ones(allowed.shape[1:], bool)
    for ref in (3, 4):
        cut[1, ref] = False  # text[padding] queries may not read references
        cut[ref, 2] = False  # reference queries may not read the image
    for b in range(NB):
        np.testing.assert_array_equal(allowed[b], cut if b in expect else np.ones_like(cut))
    np.testing.assert_array_equal(np.asarray(k.groups), LAYOUT.group_ids(CONTENT))


def test_knockout_combination_with_and():
    a = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", ":2")
    b = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->image", "3:")
    both = np.asarray((a & b).allowed)
    np.testing.assert_array_equal(both, np.asarray(a.allowed) & np.asarray(b.allowed))
    other = fluxjax.knockout(TINY, LAYOUT, ~CONTENT, "ref->image", "3:")
    with pytest.raises(ValueError, match="content masks"):
        a & other


def test_knockout_leaving_a_query_without_keys_raises():
    with pytest.raises(ValueError, match="image queries .* no key .* block 3"):
        fluxjax.knockout(TINY, LAYOUT, CONTENT, ["text->image", "image->image", "ref->image"], blocks=3)
    with pytest.raises(ValueError, match=r"ref\[1\] queries"):
        fluxjax.knockout(TINY, LAYOUT, CONTENT, ["text->ref[1]", "image->ref[1]", "ref->ref[1]"])
    # a group with no tokens in a sample has no queries there: cutting all its keys is fine
    no_content = np.zeros((1, LAYOUT.n_txt), bool)
    fluxjax.knockout(TINY, LAYOUT, no_content, ["text->text[content]", "image->text[content]",
                                                "ref->text[content]"])


def test_knockout_edge_errors():
    for bad in ("ref", "ref->nowhere", "ref[2]->text"):
        with pytest.raises(ValueError):
            fluxjax.knockout(TINY, LAYOUT, CONTENT, bad)


# ------------------------------------------------------------------------------------------------
# errors raised by forward for interventions that do not fit


def test_forward_rejects_what_does_not_fit(params, data):
    T, D = LAYOUT.n_txt, TINY.hidden_size
    bad_value = fluxjax.substitution(1, jnp.zeros((2, T + 1, D)))
    with pytest.raises(ValueError, match="does not fit the text stream"):
        run(params, data, interventions=fluxjax.Interventions(substitutions=(bad_value,)))
    with pytest.raises(ValueError, match="out of range"):  # checked where the site is concrete: outside jit
        fluxjax.forward(params, TINY, data["img"], data["txt"], data["timestep"], data["img_ids"], data["txt_ids"],
                        interventions=fluxjax.Interventions(substitutions=(fluxjax.substitution(NB, jnp.zeros((T, D))),)))
    with pytest.raises(ValueError):
        fluxjax.substitution(-2, jnp.zeros((T, D)))
    with pytest.raises(ValueError, match="mask"):
        fluxjax.substitution(0, jnp.zeros((2, T, D)), np.ones((2, T + 1), bool))
    other = fluxjax.TokenLayout(n_txt=T, img_grid=(3, 4), ref_grids=((2, 3),))
    wrong_layout = fluxjax.knockout(TINY, other, CONTENT, "ref->text")
    with pytest.raises(ValueError, match="knockout groups"):
        run(params, data, interventions=fluxjax.Interventions(knockout=wrong_layout))
    right = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text")
    with pytest.raises(ValueError, match="boolean"):
        run(params, data, interventions=fluxjax.Interventions(knockout=right.replace(allowed=right.allowed.astype(int))))
    with pytest.raises(ValueError, match="num_blocks"):
        run(params, data, interventions=fluxjax.Interventions(knockout=right.replace(allowed=right.allowed[:2])))
    with pytest.raises(ValueError, match="image_tokens"):
        run(params, data, interventions=fluxjax.Interventions(drop_reference=fluxjax.drop_reference(LAYOUT, 2)),
            capture=fluxjax.Capture(image=(0,)))
    with pytest.raises(ValueError, match="no reference"):
        fluxjax.drop_reference(fluxjax.TokenLayout(n_txt=T, img_grid=(3, 4)), 1)


# ------------------------------------------------------------------------------------------------
# reference removal


@pytest.fixture(scope="module")
def mask_form(params, data):
    """Output (image tokens) and captures of the mask form for every k; one compiled program, since
    k is only a value of the knockout matrices here."""
    out = {}
    for k in range(NB + 1):
        iv = fluxjax.Interventions(knockout=fluxjax.cut_reference(TINY, LAYOUT, CONTENT, k, allow_empty=k == NB))
        o, caps = run(params, data, interventions=iv, capture=CAP_DROP)
        out[k] = np.asarray(o)[:, :LAYOUT.n_img], caps
    return out


# k=0; in a double block; at the join (the first single block). Removal inside the single blocks
# (k=3) is test_binding_protocol_drop_equals_masks.
@pytest.mark.parametrize("k", [0, 1, 2])
def test_drop_reference_equals_mask_form(params, data, mask_form, k):
    iv = fluxjax.Interventions(drop_reference=fluxjax.drop_reference(LAYOUT, k))
    out, caps = run(params, data, interventions=iv, capture=CAP_DROP)
    assert out.shape == (2, LAYOUT.n_img, TINY.in_channels)
    assert rel_err(out, mask_form[k][0]) <= DROP_TOL
    for a, b in zip(jax.tree_util.tree_leaves(caps), jax.tree_util.tree_leaves(mask_form[k][1])):
        assert rel_err(a, b) <= DROP_TOL
    assert rel_err(mask_form[k][0], mask_form[NB][0]) > 1e-3  # the references did matter


def test_drop_reference_at_0_is_text_to_image(params, data, mask_form):
    t2i = fluxjax.TokenLayout(n_txt=LAYOUT.n_txt, img_grid=LAYOUT.img_grid)
    out, caps = run(params, data, img=data["img"][:, :t2i.n_img], img_ids=jnp.asarray(t2i.img_ids()), capture=CAP_DROP)
    iv = fluxjax.Interventions(drop_reference=fluxjax.drop_reference(LAYOUT, 0))
    dropped, caps_dropped = run(params, data, interventions=iv, capture=CAP_DROP)
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(out))
    for a, b in zip(jax.tree_util.tree_leaves(caps_dropped), jax.tree_util.tree_leaves(caps)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rel_err(mask_form[0][0], out) <= DROP_TOL


def test_binding_protocol_drop_equals_masks(params, data):
    """The paper's 'drop after the binding': ref->image cut before k, references gone from k on;
    here k is a single block."""
    k = 3
    before = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->image", f":{k}")
    masks = fluxjax.Interventions(knockout=before & fluxjax.cut_reference(TINY, LAYOUT, CONTENT, k))
    dropped = fluxjax.Interventions(knockout=before, drop_reference=fluxjax.drop_reference(LAYOUT, k))
    out_m, caps_m = run(params, data, interventions=masks, capture=CAP_DROP)
    out_d, caps_d = run(params, data, interventions=dropped, capture=CAP_DROP)
    assert rel_err(out_d, out_m[:, :LAYOUT.n_img]) <= DROP_TOL
    for a, b in zip(jax.tree_util.tree_leaves(caps_d), jax.tree_util.tree_leaves(caps_m)):
        assert rel_err(a, b) <= DROP_TOL


# ------------------------------------------------------------------------------------------------
# compile once, sweep with vmap


def test_changing_values_never_retraces(params, data):
    traces = []

    def counted(params, img, txt, t, iv):
        traces.append(1)  # runs only while tracing
        return fluxjax.forward(params, TINY, img, txt, t, LAYOUT.img_ids(), LAYOUT.txt_ids(), interventions=iv,
                               capture=fluxjax.Capture(text=(2,)))

    f = jax.jit(counted)
    rng = np.random.default_rng(0)
    T, D = LAYOUT.n_txt, TINY.hidden_size
    outs = []
    for i, (site, k_edges) in enumerate([(0, "ref->text"), (3, "ref->image"), (BLOCK0_INPUT, ["text->ref", "image->text"])]):
        content = rng.random((2, T)) < 0.5
        iv = fluxjax.Interventions(
            substitutions=(fluxjax.substitution(site, rng.standard_normal((2, T, D), np.float32),
                                                rng.random((2, T)) < 0.5),),
            knockout=fluxjax.knockout(TINY, LAYOUT, content, k_edges, blocks=["all", ":2", [1, 4]][i]))
        outs.append(f(params, data["img"], data["txt"], data["timestep"], iv)[0])
    assert len(traces) == 1
    assert rel_err(outs[0], outs[1]) > 1e-3 and rel_err(outs[1], outs[2]) > 1e-3  # the values did act


def test_vmapped_substitution_sweep_equals_loop(params, data):
    """Lens-style sweep: the text stream of another run, taken at each site in turn, substituted at
    that site; one vmapped call over all NB + 1 sites vs one call per site."""
    other = dict(data, txt=data["txt"][::-1], img=data["img"][::-1])
    _, source = run(params, other, capture=CAP_TEXT)
    sites = jnp.arange(BLOCK0_INPUT, NB)
    padding = LAYOUT.text_mask("text[padding]", CONTENT)
    cells = stack([fluxjax.Interventions(substitutions=(fluxjax.substitution(s, source.text[j], padding),))
                   for j, s in enumerate(range(BLOCK0_INPUT, NB))])
    assert cells.substitutions[0].site.shape == (NB + 1,)

    swept = jax.jit(jax.vmap(lambda iv: fluxjax.forward(params, TINY, data["img"], data["txt"], data["timestep"],
                                                       data["img_ids"], data["txt_ids"], interventions=iv)[0]))(cells)
    assert swept.shape == (NB + 1, 2, LAYOUT.n_image_stream, TINY.in_channels)
    for j, s in enumerate(sites):
        iv = fluxjax.Interventions(substitutions=(fluxjax.substitution(s, source.text[j], padding),))
        assert rel_err(swept[j], run(params, data, interventions=iv, capture=CAP_TEXT)[0]) <= SWEEP_TOL
    assert rel_err(swept[0], swept[-1]) > 1e-3


def test_vmapped_knockout_sweep_equals_loop(params, data):
    """Knockout of ref->text from block k on, for every k, as one vmapped call."""
    cells = stack([fluxjax.Interventions(knockout=fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", f"{k}:"))
                   for k in range(NB)])
    swept = jax.jit(jax.vmap(lambda iv: fluxjax.forward(params, TINY, data["img"], data["txt"], data["timestep"],
                                                       data["img_ids"], data["txt_ids"], interventions=iv)[0]))(cells)
    for k in range(NB):
        iv = fluxjax.Interventions(knockout=jax.tree_util.tree_map(lambda a: a[k], cells.knockout))
        assert rel_err(swept[k], run(params, data, interventions=iv)[0]) <= SWEEP_TOL


def test_vmap_over_seeds_equals_loop(params, data):
    noise = jax.random.normal(jax.random.key(7), (3, *data["img"].shape))  # three seeds' noisy inputs
    knock = fluxjax.Interventions(knockout=fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text[padding]"))
    swept = jax.jit(jax.vmap(lambda x: fluxjax.forward(params, TINY, x, data["txt"], data["timestep"],
                                                      data["img_ids"], data["txt_ids"], interventions=knock)[0]))(noise)
    for s in range(3):
        assert rel_err(swept[s], run(params, data, img=noise[s], interventions=knock)[0]) <= SWEEP_TOL
