"""Tiny random reference models built with diffusers (the PyTorch reference), for parity checks.

Used by the tests and by `python -m flux2ref.demo`. torch and diffusers are imported inside the
functions that need them, so importing this module does not pull them in.

Every tensor is randomised and well conditioned by fluxjax's own init rule (`fluxjax.init`; matrices
N(0, 1/fan_in), norm weights near 1) read in torch's layout: diffusers' default init leaves some at
zero, which would hide bugs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from fluxjax.config import FLUX2_DEV, Flux2Config
from fluxjax.init import NORM_SCALE, Draw, init_tree, leaf_draw, matrix
from fluxjax.layout import TokenLayout
from fluxjax.vae import pack

# Parity bars: relative L2 error of the output against diffusers fp32 (tests and demo share them).
# t = 0 without guidance: the sinusoid arguments are exactly 0, so only float32 summation order
# differs (an independent fp32 implementation measured 3e-7).
TOL_T0 = 1e-6
# Any t and guidance: diffusers' float32 sinusoid arguments reach 1000 rad (4000 for guidance 4),
# where float32 resolution is ~6e-5 rad; the independent implementation measured 1.6e-5..2.6e-5.
TOL_GENERAL = 5e-5
# bf16: fluxjax-bf16 may be at most this much farther from diffusers-fp32 than diffusers-bf16 is.
BF16_RATIO = 1.5
# Sampled latents, fp32 after 4 steps: the transformer's fp32 floor (~1e-6, sinusoid/RoPE) grows over steps.
LATENT_TOL = 1e-4

# A structurally real FLUX.2 (4 RoPE axes, SwiGLU, 3 modulations) shrunk with dataclasses.replace.
TINY = dataclasses.replace(FLUX2_DEV, in_channels=16, context_in_dim=24, hidden_size=64, num_heads=2,
                           depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8))


def diffusers_kwargs(config: Flux2Config) -> dict:
    """`Flux2Transformer2DModel(**kwargs)` arguments of `config`."""
    return dict(patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels,
                num_layers=config.depth, num_single_layers=config.depth_single_blocks,
                attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
                joint_attention_dim=config.context_in_dim, timestep_guidance_channels=config.timestep_channels,
                mlp_ratio=config.mlp_ratio, axes_dims_rope=config.axes_dim, rope_theta=config.theta,
                guidance_embeds=config.use_guidance_embed)


def torch_rule(name: str, shape: tuple[int, ...]) -> Draw:
    """fluxjax's init rule (`fluxjax.init.leaf_draw`) read in torch's layout: weights are [out, in, ...]
    (fan_in = prod(shape[1:])), other vectors are norm scales; biases and bn statistics by name."""
    field = name.rsplit(".", 1)[-1]
    if field in ("bias", "running_mean", "running_var"):
        return leaf_draw(field, shape)
    return NORM_SCALE if len(shape) == 1 else matrix(math.prod(shape[1:]))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 arrays for key -> torch-layout shape, drawn by `torch_rule` from one numpy draw."""
    shapes = {k: jax.ShapeDtypeStruct(tuple(v), np.float32) for k, v in shapes.items()}
    return init_tree(shapes, np.random.default_rng(seed), rule=torch_rule)


def randomize_(module, seed: int = 0):
    """Overwrite every parameter and batch-norm statistic of a torch module with `random_state`."""
    import torch

    tensors = {**dict(module.named_parameters()),
               **{k: b for k, b in module.named_buffers() if k.endswith(("running_mean", "running_var"))}}
    state = random_state({k: tuple(t.shape) for k, t in tensors.items()}, seed)
    with torch.no_grad():
        for k, t in tensors.items():
            t.copy_(torch.from_numpy(state[k]))
    return module


def diffusers_transformer(config: Flux2Config = TINY, seed: int = 0):
    """A randomised `Flux2Transformer2DModel` of `config`, fp32, eval mode."""
    from diffusers import Flux2Transformer2DModel

    return randomize_(Flux2Transformer2DModel(**diffusers_kwargs(config)).eval(), seed)


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def inputs(config: Flux2Config, layout: TokenLayout, batch: int = 2, seed: int = 0):
    """Random img [B, N, in] and txt [B, T, C] float32 inputs for `layout`."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, layout.n_image_stream, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, layout.n_txt, config.context_in_dim)).astype(np.float32)
    return img, txt


def run_diffusers(model, img, txt, timestep, layout, guidance=None, dtype=None, **kwargs):
    """The diffusers forward on numpy inputs (cast to `dtype`, a torch dtype, if given) -> float32 numpy."""
    import torch

    def t(x):
        x = torch.as_tensor(np.asarray(x, np.float32))
        return x if dtype is None else x.to(dtype)

    with torch.no_grad():
        out = model(t(img), t(txt), t(timestep), torch.as_tensor(layout.img_ids()), torch.as_tensor(layout.txt_ids()),
                    None if guidance is None else t(guidance), **kwargs)
    return out.sample.float().numpy()


def pipeline_tokens(latents) -> np.ndarray:
    """diffusers' `latents=` argument [B, P, Hl, Wl] (patchified, channels-first) -> the packed tokens
    [B, Hl * Wl, P] the pipelines make of it (`_pack_latents`), fluxjax's `noise=`."""
    return np.asarray(pack(np.moveaxis(np.asarray(latents), 1, -1)))


def pipeline_encoder(pipe):
    """A diffusers pipeline's own reference encoder (`_encode_vae_image`: posterior mean, patchify,
    bn-normalise) in the channels-last layout `fluxjax.images.reference_tokens` calls it with:
    pixels [1, H, W, 3] -> latent [1, H/16, W/16, P]."""
    import torch

    def encode(pixels):
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels, -1, 1)))
        with torch.no_grad():
            return np.moveaxis(pipe._encode_vae_image(x, generator=None).numpy(), 1, -1)

    return encode


def rel_err(a, b) -> float:
    """Relative L2 error of `a` against the reference `b`, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
