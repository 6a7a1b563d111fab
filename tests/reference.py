"""Tiny random reference models built with diffusers (the PyTorch reference), for parity tests.

Every tensor is randomised and well conditioned (matrices N(0, 1/fan_in), norm weights near 1):
diffusers' default init leaves some at zero, which would hide bugs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import fluxjax

# A structurally real FLUX.2 (4 RoPE axes, SwiGLU, 3 modulations) shrunk with dataclasses.replace.
TINY = dataclasses.replace(fluxjax.FLUX2_DEV, in_channels=16, context_in_dim=24, hidden_size=64, num_heads=2,
                           depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8))


def diffusers_kwargs(config: fluxjax.Flux2Config) -> dict:
    return dict(patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels,
                num_layers=config.depth, num_single_layers=config.depth_single_blocks,
                attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
                joint_attention_dim=config.context_in_dim, timestep_guidance_channels=config.timestep_channels,
                mlp_ratio=config.mlp_ratio, axes_dims_rope=config.axes_dim, rope_theta=config.theta,
                guidance_embeds=config.use_guidance_embed)


def randomize_(module, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * z if p.ndim == 1 else z / p.shape[1] ** 0.5)
    return module


def diffusers_transformer(config: fluxjax.Flux2Config = TINY, seed: int = 0):
    """A randomised `Flux2Transformer2DModel` of `config`, fp32, eval mode."""
    from diffusers import Flux2Transformer2DModel

    return randomize_(Flux2Transformer2DModel(**diffusers_kwargs(config)).eval(), seed)


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def inputs(config: fluxjax.Flux2Config, layout: fluxjax.TokenLayout, batch: int = 2, seed: int = 0):
    """Random img [B, N, in] and txt [B, T, C] float32 inputs for `layout`."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, layout.n_image_stream, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, layout.n_txt, config.context_in_dim)).astype(np.float32)
    return img, txt


def run_diffusers(model, img, txt, timestep, layout, guidance=None, **kwargs):
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(img), torch.as_tensor(txt), torch.as_tensor(np.asarray(timestep, np.float32)),
                    torch.as_tensor(layout.img_ids()), torch.as_tensor(layout.txt_ids()),
                    None if guidance is None else torch.as_tensor(np.asarray(guidance, np.float32)), **kwargs)
    return out.sample.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
