"""Whole-model parity with diffusers' `Flux2Transformer2DModel` through the public path:
diffusers `save_pretrained` -> `python -m conversion` (or `convert_transformer`) -> `load_transformer`
-> `forward`; and the Black Forest Labs format checked independently through diffusers' own
single-file converter.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import (BF16_RATIO, TINY, TOL_GENERAL, TOL_T0, diffusers_kwargs, diffusers_transformer, inputs,
                       random_state, rel_err, run_diffusers)

import fluxjax
from fluxjax.conversion.convert import convert_transformer
from fluxjax.conversion.safetensors_io import SafetensorsFile
from fluxjax.conversion.transformer_keys import BFL_PREFIX, expected_source_shapes

pytestmark = pytest.mark.parity  # checked against a PyTorch model (diffusers); see pyproject.toml


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The bars (TOL_T0, TOL_GENERAL, BF16_RATIO) are defined, with their reasons, in flux2ref.models.

TINY_NO_GUIDANCE = dataclasses.replace(TINY, use_guidance_embed=False)
CONFIGS = {"guidance": TINY, "no_guidance": TINY_NO_GUIDANCE}
# Non-square grids throughout; references of different sizes; batch 2 everywhere.
LAYOUTS = {
    "no_ref": fluxjax.TokenLayout(n_txt=7, img_grid=(4, 6)),
    "one_ref": fluxjax.TokenLayout(n_txt=7, img_grid=(3, 5), ref_grids=((4, 2),)),
    "two_refs": fluxjax.TokenLayout(n_txt=5, img_grid=(2, 6), ref_grids=((3, 3), (5, 2))),
}
# (timestep per sample, guidance per sample): several t in [0, 1], ends included.
GENERAL_CASES = [((0.0, 1.0), (4.0, 2.5)), ((0.25, 0.63), (4.0, 1.0)), ((0.9, 0.1), (3.5, 4.0))]


# (model, layout) pairs of the fp32 tests: every layout with guidance embedding, two without.
CASES = [("guidance", "no_ref"), ("guidance", "one_ref"), ("guidance", "two_refs"),
         ("no_guidance", "no_ref"), ("no_guidance", "two_refs")]


def general_cases(config):
    """GENERAL_CASES; without a guidance embedder guidance is dropped (ignoring it is tested apart)."""
    return [(t, g if config.use_guidance_embed else None) for t, g in GENERAL_CASES]

forward = jax.jit(fluxjax.forward, static_argnums=1)


def cli_convert(src, dst, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "conversion", str(src), str(dst), "--quiet", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (diffusers model, config, params, folder): saved by diffusers, converted, loaded by fluxjax.

    Built once per config on first use."""
    built = {}

    def get(name):
        if name not in built:
            config = CONFIGS[name]
            model = diffusers_transformer(config, seed=1)
            root = tmp_path_factory.mktemp(name)
            model.save_pretrained(root / "diffusers")
            if name == "guidance":
                done = cli_convert(root / "diffusers", root / "native")
                assert done.returncode == 0, done.stderr
            else:
                assert convert_transformer(root / "diffusers", root / "native") == config
            loaded_config, params = fluxjax.load_transformer(root / "native")
            assert loaded_config == config
            built[name] = model, config, params, root
        return built[name]

    return get


def run_both(model, config, params, layout, timestep, guidance):
    img, txt = inputs(config, layout, batch=2, seed=3)
    t = np.asarray(timestep, np.float32)
    g = None if guidance is None else np.asarray(guidance, np.float32)
    want = run_diffusers(model, img, txt, t, layout, g)
    got, _ = forward(params, config, img, txt, t, layout.img_ids(), layout.txt_ids(), g)
    assert got.shape == want.shape == (2, layout.n_image_stream, config.output_channels)
    return np.asarray(got), want


@pytest.mark.parametrize("name, layout", CASES)
def test_fp32_at_t0_without_guidance(models, name, layout):
    model, config, params, _ = models(name)
    got, want = run_both(model, config, params, LAYOUTS[layout], (0.0, 0.0), None)
    assert rel_err(got, want) <= TOL_T0


@pytest.mark.parametrize("name, layout", CASES)
def test_fp32_general(models, name, layout):
    model, config, params, _ = models(name)
    for timestep, guidance in general_cases(config):
        got, want = run_both(model, config, params, LAYOUTS[layout], timestep, guidance)
        assert rel_err(got, want) <= TOL_GENERAL, (timestep, guidance)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_guidance_changes_the_output_only_with_a_guidance_embedder(models, name):
    """Guards the general test: guidance must reach the output exactly when the model embeds it."""
    model, config, params, _ = models(name)
    layout = LAYOUTS["two_refs"]
    a, _ = run_both(model, config, params, layout, (0.5, 0.5), (1.0, 1.0))
    b, _ = run_both(model, config, params, layout, (0.5, 0.5), (4.0, 4.0))
    if config.use_guidance_embed:
        assert rel_err(a, b) > 1e-3
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_error_within_the_reference_bf16_error(models, name):
    import torch
    model, config, _, root = models(name)
    convert_transformer(root / "diffusers", root / "native-bf16", dtype="bf16")
    _, params = fluxjax.load_transformer(root / "native-bf16")
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, cast_on_load = fluxjax.load_transformer(root / "native", dtype=jnp.bfloat16)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(cast_on_load)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # both round to nearest even

    model16 = copy.deepcopy(model).to(torch.bfloat16)
    layout = LAYOUTS["two_refs"]
    img, txt = inputs(config, layout, batch=2, seed=3)
    for timestep, guidance in [((0.0, 0.0), None), *general_cases(config)]:
        t = np.asarray(timestep, np.float32)
        g = None if guidance is None else np.asarray(guidance, np.float32)
        want = run_diffusers(model, img, txt, t, layout, g)
        ref16 = run_diffusers(model16, img, txt, t, layout, g, dtype=torch.bfloat16)
        ours, _ = forward(params, config, jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), t,
                          layout.img_ids(), layout.txt_ids(), g)
        err_ref, err_ours = rel_err(ref16, want), rel_err(np.asarray(ours, np.float32), want)
        assert err_ref > 1e-3, timestep  # really a bf16 run (t itself is rounded to bf16)
        assert err_ours <= BF16_RATIO * err_ref, (timestep, err_ours, err_ref)


# --- Black Forest Labs single files, checked through diffusers' own converter -------------------

def write_bfl(path, state, prefix=""):
    from safetensors.numpy import save_file  # the reference writer, not ours

    save_file({prefix + k: v for k, v in state.items()}, str(path))


def diffusers_from_bfl(path, config):
    """diffusers' reading of a BFL file: its own converter, loaded strictly."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    converted = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(path)))
    model = Flux2Transformer2DModel(**diffusers_kwargs(config)).eval()
    model.load_state_dict(converted, strict=True)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def bfl(request, tmp_path_factory):
    config = CONFIGS[request.param]
    root = tmp_path_factory.mktemp("bfl-" + request.param)
    state = random_state(expected_source_shapes(config, "bfl"), seed=7)
    write_bfl(root / "flux2.safetensors", state)
    return config, state, root


def test_bfl_file_matches_diffusers_conversion(bfl):
    config, _, root = bfl
    model = diffusers_from_bfl(root / "flux2.safetensors", config)
    assert convert_transformer(root / "flux2.safetensors", root / "native") == config  # config inferred
    _, params = fluxjax.load_transformer(root / "native")
    for name in ("two_refs",):
        got, want = run_both(model, config, params, LAYOUTS[name], (0.0, 0.0), None)
        assert rel_err(got, want) <= TOL_T0, name
        for timestep, guidance in general_cases(config):
            got, want = run_both(model, config, params, LAYOUTS[name], timestep, guidance)
            assert rel_err(got, want) <= TOL_GENERAL, (name, timestep)


def test_bfl_prefixed_keys_convert_identically(bfl):
    config, state, root = bfl
    write_bfl(root / "prefixed.safetensors", state, prefix=BFL_PREFIX)
    assert all(k.startswith(BFL_PREFIX) for k in SafetensorsFile(root / "prefixed.safetensors"))
    done = cli_convert(root / "prefixed.safetensors", root / "native-prefixed")
    assert done.returncode == 0, done.stderr
    convert_transformer(root / "flux2.safetensors", root / "native-plain")
    _, a = fluxjax.load_transformer(root / "native-prefixed")
    _, b = fluxjax.load_transformer(root / "native-plain")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_final_layer_reads_bfl_rows_as_shift_then_scale(tmp_path):
    """BFL's final adaLN rows are (shift, scale); diffusers stores (scale, shift).

    A file whose scale rows are zero and shift rows are S must (1) add the same vector to every
    token's output when S is doubled, which only a shift does, and (2) equal a diffusers model
    whose `norm_out.linear` is set by hand to (scale = 0, shift = S), not through any converter.
    """
    import torch
    config = TINY_NO_GUIDANCE
    D = config.hidden_size
    state = random_state(expected_source_shapes(config, "bfl"), seed=11)
    shift = state["final_layer.adaLN_modulation.1.weight"][:D].copy()
    outputs = {}
    for k in (1, 2):
        state["final_layer.adaLN_modulation.1.weight"] = np.concatenate([k * shift, np.zeros_like(shift)])
        write_bfl(tmp_path / f"s{k}.safetensors", state)
        convert_transformer(tmp_path / f"s{k}.safetensors", tmp_path / f"native{k}")
        _, params = fluxjax.load_transformer(tmp_path / f"native{k}")
        layout = LAYOUTS["two_refs"]  # shapes already compiled by the tests above
        img, txt = inputs(config, layout, batch=2, seed=3)
        t = np.asarray((0.3, 0.8), np.float32)
        outputs[k] = np.asarray(forward(params, config, img, txt, t, layout.img_ids(), layout.txt_ids(), None)[0])

    delta = outputs[2] - outputs[1]  # [B, N, out]: the extra shift, mapped by final_layer.linear
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1], delta.shape), atol=1e-5)
    assert np.abs(delta).max() > 0.1

    reference = diffusers_from_bfl(tmp_path / "s1.safetensors", config)
    hand = copy.deepcopy(reference)
    with torch.no_grad():
        hand.norm_out.linear.weight.copy_(torch.from_numpy(np.concatenate([np.zeros_like(shift), shift])))
    want = run_diffusers(hand, img, txt, t, layout)
    assert rel_err(outputs[1], want) <= TOL_GENERAL
    wrong = copy.deepcopy(reference)
    with torch.no_grad():
        wrong.norm_out.linear.weight.copy_(torch.from_numpy(np.concatenate([shift, np.zeros_like(shift)])))
    assert rel_err(outputs[1], run_diffusers(wrong, img, txt, t, layout)) > 1e-2
