"""fluxjax: a pure-functional JAX/Flax FLUX.2 transformer built to be taken apart.

    config, params = fluxjax.load_transformer("klein9b-native/")
    out, caps = fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids,
                                capture=("b3.text.output", "b17.image.attn_out"), num_ref_tokens=layout.n_ref)
    caps["b17.image.attn_out"]                   # [B, N_img, D]

`import fluxjax` never imports torch or diffusers, and imports jax only when a name below is first
used: the submodules that need no jax (`fluxjax.metrics`, `fluxjax.files`, `fluxjax.layout`) stay
light for tools that only read run folders.
"""

import importlib

# name -> the submodule that defines it (read on first use, PEP 562)
_EXPORTS = {
    "CheckpointError": "checkpoint", "load_transformer": "checkpoint", "save_transformer": "checkpoint",
    "FLUX2_DEV": "config", "FLUX2_KLEIN_4B": "config", "FLUX2_KLEIN_9B": "config", "PRESETS": "config",
    "Flux2Config": "config",
    "Capture": "captures", "Captures": "captures",
    "BLOCK0_INPUT": "interventions", "DropReference": "interventions", "Interventions": "interventions",
    "Knockout": "interventions", "Substitution": "interventions", "allow_all": "interventions",
    "cut_reference": "interventions", "drop_reference": "interventions", "knockout": "interventions",
    "per_step": "interventions", "stack": "interventions", "substitution": "interventions",
    "AttentionFlow": "flow", "Flow": "flow", "TokenGroups": "flow", "token_groups": "flow",
    "TokenLayout": "layout",
    "forward": "model",
    "RuntimeOptions": "options",
    "Site": "sites", "site": "sites",
    "Flux2Weights": "params", "count_params": "params", "init_params": "params", "param_shapes": "params",
    "SamplerOptions": "sampler", "sample": "sampler",
    "FLUX2_VAE": "vae", "VAEConfig": "vae", "VAEParams": "vae", "decode_tokens": "vae", "encode_to_tokens": "vae",
    "init_vae_params": "vae", "vae_param_shapes": "vae",
    "load_vae": "vae_checkpoint", "save_vae": "vae_checkpoint",
}
_SUBMODULES = ("sharding",)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fluxjax.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fluxjax.{name}")
    else:
        raise AttributeError(f"module 'fluxjax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
