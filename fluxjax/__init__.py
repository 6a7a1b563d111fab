"""fluxjax: a pure-functional JAX/Flax FLUX.2 transformer built to be taken apart.

    config, params = fluxjax.load_transformer("klein9b-native/")
    out = fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids)

`import fluxjax` never imports torch or diffusers.
"""

from fluxjax import sharding  # make_mesh, param_shardings, shard_params, shard_batch
from fluxjax.checkpoint import CheckpointError, load_transformer, save_transformer
from fluxjax.config import FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, PRESETS, Flux2Config
from fluxjax.interventions import (
    BLOCK0_INPUT,
    Capture,
    Captures,
    DropReference,
    Interventions,
    Knockout,
    Substitution,
    allow_all,
    cut_reference,
    drop_reference,
    knockout,
    substitution,
)
from fluxjax.layout import TokenLayout
from fluxjax.model import forward
from fluxjax.params import Flux2Params, count_params, init_params, param_shapes
from fluxjax.sampler import SamplerOptions, sample
from fluxjax.vae import (
    FLUX2_VAE,
    VAEConfig,
    VAEParams,
    decode_tokens,
    encode_to_tokens,
    init_vae_params,
    vae_param_shapes,
)
from fluxjax.vae_checkpoint import load_vae, save_vae

__all__ = [
    "FLUX2_DEV", "FLUX2_KLEIN_4B", "FLUX2_KLEIN_9B", "PRESETS", "Flux2Config",
    "BLOCK0_INPUT", "Capture", "Captures", "DropReference", "Interventions", "Knockout", "Substitution",
    "allow_all", "cut_reference", "drop_reference", "knockout", "substitution",
    "TokenLayout", "forward", "Flux2Params", "count_params", "init_params", "param_shapes",
    "CheckpointError", "load_transformer", "save_transformer",
    "SamplerOptions", "sample",
    "FLUX2_VAE", "VAEConfig", "VAEParams", "decode_tokens", "encode_to_tokens", "init_vae_params", "vae_param_shapes",
    "load_vae", "save_vae",
    "sharding",
]
