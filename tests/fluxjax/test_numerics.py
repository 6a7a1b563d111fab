"""Numerics functions against the reference formulas they mirror (diffusers / torch, fp32)."""

import numpy as np
import pytest

from fluxjax import numerics

# fp32 functions computed by the same formula in both libraries: differences are a few ulp.
TIGHT = 2e-6


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parity
def test_timestep_embedding_matches_diffusers():
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 250.0, 999.0, 4000.0], np.float32)
    ref = get_timestep_embedding(torch.tensor(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    out = np.asarray(numerics.timestep_embedding(t, 256))
    # Arguments up to 4000 rad: float32 cos/sin implementations differ by ~1 ulp of the argument.
    np.testing.assert_allclose(out[:2], ref[:2], atol=TIGHT)
    np.testing.assert_allclose(out, ref, atol=1e-3)
    assert np.allclose(out[:, :128], np.cos(t[:, None] * np.exp(-np.log(1e4) * np.arange(128) / 128)), atol=1e-3)


@pytest.mark.parity
def test_rope_tables_match_diffusers_float64_angles():
    import torch
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, 50, 300), rng.integers(0, 128, 300), rng.integers(0, 128, 300),
                    rng.integers(0, 512, 300)], axis=1).astype(np.int64)
    cos_ref, sin_ref = Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32])(torch.tensor(ids))
    cos, sin = numerics.rope_tables(ids[None].astype(np.int32), (32, 32, 32, 32), 2000)
    # Both are float64 angles rounded once to float32: bit-identical.
    np.testing.assert_array_equal(np.asarray(cos)[0], cos_ref.numpy())
    np.testing.assert_array_equal(np.asarray(sin)[0], sin_ref.numpy())


def test_rope_out_of_table_positions_are_nan_not_wrong():
    ids = np.array([[[0, 0, 0, numerics.ROPE_TABLE_SIZE]]], np.int32)
    cos, _ = numerics.rope_tables(ids, (32, 32, 32, 32), 2000)
    assert np.isnan(np.asarray(cos)[0, 0, 96:]).all()


@pytest.mark.parity
def test_apply_rope_matches_diffusers():
    import torch
    from diffusers.models.embeddings import apply_rotary_emb

    x = _rand(2, 7, 3, 16)
    cos, sin = np.cos(_rand(7, 16, seed=1)), np.sin(_rand(7, 16, seed=1))
    ref = apply_rotary_emb(torch.tensor(x), (torch.tensor(cos), torch.tensor(sin)), sequence_dim=1).numpy()
    out = np.asarray(numerics.apply_rope(x, cos[None], sin[None]))
    np.testing.assert_allclose(out, ref, atol=TIGHT)


@pytest.mark.parity
def test_layer_norm_and_rms_norm_match_torch():
    import torch
    x = 3 * _rand(4, 5, 64) + 1
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (64,), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(numerics.layer_norm(x)), ref, atol=TIGHT)
    w = 1 + 0.1 * _rand(64, seed=2)
    rms = torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        rms.weight.copy_(torch.tensor(w))
        ref = rms(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(numerics.rms_norm(x, w)), ref, atol=TIGHT * 4)


@pytest.mark.parity
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa(masked):
    import torch
    q, k, v = _rand(2, 9, 3, 16, seed=0), _rand(2, 11, 3, 16, seed=1), _rand(2, 11, 3, 16, seed=2)
    mask = np.random.default_rng(3).random((2, 9, 11)) > 0.4 if masked else None
    if mask is not None:
        mask[:, :, 0] = True  # every query keeps a key
    tq, tk, tv = (torch.tensor(a).transpose(1, 2) for a in (q, k, v))
    tm = None if mask is None else torch.tensor(mask)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm).transpose(1, 2).numpy()
    out = np.asarray(numerics.attention(q, k, v, mask))
    np.testing.assert_allclose(out, ref, atol=TIGHT)


def test_swiglu_gates_the_first_half():
    u = _rand(3, 8)
    gate, value = u[:, :4], u[:, 4:]
    expected = gate / (1 + np.exp(-gate)) * value
    np.testing.assert_allclose(np.asarray(numerics.swiglu(u)), expected, atol=TIGHT)
