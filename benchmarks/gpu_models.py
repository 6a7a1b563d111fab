"""Random FLUX.2 models of real size, made on the device: fluxjax parameters, a diffusers transformer
(one random state both sides can share), and a whole klein-9B-sized model folder.

Used by `benchmarks.gpu_check` and `benchmarks.gpu_rehearsal`; nothing large crosses from the host.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common

# --- fluxjax -------------------------------------------------------------------------------------


def _is_norm(path) -> bool:
    return any(getattr(k, "name", None) in ("query_norm", "key_norm") for k in path)


def fluxjax_params(config, dtype, seed: int = 0):
    """Random params made on the default device, one leaf at a time, drawn directly in `dtype`
    (as `init_params`: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2)); peak memory is the
    params plus one leaf's temporaries."""
    shapes = fluxjax.param_shapes(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dt, norm):
        z = jax.random.normal(key, shape, dt)
        return 1 + 0.1 * z if norm else z * jnp.asarray(1 / math.sqrt(shape[-2]), dt)

    out = [draw(k, s.shape, jnp.dtype(dtype), _is_norm(p)) for (p, s), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


# --- diffusers -----------------------------------------------------------------------------------


def meta_model(config, torch_dtype):
    """Flux2Transformer2DModel of `config` on the meta device (shapes only), parameters in `torch_dtype`."""
    import torch
    from diffusers import Flux2Transformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            return Flux2Transformer2DModel(**common.reference_helpers().diffusers_kwargs(config))
    finally:
        torch.set_default_dtype(default)


def diffusers_model(config, torch_dtype, device, seed: int = 0):
    """A Flux2Transformer2DModel built on the meta device and materialised on `device` in
    `torch_dtype` (no full-precision copy ever exists), filled like `fluxjax_params`."""
    return randomized(meta_model(config, torch_dtype).to_empty(device=device).eval(), device, seed)


def randomized(module, device, seed: int):
    """`module` with every weight drawn on `device`: vectors 1 + N(0, 0.1^2), matrices N(0, 1/fan_in)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g)
            if p.ndim == 1:
                p.mul_(0.1).add_(1.0)
            else:
                p.mul_(p.shape[1] ** -0.5)
    return module


# --- one random state for both sides ------------------------------------------------------------


def shared_params(model, config, dtype):
    """fluxjax weights converted from the diffusers model's own state dict (one random state for both
    sides), leaf by leaf: each stacked leaf crosses the host once and lives on the default device."""
    import ml_dtypes
    import torch

    from fluxjax.conversion.transformer import leaves_from_state

    state = model.state_dict()

    class Host(dict):  # tensors as numpy on demand (bfloat16 through ml_dtypes: numpy has no bfloat16)
        def __getitem__(self, key):
            t = state[key].detach()
            if t.dtype == torch.bfloat16:
                return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.cpu().numpy()

    host = Host({k: None for k in state})
    host.dtypes = {k: np.dtype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else np.dtype(str(v.dtype)[6:])
                   for k, v in state.items()}  # torch.float32 -> float32
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    leaves = [jnp.asarray(leaf, dtype) for _, leaf in leaves_from_state(host, config, "diffusers", shapes=shapes)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fluxjax.param_shapes(config)), leaves)


# --- a klein-9B-sized model folder ------------------------------------------------

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_real_folder(path, device, seed: int = 0) -> str:
    """A random FLUX.2 [klein] 9B-sized model folder in the diffusers layout, built on `device` in
    bfloat16: the klein-9B transformer, the FLUX.2 VAE, a Qwen3 text encoder of Qwen3-8B's shapes and
    the offline tokenizer of the tiny folder (its small vocabulary indexes Qwen3's table)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux2ref.folder import qwen3_tokenizer

    def on_device(make):  # built on the meta device, materialised on `device` in bfloat16, filled
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                module = make()
        finally:
            torch.set_default_dtype(default)
        return randomized(module.to_empty(device=device).eval(), device, seed)

    transformer = diffusers_model(fluxjax.FLUX2_KLEIN_9B, torch.bfloat16, device, seed)
    vae = AutoencoderKLFlux2().to(device=device, dtype=torch.bfloat16).eval()
    text = on_device(lambda: Qwen3ForCausalLM(Qwen3Config(**QWEN3_8B)))
    text.model.rotary_emb.__init__(text.config, device=device)  # its buffer was made on the meta device
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=text, tokenizer=qwen3_tokenizer(), transformer=transformer,
                              is_distilled=True)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, transformer, vae, text
    return str(path)
