"""Nothing silent: every bad input is refused with one clear sentence naming the culprit.

Library: intervention builders that would select nothing or name what does not exist, values that
would be cast lossily into the text stream, non-boolean masks. Images: every PIL mode that holds
a picture is converted as the models read it (16-bit greyscale scaled, not clipped to white);
unreadable and too-small references are refused naming the file. Command line: every experiment
command checks its inputs before loading a model or making a run folder; each problem is one line
on stderr, exit code 2, no traceback, nothing left behind.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import struct
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from reference import TINY

import fluxjax
from fluxjax import images
from fluxjax.interventions import BLOCK0_INPUT, block_indices, check_sites, per_step, stack

NB = TINY.num_blocks
LAYOUT = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=((2, 3),))
NO_REFS = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4))
CONTENT = np.zeros((1, LAYOUT.n_txt), bool)
CONTENT[0, 1:4] = True
T, D = LAYOUT.n_txt, TINY.hidden_size
VALUE = jnp.zeros((T, D), jnp.float32)


def one_sentence(message: str) -> None:
    """A refusal is one line (no traceback-like dump), naming something."""
    assert message and "\n" not in message and "Traceback" not in message


def refused(build, error, match):
    with pytest.raises(error, match=match) as e:
        build()
    one_sentence(str(e.value))


# ---------------------------------------------------------------------------------------------
# library: intervention builders


@pytest.mark.parametrize("blocks, error, match", [
    ("4:2", ValueError, r"'4:2' select no block"),
    ([], ValueError, r"\[\] select no block"),
    (range(NB, NB), ValueError, "select no block"),
    (f"{NB}:", ValueError, "select no block"),
    (":0", ValueError, "select no block"),
    (True, TypeError, "bool selects no block"),
    (False, TypeError, "bool selects no block"),
    (NB, ValueError, rf"\[{NB}\] out of range: the valid blocks are 0..{NB - 1}"),
    (999, ValueError, "out of range"),
    ([0, -1], ValueError, r"\[-1\] out of range"),
    ("2:99", ValueError, "reaches past the last block"),
    ("99:", ValueError, "reaches past the last block"),
    ("3:x", ValueError, "bounds must be whole numbers"),
    ("1:2:3", ValueError, "use 'all'"),
    ("-1:", ValueError, "negative bounds"),
    ([1.5], TypeError, "must be an integer, got 1.5"),
    (["1"], TypeError, "must be an integer"),
    ([True], TypeError, "bool"),
    (2.0, TypeError, "give 'all'"),
])
def test_block_specs_that_select_nothing_or_what_does_not_exist_are_refused(blocks, error, match):
    refused(lambda: block_indices(blocks, NB), error, match)
    refused(lambda: fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", blocks), error, match)


def test_an_empty_block_range_is_allowed_only_when_asked_for():
    """The sweeps' no-knockout ends (blocks k..n-1 at k = n, 0..k-1 at k = 0) build an empty range on purpose."""
    assert block_indices(range(NB, NB), NB, allow_empty=True) == []
    empty = fluxjax.knockout(TINY, LAYOUT, CONTENT, "ref->text", range(NB, NB), allow_empty=True)
    baseline = fluxjax.allow_all(TINY, LAYOUT, CONTENT)
    np.testing.assert_array_equal(np.asarray(empty.allowed), np.asarray(baseline.allowed))
    assert np.asarray(empty.allowed).all()


@pytest.mark.parametrize("edges, layout, error, match", [
    ([], LAYOUT, ValueError, "name no edge"),
    ("ref->text", NO_REFS, ValueError, "'ref->text' cuts nothing: this layout has no reference"),
    ("text->ref", NO_REFS, ValueError, "no reference"),
    ("ref->nowhere", LAYOUT, ValueError, "unknown token group 'nowhere'"),
    ("ref[1]->text", LAYOUT, ValueError, r"'ref\[1\]' does not exist"),
    ("ref-text", LAYOUT, ValueError, "must read 'A->B'"),
    ([3], LAYOUT, TypeError, "must be a string"),
])
def test_knockout_edges_that_cut_nothing_are_refused(edges, layout, error, match):
    refused(lambda: fluxjax.knockout(TINY, layout, CONTENT, edges), error, match)


def test_a_non_boolean_content_mask_is_refused():
    refused(lambda: fluxjax.knockout(TINY, LAYOUT, CONTENT.astype(np.int32), "ref->text"), TypeError,
            "content mask must be boolean")
    refused(lambda: LAYOUT.text_mask("text[padding]", CONTENT.astype(float)), TypeError, "content mask must be boolean")


@pytest.mark.parametrize("from_block, kwargs, error, match", [
    (99, {}, ValueError, f"from_block 99 out of range: give 0..{NB - 1}"),
    (NB, {}, ValueError, f"{NB} cuts nothing"),
    (NB + 1, {"allow_empty": True}, ValueError, "out of range"),
    (-1, {}, ValueError, "out of range"),
    (True, {}, TypeError, "must be an integer, got the bool"),
    (2.5, {}, TypeError, "must be an integer, got 2.5"),
])
def test_cut_reference_out_of_range_is_refused(from_block, kwargs, error, match):
    refused(lambda: fluxjax.cut_reference(TINY, LAYOUT, CONTENT, from_block, **kwargs), error, match)


def test_cut_reference_edges():
    refused(lambda: fluxjax.cut_reference(TINY, NO_REFS, CONTENT, 1), ValueError, "no reference tokens")
    never = fluxjax.cut_reference(TINY, LAYOUT, CONTENT, NB, allow_empty=True)  # a drop sweep's k = n
    assert np.asarray(never.allowed).all()
    assert not np.asarray(fluxjax.cut_reference(TINY, LAYOUT, CONTENT, NB - 1).allowed[NB - 1]).all()


@pytest.mark.parametrize("from_block, error, match", [
    (-1, ValueError, "must be >= 0"), (True, TypeError, "bool"), (1.5, TypeError, "must be an integer")])
def test_drop_reference_bad_points_are_refused(from_block, error, match):
    refused(lambda: fluxjax.drop_reference(LAYOUT, from_block), error, match)


@pytest.mark.parametrize("build, error, match", [
    (lambda: fluxjax.substitution(BLOCK0_INPUT - 1, VALUE), ValueError, "use -1"),
    (lambda: fluxjax.substitution(2.5, VALUE), TypeError, "site must be an integer"),
    (lambda: fluxjax.substitution(True, VALUE), TypeError, "site must be an integer"),
    (lambda: fluxjax.substitution(jnp.arange(2), VALUE), ValueError, "site must be a scalar"),
    (lambda: fluxjax.substitution(0, VALUE.astype(jnp.int32)), TypeError,
     "value must be a floating-point array, got dtype int32"),
    (lambda: fluxjax.substitution(0, VALUE.astype(bool)), TypeError, "got dtype bool"),
    (lambda: fluxjax.substitution(0, VALUE.astype(jnp.complex64)), TypeError, "got dtype complex64"),
    (lambda: fluxjax.substitution(0, np.zeros((T, D))), TypeError, "float64"),
    (lambda: fluxjax.substitution(0, VALUE, np.ones(T, np.int32)), ValueError, "mask must be boolean, got int32"),
    (lambda: fluxjax.substitution(0, VALUE, np.ones(T, np.float32)), ValueError, "mask must be boolean"),
    (lambda: fluxjax.substitution(0, VALUE, keep=True), TypeError, "keep must be a real scalar"),
    (lambda: fluxjax.substitution(0, VALUE, keep=1j), TypeError, "keep must be a real scalar"),
    (lambda: per_step(jnp.float32(1.0)), ValueError, "leading step axis"),
    (lambda: per_step(np.zeros((2, T, D))), TypeError, "float64"),
    (lambda: fluxjax.Capture(text=(2.5,)), TypeError, "capture text site must be an integer"),
    (lambda: fluxjax.Capture(image=(True,)), TypeError, "bool"),
    (lambda: fluxjax.Capture(text=3), TypeError, "must be a tuple of site indices"),
    (lambda: fluxjax.Capture(image_tokens=0), ValueError, "image_tokens must be positive"),
    (lambda: fluxjax.Capture(image_tokens=2.0), TypeError, "image_tokens must be an integer"),
    (lambda: fluxjax.TokenLayout(n_txt=8.0, img_grid=(3, 4)), TypeError, "n_txt must be an integer"),
    (lambda: fluxjax.TokenLayout(n_txt=8, img_grid=(3,)), TypeError, "img_grid must be a"),
    (lambda: fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=((2, 2.5),)), TypeError, "ref_grids"),
])
def test_builders_refuse_bad_values(build, error, match):
    refused(build, error, match)


@pytest.mark.parametrize("site", [NB, 999, per_step(jnp.asarray([0, NB], jnp.int32))])
def test_substitution_sites_the_model_lacks_are_refused_before_compiling(site):
    sub = fluxjax.substitution(site, per_step(jnp.zeros((2, T, D))) if fluxjax.interventions.is_per_step(site)
                               else VALUE)
    iv = fluxjax.Interventions(substitutions=(sub,))
    refused(lambda: check_sites(iv, TINY), ValueError, f"out of range: this model's sites are -1 .* 0..{NB - 1}")
    swept = stack([fluxjax.Interventions(substitutions=(fluxjax.substitution(s, VALUE),)) for s in (0, NB)])
    refused(lambda: check_sites(swept, TINY), ValueError, f"site {NB} out of range")
    check_sites(fluxjax.Interventions(substitutions=(fluxjax.substitution(NB - 1, VALUE),)), TINY)


@pytest.fixture(scope="module")
def params():
    return fluxjax.init_params(TINY, jax.random.key(0))


def _abstract_forward(params, iv, capture=None, dtype=jnp.float32):
    """Trace the forward (its trace-time validation) without compiling or running it."""
    img = jax.ShapeDtypeStruct((1, LAYOUT.n_image_stream, TINY.in_channels), jnp.float32)
    txt = jax.ShapeDtypeStruct((1, T, TINY.context_in_dim), jnp.float32)
    p = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), params)
    return jax.eval_shape(lambda p, i, t, iv: fluxjax.forward(p, TINY, i, t, jnp.ones((1,)), LAYOUT.img_ids(),
                                                              LAYOUT.txt_ids(), interventions=iv, capture=capture),
                          p, img, txt, iv)


def test_the_sampler_refuses_a_site_the_model_lacks_before_compiling(params):
    from fluxjax import sampler

    iv = fluxjax.Interventions(substitutions=(fluxjax.substitution(NB, VALUE),))
    with pytest.raises(ValueError, match=f"site {NB} out of range") as e:
        sampler.sample(params, TINY, sampler.SamplerOptions(num_steps=1, guidance="none"),
                       np.zeros((1, T, TINY.context_in_dim), np.float32), LAYOUT.txt_ids(), NO_REFS.img_ids(),
                       seed=0, interventions=iv)
    one_sentence(str(e.value))


@pytest.mark.parametrize("value_dtype, model_dtype, ok", [
    (jnp.float32, jnp.float32, True), (jnp.float16, jnp.float32, True), (jnp.bfloat16, jnp.float32, True),
    (jnp.bfloat16, jnp.bfloat16, True), (jnp.float32, jnp.bfloat16, False), (jnp.float16, jnp.bfloat16, False)])
def test_substitution_values_must_cast_into_the_stream_without_loss(params, value_dtype, model_dtype, ok):
    """Checked from static dtypes when the forward is traced (jax.eval_shape: nothing compiles or runs)."""
    iv = fluxjax.Interventions(substitutions=(fluxjax.substitution(1, VALUE.astype(value_dtype)),))
    if ok:
        _abstract_forward(params, iv, dtype=model_dtype)
    else:
        with pytest.raises(TypeError, match=f"value is {jnp.dtype(value_dtype)} but the model's text stream is "
                                            f"{jnp.dtype(model_dtype)}") as e:
            _abstract_forward(params, iv, dtype=model_dtype)
        one_sentence(str(e.value))


@pytest.mark.parametrize("iv, capture, error, match", [
    (fluxjax.Interventions(substitutions=(fluxjax.Substitution(block=jnp.int32(1), value=VALUE[None].astype(jnp.int32),
                                                               mask=jnp.ones((1, T), bool), keep=jnp.float32(0)),)),
     None, TypeError, "value must be a floating-point array"),
    (fluxjax.Interventions(substitutions=(fluxjax.Substitution(
        block=jnp.int32(1), value=VALUE[None], mask=jnp.ones((1, T), jnp.int32), keep=jnp.float32(0)),)),
     None, TypeError, "mask must be boolean, got dtype int32"),
    (fluxjax.Interventions(substitutions=(fluxjax.Substitution(block=jnp.float32(1), value=VALUE[None],
                                                               mask=jnp.ones((1, T), bool), keep=jnp.float32(0)),)),
     None, TypeError, "site must be an integer, got dtype float32"),
    (fluxjax.Interventions(drop_reference=fluxjax.drop_reference(LAYOUT, NB + 1)), None, ValueError,
     f"from block {NB + 1} out of range: give 0..{NB}"),
    (None, fluxjax.Capture(text=(NB,)), ValueError, f"capture text site {NB} out of range"),
])
def test_the_forward_refuses_at_trace_time_what_its_builders_would_have(params, iv, capture, error, match):
    """Interventions made without the builders are checked by the forward, from static structure."""
    with pytest.raises(error, match=match) as e:
        _abstract_forward(params, iv, capture)
    one_sentence(str(e.value))


def test_checks_do_not_retrace_when_only_values_change(params):
    """Sites, values and masks stay values: the checks read static structure, so one trace serves all."""
    traces = []

    def f(p, iv):
        traces.append(1)
        img = jnp.zeros((1, LAYOUT.n_image_stream, TINY.in_channels))
        txt = jnp.zeros((1, T, TINY.context_in_dim))
        return fluxjax.forward(p, TINY, img, txt, jnp.ones((1,)), LAYOUT.img_ids(), LAYOUT.txt_ids(),
                               interventions=iv)[0]

    g = jax.jit(f)
    mask = LAYOUT.text_mask("text[padding]", CONTENT)
    for site, fill in ((0, 1.0), (NB - 1, 2.0), (BLOCK0_INPUT, 3.0)):
        g.lower(params, fluxjax.Interventions(substitutions=(fluxjax.substitution(site, VALUE + fill, mask),)))
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------
# images


def grey_gradient(width=96, height=80) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx * 255 // (width - 1) + yy * 3) % 256).astype(np.uint8)


def png_rgb16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL writes none): IHDR bit depth 16, colour type 2, rows unfiltered."""
    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit(grey: np.ndarray, mode: str) -> PIL.Image.Image:
    """The 8-bit picture as 16 bits (v * 257, the exact widening), in a PIL 16-bit greyscale mode."""
    wide = grey.astype(np.uint32) * 257
    height, width = grey.shape
    if mode == "I":
        return PIL.Image.fromarray(wide.astype(np.int32))
    order = ">u2" if mode == "I;16B" else "<u2"
    return PIL.Image.frombytes(mode, (width, height), wide.astype(order).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greyscale_gives_the_pixels_of_its_8_bit_version(mode):
    grey = grey_gradient()
    want = images.preprocess_reference(PIL.Image.fromarray(grey, mode="L"))
    got = images.preprocess_reference(sixteen_bit(grey, mode))
    assert np.abs(got - want).max() <= 2 / 255 + 1e-6  # one level of 255 (in [-1, 1] units)


def test_16_bit_mid_grey_is_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    PIL.Image.frombytes("I;16", (64, 64), np.full((64, 64), 20000, "<u2").tobytes()).save(path)
    pixels = images.preprocess_reference(path)
    level = (pixels + 1) / 2 * 255
    np.testing.assert_allclose(level, round(20000 / 257), atol=1e-3)  # 78, not 255
    with PIL.Image.open(path) as im:
        assert np.asarray(images.to_rgb(im)).max() == 78


def test_16_bit_rgb_png_is_read_as_its_high_bytes(tmp_path):
    rgb8 = np.stack([grey_gradient(), 255 - grey_gradient(), np.full((80, 96), 100, np.uint8)], -1)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_rgb16(np.clip(rgb8.astype(np.int64) * 257 + 100, 0, 65535)))  # 16 bits, not exact
    want = images.preprocess_reference(PIL.Image.fromarray(rgb8))
    got = images.preprocess_reference(path)
    assert np.abs(got - want).max() <= 2 / 255 + 1e-6


def palette_with_transparency() -> PIL.Image.Image:
    rgb = np.stack([grey_gradient(), grey_gradient()[::-1], np.full((80, 96), 40, np.uint8)], -1)
    image = PIL.Image.fromarray(rgb).quantize(colors=16)
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    buf.seek(0)
    out = PIL.Image.open(buf)
    out.load()
    assert out.mode == "P" and "transparency" in out.info
    return out


def modes():
    rgb = np.stack([grey_gradient(), grey_gradient()[::-1], np.full((80, 96), 40, np.uint8)], -1)
    base = PIL.Image.fromarray(rgb)
    alpha = PIL.Image.fromarray(grey_gradient()[::-1])
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    return {"RGB": base, "L": base.convert("L"), "1": base.convert("1"), "P": base.quantize(colors=16),
            "P+transparency": palette_with_transparency(), "RGBA": rgba, "LA": la,
            "PA": base.quantize(colors=16).convert("PA"), "CMYK": base.convert("CMYK"),
            "YCbCr": base.convert("YCbCr"), "F": base.convert("F")}


@pytest.mark.parametrize("mode", sorted(modes()))
def test_every_picture_mode_is_converted_as_diffusers_converts_it(mode):
    """Where PIL's convert('RGB') is right (every mode but 16-bit greyscale and float), the result is
    exactly what the FLUX.2 pipelines' image processor gives: alpha dropped, the stored colours kept."""
    pytest.importorskip("diffusers")
    from test_images import pipeline_preprocess

    image = modes()[mode]
    got = images.preprocess_reference(image)
    assert got.shape == (80, 96, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, pipeline_preprocess(image))


def test_float_images_use_pils_0_to_255_scale():
    grey = grey_gradient()
    floats = PIL.Image.fromarray(grey.astype(np.float32) + 0.2, mode="F")
    np.testing.assert_array_equal(images.preprocess_reference(floats),
                                  images.preprocess_reference(PIL.Image.fromarray(grey, mode="L")))


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Reference files that cannot be used, and what the refusal says of each."""
    good = io.BytesIO()
    PIL.Image.fromarray(np.stack([grey_gradient()] * 3, -1)).save(good, format="PNG")
    data = good.getvalue()
    files = {"truncated": (data[: len(data) // 2], "cannot read reference image .*truncated.png.* as an image"),
             "empty": (b"", r"cannot read reference image .*empty.png.* as an image \(empty file\)"),
             "not-an-image": (b"name,colour\nball,red\n", "cannot read reference image .*not-an-image.png"),
             "too-small": (None, r"reference image .*too-small.png.* is 40x40; both sides must be at least 64 px")}
    out = {}
    for name, (content, match) in files.items():
        path = folder / f"{name}.png"
        if content is None:
            PIL.Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
        else:
            path.write_bytes(content)
        out[name] = (path, match)
    return out


@pytest.mark.parametrize("name", ["truncated", "empty", "not-an-image", "too-small"])
def test_unreadable_and_too_small_references_are_refused_naming_the_file(tmp_path, name):
    path, match = bad_files(tmp_path)[name]
    refused(lambda: images.preprocess_reference(path), ValueError, match)
    refused(lambda: images.open_reference(path), ValueError, match)


# ---------------------------------------------------------------------------------------------
# command line: every input checked before the model loads and before any run folder is made


@pytest.fixture
def never_load(monkeypatch):
    """The commands must fail before their first expensive step: loading a model fails the test."""
    from experiments import models

    def load(args):
        raise AssertionError(f"the model {args.model} was loaded before the inputs were refused")

    monkeypatch.setattr(models, "load", load)


ORGANISM = ["--model", "direct", "--no-progress"]
ONE_COLOUR = ["--colours", "red", "--objects", "circle", "--seeds", "0"]

# (id, command, arguments, a pattern each line of the refusal must match, in order). "{in}" is the
# folder of input files made by `inputs`.
CLI_CASES = [
    ("unknown-model-in-a-list", "run_all", ["--model", "direct,text-routd"],
     ["--model text-routd: not a committed organism"]),
    ("unknown-model", "lens", ["--model", "text-routd"], ["--model text-routd"]),
    ("folder-without-model-index", "lens", ["--model", "{in}"], ["--model .*model_index.json is missing"]),
    ("organism-in-bfloat16", "lens", [*ORGANISM, "--dtype", "bfloat16"],
     ["--dtype bfloat16: the organisms run in float32"]),
    ("layers-not-a-number", "knockout", [*ORGANISM, "--layers", "3:x"],
     ["--layers '3:x': the bounds must be whole numbers"]),
    ("layers-empty-range", "knockout", [*ORGANISM, "--layers", "4:2"], ["--layers '4:2' select no block"]),
    ("layers-two-bad", "knockout", [*ORGANISM, "--layers", "3:x", "all", "4:2"], ["--layers '3:x'", "--layers '4:2'"]),
    ("layers-past-the-end", "knockout", [*ORGANISM, "--layers", "all", "99"],
     [r"--layers \[99\] out of range: the valid blocks are 0.."]),
    ("edge-without-arrow", "knockout", [*ORGANISM, "--settings", "ref-text"],
     [r"knockout setting 'ref-text': ref-text has no '->' destination; write edges as 'A->B'"]),
    ("sweep-from-not-a-number", "knockout", [*ORGANISM, "--settings", "ref->text", "--sweep", "--sweep-from", "1,x"],
     ["--sweep-from '1,x'"]),
    ("window-zero", "knockout", [*ORGANISM, "--sweep", "--sweep-mode", "window", "--window", "0"], ["--window 0"]),
    ("block-past-the-end", "lens", [*ORGANISM, "--block", "99"], [r"--block \[99\] out of range"]),
    ("blocks-empty-range", "lens", [*ORGANISM, "--blocks", "4:2"], ["--blocks '4:2' select no block"]),
    ("blocks-list-not-numbers", "drop", [*ORGANISM, "--blocks", "0,x"],
     ["--blocks '0,x': a list of blocks is whole numbers"]),
    ("patching-one-colour", "patching", [*ORGANISM, *ONE_COLOUR], ["no colour-bucket pairs among these tasks"]),
    ("pairs-unknown-id", "patching", [*ORGANISM, "--tasks", "{in}/good.jsonl", "--pairs", "{in}/pairs.tsv"],
     ["pairs.tsv, line 1: unknown target task id 'nobody'"]),
    ("pairs-missing", "patching", [*ORGANISM, "--pairs", "{in}/missing.tsv"], ["--pairs .*missing.tsv: no such file"]),
    ("tasks-missing", "lens", [*ORGANISM, "--tasks", "{in}/missing.jsonl"], ["--tasks .*missing.jsonl: no such file"]),
    ("tasks-not-json", "lens", [*ORGANISM, "--tasks", "{in}/broken.jsonl"], ["broken.jsonl, line 2: not valid JSON"]),
    ("reference-truncated", "lens", [*ORGANISM, "--tasks", "{in}/truncated.jsonl"],
     ["cannot read reference image .*truncated.png.* as an image"]),
    ("reference-empty", "lens", [*ORGANISM, "--tasks", "{in}/empty.jsonl"],
     [r"cannot read reference image .*empty.png.* as an image \(empty file\)"]),
    ("reference-not-an-image", "lens", [*ORGANISM, "--tasks", "{in}/not-an-image.jsonl"],
     ["cannot read reference image .*not-an-image.png"]),
    ("two-bad-references", "lens", [*ORGANISM, "--tasks", "{in}/two-bad.jsonl"],
     ["empty.png", "not-an-image.png"]),
    ("root-missing", "lens", [*ORGANISM, "--tasks", "{in}/good.jsonl", "--root", "{in}/nowhere"], ["--root .*nowhere"]),
    ("unknown-task-id", "lens", [*ORGANISM, "--ids", "nobody"], ["unknown task ids: nobody"]),
    ("limit-zero", "lens", [*ORGANISM, "--limit", "0"], ["--limit 0: give a positive number"]),
    ("unknown-colour", "lens", [*ORGANISM, "--colours", "mauve"], ["unknown colours mauve"]),
    ("organism-size", "lens", [*ORGANISM, "--size", "64"], ["--size 64: organisms draw 32 x 32 images"]),
    ("task-size-for-organism", "lens", [*ORGANISM, "--tasks", "{in}/large.jsonl"],
     ["task t0: organisms draw 32 x 32 images, not 64 x 64"]),
    ("steps-zero", "lens", [*ORGANISM, "--steps", "0"], ["--steps 0: give at least one denoising step"]),
    ("chunk-negative", "lens", [*ORGANISM, "--chunk", "-1"], ["--chunk -1"]),
    ("run-all-blocks", "run_all", ["--model", "direct", "--blocks", "3:x"], ["--blocks '3:x'"]),
    ("run-all-source-steps", "run_all", ["--model", "direct", "--source-steps", "0"], ["--source-steps"]),
    ("every-problem-of-two", "knockout", [*ORGANISM, "--steps", "0", "--model", "text-routd"],
     ["--steps 0", "--model text-routd"]),
    ("every-problem-of-three", "lens", [*ORGANISM, "--steps", "0", "--block", "99", "--ids", "nobody"],
     ["--steps 0", "unknown task ids: nobody", r"--block \[99\]"]),
]


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Task, pair and image files, good and bad, for the command-line cases."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    bad = bad_files(folder)
    good = good_reference(folder)
    write_tasks(folder / "good.jsonl", [good])
    write_tasks(folder / "large.jsonl", [good_reference(folder, 64)], size=64)
    for name in ("truncated", "empty", "not-an-image"):
        write_tasks(folder / f"{name}.jsonl", [good, bad[name][0]])
    write_tasks(folder / "two-bad.jsonl", [bad["empty"][0], good, bad["not-an-image"][0]])
    (folder / "broken.jsonl").write_text('{"task_id": "a", "instruction": "x", "source_image_path": "good32.png"}\n'
                                         "{oops\n")
    (folder / "pairs.tsv").write_text("t0\tnobody\n")
    return folder


def write_tasks(path: Path, references: list[Path], size: int = 32) -> Path:
    lines = [json.dumps({"task_id": f"t{i}", "instruction": "draw a circle in this color", "width": size,
                         "height": size, "source_image_path": str(ref)}) for i, ref in enumerate(references)]
    path.write_text("\n".join(lines) + "\n")
    return path


def good_reference(folder: Path, size: int = 32) -> Path:
    path = folder / f"good{size}.png"
    PIL.Image.new("RGB", (size, size), (200, 30, 30)).save(path)
    return path


def refuse_at_once(tmp_path, capsys, command: str, argv: list[str], expect: list[str]) -> None:
    """`command argv` exits with code 2 before loading anything, printing one line per problem, each
    matching its pattern; no run folder and no temporary file is left behind; well under a second."""
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "run"
    module = importlib.import_module(f"experiments.{command}")
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--out", str(out)])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    prefix = f"python -m experiments.{command}: error: "
    assert len(lines) == len(expect) and all(line.startswith(prefix) for line in lines), err
    for line, pattern in zip(lines, expect):
        assert re.search(pattern, line), (pattern, line)
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no temporary
    assert seconds < 5, f"{command} took {seconds:.1f} s to refuse its input"


@pytest.mark.parametrize("command, argv, expect", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_lines_fail_at_once_with_one_line_per_problem(tmp_path, capsys, never_load, inputs, command,
                                                                 argv, expect):
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    refuse_at_once(tmp_path, capsys, command, argv, expect)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    pytest.importorskip("torch")
    from flux2ref.folder import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-klein", seed=0)


FOLDER_CASES = [
    ("reference-too-small", ["--tasks", "{in}/small.jsonl"],
     [r"reference image .*small40.png.* is 40x40; both sides must be at least 64 px"]),
    ("task-smaller-than-a-token", ["--tasks", "{in}/tiny.jsonl"], ["task t0: 8 x 8 is smaller than one 16 px token"]),
    ("size-too-small", ["--size", "32"], ["--size 32: .* at least 64 px"]),
    ("layers-past-the-end", ["--layers", "5"], [r"--layers \[5\] out of range: the valid blocks are 0..4"]),
]


@pytest.mark.parametrize("argv, expect", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_a_model_folder_refuses_what_it_cannot_read_before_loading(tmp_path, capsys, never_load, model_folder,
                                                                   argv, expect):
    """The model folder's architecture (5 blocks) and reference rules are read without loading it."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    small = folder / "small40.png"
    PIL.Image.new("RGB", (40, 40), (10, 200, 10)).save(small)
    write_tasks(folder / "small.jsonl", [small], size=64)
    write_tasks(folder / "tiny.jsonl", [good_reference(folder, 64)], size=8)
    argv = ["--model", str(model_folder), "--no-progress", *[a.replace("{in}", str(folder)) for a in argv]]
    refuse_at_once(tmp_path, capsys, "knockout", argv, expect)


ORGANISM_CASES = [
    ("evaluate-not-an-organism", "evaluate", ["{in}", "--out", "{out}"], ["not a readable organism folder"]),
    ("evaluate-block", "evaluate", ["{direct}", "--out", "{out}", "--block", "99", "--n", "0"],
     [r"--block 99: the organism has blocks 0..", "--n 0"]),
    ("evaluate-steps", "evaluate", ["{direct}", "--out", "{out}", "--steps", "0"], ["--steps 0"]),
    ("train-sizes", "train", ["--organism", "direct", "--out", "{out}", "--steps", "0", "--batch-size", "-1"],
     ["--steps 0", "--batch-size -1"]),
    ("train-regimes", "train", ["--organism", "direct", "--out", "{out}", "--steps", "100", "--t2i-first", "100",
                                "--text-length", "7"], ["--t2i-first 100", "--text-length 7"]),
]


@pytest.mark.parametrize("command, argv, expect", [c[1:] for c in ORGANISM_CASES], ids=[c[0] for c in ORGANISM_CASES])
def test_organism_commands_refuse_bad_arguments_before_loading(tmp_path, capsys, command, argv, expect):
    from organisms.checkpoint import committed

    (tmp_path / "inputs").mkdir()
    out = tmp_path / "out"
    argv = [a.replace("{in}", str(tmp_path / "inputs")).replace("{out}", str(out))
            .replace("{direct}", str(committed("direct"))) for a in argv]
    module = importlib.import_module(f"organisms.{command}")
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == len(expect), err
    for line, pattern in zip(lines, expect):
        assert re.search(pattern, line), (pattern, line)
    assert not out.exists()


def test_the_experiments_read_a_16_bit_reference_as_its_8_bit_version(tmp_path):
    """The colour metrics' reference (experiments.context) and an organism's reference tokens."""
    from experiments.context import load_reference
    from experiments.tasks import Task
    from experiments.organism import OrganismModel
    from organisms.checkpoint import committed

    grey = grey_gradient(32, 32)
    paths = {}
    for name, image in (("8", PIL.Image.fromarray(grey, mode="L")), ("16", sixteen_bit(grey, "I;16"))):
        paths[name] = tmp_path / f"ref{name}.png"
        image.save(paths[name])
    with PIL.Image.open(paths["16"]) as im:
        assert im.mode == "I;16"
    pixels = {k: load_reference(Task(task_id="t", instruction="x", reference=p)).astype(int) for k, p in paths.items()}
    assert np.abs(pixels["16"] - pixels["8"]).max() <= 1
    organism = OrganismModel.load(committed("direct"))
    tokens = {k: np.asarray(organism.reference_tokens([p])[0]) for k, p in paths.items()}
    np.testing.assert_allclose(tokens["16"], tokens["8"], atol=2 / 255)  # one level in [-1, 1] pixel units
