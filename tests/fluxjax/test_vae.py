"""The FLUX.2 autoencoder against diffusers' `AutoencoderKLFlux2` and the Flux2 pipelines' latent code.

Reference models are random diffusers VAEs with every tensor randomised and well conditioned (conv
weights N(0, 1/fan_in), GroupNorm weights near 1, small random biases, random bn statistics with
positive variance); fluxjax gets the same weights through its own strict converter.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxjax.checkpoint import CheckpointError
from fluxjax.conversion.vae import detect_vae_format, vae_params_from_state
from fluxjax.conversion.vae_keys import expected_source_shapes, leaf_shapes, rows_for
from fluxjax import vae
from fluxjax.trees import leaf_name

# Relative L2 error of fp32 outputs. Convolutions summed in a different order (XLA vs oneDNN) differ
# by a few ulp per layer; ~30 layers deep that is ~1e-6. 1e-5 is the bar the project set for parity.
REL_L2 = 1e-5

# Structurally the real autoencoder (4 levels, shortcut convs where the width changes, mid-block
# attention, quant convs, 2x2 patches) at small widths.
TINY = dataclasses.replace(vae.FLUX2_VAE, block_out_channels=(16, 32, 32, 32), latent_channels=8, norm_num_groups=8)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def diffusers_kwargs(config: vae.VAEConfig) -> dict:
    n = config.num_levels
    return dict(in_channels=config.in_channels, out_channels=config.out_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=config.block_out_channels,
                decoder_block_out_channels=config.decoder_block_out_channels,
                layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
                norm_num_groups=config.norm_num_groups, use_quant_conv=config.use_quant_conv,
                use_post_quant_conv=config.use_post_quant_conv,
                mid_block_add_attention=config.mid_block_add_attention, batch_norm_eps=config.batch_norm_eps,
                patch_size=config.patch_size)


from flux2ref.models import random_state, randomize_  # noqa: E402  (shared with benchmarks/vae.py)


def diffusers_vae(config: vae.VAEConfig, seed: int = 0):
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return randomize_(AutoencoderKLFlux2(**diffusers_kwargs(config)).eval(), seed)


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def images(batch, height, width, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def pipeline():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    return Flux2KleinPipeline


def reference_tokens(model, x):
    """diffusers' own reference-image path: `_encode_vae_image` (posterior mean, patchify, bn) + `_pack_latents`."""
    import torch
    P = pipeline()
    fake_self = types.SimpleNamespace(vae=model, _patchify_latents=P._patchify_latents)
    with torch.no_grad():
        z = P._encode_vae_image(fake_self, nchw(x), None)
    return P._pack_latents(z).numpy()


def reference_decode_tokens(model, tokens, height, width):
    """The decode branch of `Flux2KleinPipeline.__call__`: scatter by ids, undo bn, unpatchify, decode."""
    import torch
    P = pipeline()
    th, tw = height // 16, width // 16
    t = torch.from_numpy(np.asarray(tokens))
    ids = P._prepare_latent_ids(torch.zeros(t.shape[0], 1, th, tw))
    with torch.no_grad():
        lat = P._unpack_latents_with_ids(t, ids, th, tw)
        mean = model.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
        lat = P._unpatchify_latents(lat * std + mean)
        return nhwc(model.decode(lat, return_dict=False)[0])


_jit_encode = jax.jit(vae.encode, static_argnums=1)
_jit_decode_tokens = jax.jit(vae.decode_tokens, static_argnums=(1, 3, 4))


def check_parity(config, model, params, x):
    """Posterior mean, normalised packed tokens and decoded tokens against the diffusers pipeline path."""
    import torch
    with torch.no_grad():
        mean_ref = nhwc(model.encode(nchw(x)).latent_dist.mode())
    mean = _jit_encode(params, config, x)
    assert mean.shape == mean_ref.shape
    assert rel_l2(mean, mean_ref) <= REL_L2

    # The steps of `encode_to_tokens` after the encoder (its equality with this composition is tested
    # below), so one compiled encoder serves both checks.
    tokens_ref = reference_tokens(model, x)
    tokens = vae.pack(vae.normalize(params, config, vae.patchify(mean, config.patch_size)))
    assert tokens.shape == tokens_ref.shape == (x.shape[0], x.shape[1] * x.shape[2] // 256, config.token_channels)
    assert rel_l2(tokens, tokens_ref) <= REL_L2

    # Decode the reference's tokens on both sides, so the decode error is measured alone.
    h, w = x.shape[1:3]
    img_ref = reference_decode_tokens(model, tokens_ref, h, w)
    img = _jit_decode_tokens(params, config, jnp.asarray(tokens_ref), h, w)
    assert img.shape == img_ref.shape == x.shape
    assert rel_l2(img, img_ref) <= REL_L2


@pytest.fixture(scope="module")
def tiny():
    model = diffusers_vae(TINY, seed=1)
    return model, vae_params_from_state(state_numpy(model), TINY, "diffusers")


@pytest.mark.parity
@pytest.mark.parametrize("size", [(32, 48), (48, 32), (64, 64)])
def test_tiny_parity_with_diffusers(tiny, size):
    model, params = tiny
    check_parity(TINY, model, params, images(2, *size, seed=size[0] + size[1]))


@pytest.mark.parity
def test_real_width_parity_with_diffusers_64px():
    model = diffusers_vae(vae.FLUX2_VAE, seed=2)
    params = vae_params_from_state(state_numpy(model), vae.FLUX2_VAE, "diffusers")
    check_parity(vae.FLUX2_VAE, model, params, images(1, 64, 64, seed=3))


def test_encode_to_tokens_is_encode_patchify_normalize_pack():
    # random parameters read through the diffusers table (no PyTorch model needed here)
    params = vae_params_from_state(random_state(expected_source_shapes(TINY, "diffusers"), seed=1), TINY, "diffusers")
    x = images(2, 32, 48, seed=7)
    tokens = jax.jit(vae.encode_to_tokens, static_argnums=1)(params, TINY, x)
    steps = vae.pack(vae.normalize(params, TINY, vae.patchify(_jit_encode(params, TINY, x))))
    np.testing.assert_allclose(tokens, steps, rtol=1e-6, atol=1e-6)


@pytest.mark.parity
def test_variants_without_attention_and_quant_convs():
    config = dataclasses.replace(TINY, mid_block_add_attention=False, use_quant_conv=False,
                                 use_post_quant_conv=False, decoder_block_out_channels=(16, 16, 32, 32),
                                 layers_per_block=1)
    model = diffusers_vae(config, seed=4)
    check_parity(config, model, vae_params_from_state(state_numpy(model), config, "diffusers"), images(1, 32, 32))


# ----------------------------------------------------------------------------------------------
# Patchify, packing, normalisation


def test_patchify_channel_order_and_inverse():
    c, h, w = 3, 4, 6
    z = np.arange(2 * h * w * c, dtype=np.float32).reshape(2, h, w, c)
    p = np.asarray(vae.patchify(z))
    assert p.shape == (2, h // 2, w // 2, 4 * c)
    for ch in range(c):
        for pi in range(2):
            for pj in range(2):
                np.testing.assert_array_equal(p[:, :, :, ch * 4 + pi * 2 + pj], z[:, pi::2, pj::2, ch])
    np.testing.assert_array_equal(vae.unpatchify(p), z)


@pytest.mark.parity
def test_patchify_is_the_pipelines():
    z = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    p = np.asarray(vae.patchify(z))
    P = pipeline()
    np.testing.assert_array_equal(nhwc(P._patchify_latents(nchw(z))), p)
    np.testing.assert_array_equal(nhwc(P._unpatchify_latents(nchw(p))), z)


def test_pack_is_row_major_and_unpack_inverts():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32)
    t = np.asarray(vae.pack(x))
    np.testing.assert_array_equal(t[:, 1 * 5 + 4], x[:, 1, 4])
    np.testing.assert_array_equal(vae.unpack(t, (3, 5)), x)
    with pytest.raises(ValueError, match="token grid"):
        vae.unpack(t, (5, 5))


@pytest.mark.parity
def test_pack_and_unpack_are_the_pipelines():
    import torch
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32)
    t = np.asarray(vae.pack(x))
    P = pipeline()
    np.testing.assert_array_equal(t, P._pack_latents(nchw(x)).numpy())
    ids = P._prepare_latent_ids(nchw(x))
    np.testing.assert_array_equal(nchw(vae.unpack(t, (3, 5))).numpy(),
                                  P._unpack_latents_with_ids(torch.from_numpy(t), ids).numpy())


@pytest.mark.parity
def test_normalize_is_batchnorm_eval_and_denormalize_inverts(tiny):
    import torch
    model, params = tiny
    x = np.random.default_rng(1).standard_normal((2, 3, 4, TINY.token_channels)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model.bn(nchw(x)))  # model.eval(): running statistics
    out = vae.normalize(params, TINY, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.denormalize(params, TINY, out), x, rtol=1e-5, atol=1e-5)


def test_image_sizes_must_be_multiples_of_16():
    params = jax.eval_shape(lambda: vae.init_vae_params(TINY, jax.random.key(0)))
    with pytest.raises(ValueError, match="multiple of 16x16"):
        vae.encode_to_tokens(params, TINY, jnp.zeros((1, 40, 32, 3)))
    with pytest.raises(ValueError, match="multiple of 16x16"):
        vae.decode_tokens(params, TINY, jnp.zeros((1, 4, 128)), 32, 24)


# ----------------------------------------------------------------------------------------------
# Shapes, config, init


FLUX2_VAE_PARAMETERS = 84_046_371  # AutoencoderKLFlux2's parameters and batch-norm statistics


def _full_preset_count() -> int:
    shapes = jax.eval_shape(lambda: vae.init_vae_params(vae.FLUX2_VAE, jax.random.key(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_full_preset_shapes_and_count_without_memory():
    assert _full_preset_count() == FLUX2_VAE_PARAMETERS
    assert vae.FLUX2_VAE.token_channels == 128 and vae.FLUX2_VAE.pixels_per_token == (16, 16)


@pytest.mark.parity
def test_full_preset_count_is_diffusers():
    import torch
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    ref_n = sum(p.numel() for p in ref.parameters()) + ref.bn.running_mean.numel() + ref.bn.running_var.numel()
    assert ref_n == _full_preset_count() == FLUX2_VAE_PARAMETERS


def test_config_validation():
    with pytest.raises(ValueError, match="norm_num_groups"):
        dataclasses.replace(vae.FLUX2_VAE, block_out_channels=(128, 250, 512, 512))
    with pytest.raises(ValueError, match="one entry per level"):
        dataclasses.replace(vae.FLUX2_VAE, decoder_block_out_channels=(128, 256))
    with pytest.raises(dataclasses.FrozenInstanceError):
        vae.FLUX2_VAE.latent_channels = 16


def test_init_runs_and_decodes_finite():
    params = vae.init_vae_params(TINY, jax.random.key(0))
    out = _jit_decode_tokens(params, TINY, jnp.ones((1, 4, TINY.token_channels)), 32, 32)
    assert out.shape == (1, 32, 32, 3) and bool(jnp.isfinite(out).all())


# ----------------------------------------------------------------------------------------------
# Conversion


def test_tables_cover_every_leaf_once():
    for fmt in ("bfl", "diffusers"):
        rows = rows_for(vae.FLUX2_VAE, fmt)
        assert set(rows) == set(leaf_shapes(vae.FLUX2_VAE))
        assert len({r.key for r in rows.values()}) == len(rows)


@pytest.mark.parity
def test_diffusers_table_is_exactly_the_diffusers_state_dict():
    import torch
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "bn.num_batches_tracked"}
    assert expected_source_shapes(vae.FLUX2_VAE, "diffusers") == state


@pytest.mark.parity
def test_bfl_mapping_agrees_with_diffusers_ldm_converter(tmp_path):
    """A random BFL-format file goes through diffusers' own LDM VAE converter into a strictly loaded
    `AutoencoderKLFlux2`; fluxjax's BFL conversion of the same file must equal fluxjax's diffusers
    conversion of that model, leaf for leaf, and give the same outputs."""
    import torch
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "ae.safetensors"
    save_file(random_state(expected_source_shapes(TINY, "bfl"), seed=5), str(path))
    with safe_open(str(path), "np") as f:
        bfl = {k: f.get_tensor(k) for k in f.keys()}
    assert detect_vae_format(bfl) == "bfl"

    # FLUX.2 keeps quant_conv / post_quant_conv inside encoder / decoder and adds bn; the rest is
    # the standard LDM layout that diffusers' converter handles.
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    ldm = {}
    for k, v in bfl.items():
        for old, new in moved.items():
            if k.startswith(old):
                k = new + k[len(old):]
        ldm[k] = torch.from_numpy(v)
    kwargs = diffusers_kwargs(TINY)
    converted = convert_ldm_vae_checkpoint(ldm, kwargs)
    converted.update({k: ldm[k] for k in ("bn.running_mean", "bn.running_var")})
    model = AutoencoderKLFlux2(**kwargs).eval()
    model.load_state_dict(converted, strict=True)  # bn.num_batches_tracked is filled in by torch

    ours = vae_params_from_state(bfl, TINY, "bfl")
    theirs = vae_params_from_state(state_numpy(model), TINY, "diffusers")
    a, b = jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves_with_path(theirs)
    assert [leaf_name(p) for p, _ in a] == [leaf_name(p) for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=leaf_name(p))
    check_parity(TINY, model, ours, images(1, 32, 48, seed=6))


def test_detect_format(tiny):
    model, _ = tiny
    assert detect_vae_format(state_numpy(model)) == "diffusers"
    with pytest.raises(CheckpointError, match="not a FLUX.2 autoencoder"):
        detect_vae_format({"img_in.weight": None})


def test_conversion_is_strict_and_names_the_key(tiny):
    model, _ = tiny
    state = state_numpy(model)
    missing = dict(state)
    del missing["decoder.up_blocks.1.resnets.2.conv2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'decoder.up_blocks.1.resnets.2.conv2.bias'"):
        vae_params_from_state(missing, TINY, "diffusers")
    extra = dict(state, **{"encoder.mid_block.attentions.0.to_q.lora": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'encoder.mid_block.attentions.0.to_q.lora'"):
        vae_params_from_state(extra, TINY, "diffusers")
    wrong = dict(state, **{"encoder.conv_in.weight": np.zeros((16, 3, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"key 'encoder.conv_in.weight' has shape \(16, 3, 1, 1\)"):
        vae_params_from_state(wrong, TINY, "diffusers")
    with pytest.raises(CheckpointError, match="missing key"):
        vae_params_from_state(state, TINY, "bfl")
    other = dataclasses.replace(TINY, latent_channels=4)
    with pytest.raises(CheckpointError, match="shape"):
        vae_params_from_state(state, other, "diffusers")
    no_counter = {k: v for k, v in state.items() if k != "bn.num_batches_tracked"}
    vae_params_from_state(no_counter, TINY, "diffusers")  # BatchNorm's step counter is optional


# ----------------------------------------------------------------------------------------------
# Files: diffusers folder and BFL single file -> native checkpoint -> load


def _assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [leaf_name(p) for p, _ in la] == [leaf_name(p) for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, leaf_name(p)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=leaf_name(p))


def test_convert_diffusers_folder_and_bfl_file_to_native_and_load(tiny, tmp_path):
    from safetensors.numpy import save_file

    from fluxjax.conversion.vae import convert_vae, is_vae_source
    from fluxjax.vae_checkpoint import load_vae

    model, params = tiny
    model.save_pretrained(tmp_path / "vae")
    assert is_vae_source(tmp_path / "vae")
    assert convert_vae(tmp_path / "vae", tmp_path / "native") == TINY  # config from config.json
    config, loaded = load_vae(tmp_path / "native")
    assert config == TINY
    _assert_same_params(loaded, params)

    bfl = random_state(expected_source_shapes(TINY, "bfl"), seed=8)
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    assert is_vae_source(tmp_path / "ae.safetensors")
    convert_vae(tmp_path / "ae.safetensors", tmp_path / "native_bfl", config=TINY, dtype="bf16")
    config, loaded = load_vae(tmp_path / "native_bfl")
    want = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), vae_params_from_state(bfl, TINY, "bfl"))
    _assert_same_params(loaded, want)

    with pytest.raises(CheckpointError, match="already exists"):
        convert_vae(tmp_path / "vae", tmp_path / "native")
    with pytest.raises(CheckpointError, match="missing key|has shape"):  # FLUX2_VAE is the single-file default
        convert_vae(tmp_path / "ae.safetensors", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(CheckpointError, match="not the config asked for"):
        convert_vae(tmp_path / "vae", tmp_path / "other", config=vae.FLUX2_VAE)


def test_cli_converts_a_vae_folder(tiny, tmp_path, capsys):
    from fluxjax.conversion.__main__ import main
    from fluxjax.vae_checkpoint import load_vae

    model, params = tiny
    model.save_pretrained(tmp_path / "vae")
    assert main([str(tmp_path / "vae"), str(tmp_path / "native"), "--quiet"]) == 0
    assert "autoencoder" in capsys.readouterr().out
    _assert_same_params(load_vae(tmp_path / "native")[1], params)
    assert main([str(tmp_path / "vae"), str(tmp_path / "other"), "--quiet", "--config", "klein-9b"]) == 1
    assert "--config applies to transformers" in capsys.readouterr().err
