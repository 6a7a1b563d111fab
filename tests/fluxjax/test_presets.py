"""The released presets at full size, by shape only: nothing is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import fluxjax
from fluxjax.conversion.convert import infer_config, preset_name
from fluxjax.conversion.transformer_keys import expected_source_shapes

# Transformer parameter counts of the released checkpoints (diffusers and BFL, meta-device count).
RELEASED_COUNTS = {"dev": 32_223_281_152, "klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248}
# Key counts of the released files (spec section 6).
KEY_COUNTS = {"dev": {"bfl": 299, "diffusers": 331}, "klein-9b": {"bfl": 201, "diffusers": 233},
              "klein-4b": {"bfl": 149, "diffusers": 169}}


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_parameter_count(name):
    shapes = jax.eval_shape(lambda key: fluxjax.init_params(fluxjax.PRESETS[name], key), jax.random.key(0))
    assert fluxjax.count_params(shapes) == RELEASED_COUNTS[name]


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_checkpoint_keys_and_recognition(name, fmt):
    config = fluxjax.PRESETS[name]
    shapes = expected_source_shapes(config, fmt)
    assert len(shapes) == KEY_COUNTS[name][fmt]
    inferred, _ = infer_config(shapes, fmt)
    assert inferred == config and preset_name(inferred) == name


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_forward_shape_at_1024_with_one_1024_reference(name):
    config = fluxjax.PRESETS[name]
    layout = fluxjax.TokenLayout(n_txt=512, img_grid=(64, 64), ref_grids=((64, 64),))  # 1024 px / 16
    assert layout.n_img == layout.n_ref == 4096
    params = fluxjax.param_shapes(config, jnp.bfloat16)
    img = jax.ShapeDtypeStruct((1, layout.n_image_stream, config.in_channels), jnp.bfloat16)
    txt = jax.ShapeDtypeStruct((1, layout.n_txt, config.context_in_dim), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    guidance = t if config.use_guidance_embed else None
    out = jax.eval_shape(lambda p, i, c, s, g: fluxjax.forward(p, config, i, c, s, layout.img_ids(), layout.txt_ids(), g)[0],
                         params, img, txt, t, guidance)
    assert out.shape == (1, 8192, config.output_channels) and out.dtype == jnp.bfloat16
