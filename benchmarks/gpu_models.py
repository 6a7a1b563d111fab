"""Random FLUX.2 [klein] models of real size, built in memory on the device: nothing is read from or
written to disk. Used by `benchmarks.gpu_check` (command A) and `benchmarks.gpu_rehearsal` (B).

Two shape sets, `KLEIN_9B` (the real shapes: the klein-9B transformer, a Qwen3-8B-shaped text
encoder, the FLUX.2 VAE, 1024 x 1024 images, 512 text tokens) and `TINY` (the same structure at
toy widths, for the CPU rehearsals in the tests), and for each:

    fluxjax_params(config, dtype)          random transformer parameters, made on the default device
    fluxjax_model(shapes, dtype, text)     a `fluxjax.pipeline.Flux2Model`: those parameters, a random
                                           VAE, the [klein] distilled sampler, prompts `text` encoded
    qwen3_encoder(shapes, device, dtype)   a random Qwen3 text encoder (torch) and the offline tokenizer
    diffusers_model(config, dtype, device) a random `Flux2Transformer2DModel` on the device
    diffusers_pipeline(shapes, ...)        a `Flux2KleinPipeline` of random parts on the device
    shared_params(model, config, dtype)    fluxjax parameters converted from a diffusers model (one
                                           random state for both sides)

Weights are drawn on the device in the target dtype (no float32 copy at real size): fluxjax's leaf
by leaf (matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), as `fluxjax.init_params`); torch
modules are built under `torch.device(device)` with the default dtype set, so their own
initialisers run there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common
from fluxjax.config import Flux2Config
from fluxjax.vae import FLUX2_VAE, VAEConfig

# Qwen3-8B's shapes (its config.json), the [klein] 9B text encoder: features 3 x 4096 = 12288.
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Everything of one rehearsal model's size."""

    name: str
    transformer: Flux2Config
    qwen3: dict  # transformers.Qwen3Config arguments
    vae: VAEConfig
    size: int  # pixels per side of the reference and of the output
    n_txt: int  # text tokens (the encoder's max_length)

    @property
    def layout(self) -> fluxjax.TokenLayout:
        """The edit's tokens: the prompt, the image and one reference of the same size."""
        grid = (self.size // 16, self.size // 16)
        return fluxjax.TokenLayout(self.n_txt, grid, (grid,))


KLEIN_9B = Shapes("klein-9B", fluxjax.FLUX2_KLEIN_9B, QWEN3_8B, FLUX2_VAE, 1024, 512)

# The tiny folder's structure (flux2ref.folder): 4 latent channels, a 28-layer Qwen3 of width 16.
_TINY_VAE = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
TINY = Shapes(
    "tiny",
    dataclasses.replace(fluxjax.FLUX2_KLEIN_9B, in_channels=16, context_in_dim=48, hidden_size=64, num_heads=2,
                        depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8)),
    dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
         head_dim=8, vocab_size=400, max_position_embeddings=1024, tie_word_embeddings=True),
    _TINY_VAE, 64, 64)

SHAPES = {"klein-9B": KLEIN_9B, "tiny": TINY}


def param_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


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


class EncodedPrompts:
    """A text encoder's encodings made beforehand (`fluxjax.text.TextConditioning` per prompt), in
    the place of the encoder: the torch model can leave the device before JAX takes its memory."""

    def __init__(self, encodings: dict):
        self.encodings = dict(encodings)

    def encode(self, prompts, cache_dir=None):
        from fluxjax.text import TextConditioning

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in prompts if p not in self.encodings]
        if missing:
            raise KeyError(f"prompts {missing} were not encoded beforehand; encode them with the text encoder first")
        rows = [self.encodings[p] for p in prompts]
        return TextConditioning(*(np.concatenate([getattr(r, f.name) for r in rows]) if f.name != "txt_ids"
                                  else rows[0].txt_ids for f in dataclasses.fields(TextConditioning)))


def fluxjax_model(shapes: Shapes, dtype, text: EncodedPrompts, seed: int = 0):
    """A `fluxjax.pipeline.Flux2Model` of random weights on the default device: the transformer in
    `dtype`, the VAE in float32 (as `load_model` keeps it), the [klein] distilled sampler."""
    from fluxjax import pipeline, sampler

    params = jax.block_until_ready(fluxjax_params(shapes.transformer, dtype, seed))
    vae_params = jax.block_until_ready(jax.jit(fluxjax.init_vae_params, static_argnums=0)(
        shapes.vae, jax.random.key(seed + 1)))
    return pipeline.Flux2Model(config=shapes.transformer, params=params, vae_config=shapes.vae,
                               vae_params=vae_params, options=sampler.KLEIN_DISTILLED, text_encoder=text,
                               text_cache=None, name=f"random {shapes.name}")


# --- torch ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _built_on(device, torch_dtype, seed: int):
    """Modules made inside are created on `device` in `torch_dtype`, initialised there, reproducibly."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(device), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(default)


def randomized(module, device, seed: int):
    """`module` with every weight drawn on `device`: vectors 1 + N(0, 0.1^2), matrices N(0, 1/fan_in)
    (well-conditioned, as `fluxjax_params`)."""
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


def meta_model(config, torch_dtype):
    """Flux2Transformer2DModel of `config` on the meta device (shapes only), parameters in `torch_dtype`."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with _built_on("meta", torch_dtype, 0):
        return Flux2Transformer2DModel(**common.reference_helpers().diffusers_kwargs(config))


def diffusers_model(config, torch_dtype, device, seed: int = 0):
    """A random Flux2Transformer2DModel made on `device` in `torch_dtype`, filled as `fluxjax_params`."""
    from diffusers import Flux2Transformer2DModel

    with _built_on(device, torch_dtype, seed):
        model = Flux2Transformer2DModel(**common.reference_helpers().diffusers_kwargs(config)).eval()
    return randomized(model, device, seed)


def qwen3_encoder(shapes: Shapes, device, torch_dtype, seed: int = 0):
    """A random Qwen3ForCausalLM of `shapes.qwen3` on `device` (transformers' own initialisation) with
    the offline byte-level tokenizer of the tiny folder (its ids index the large vocabulary too), as
    a `fluxjax.text.TextEncoder` of max_length `shapes.n_txt`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux2ref.folder import qwen3_tokenizer
    from fluxjax.text import qwen3_encoder as encoder

    with _built_on(device, torch_dtype, seed):
        model = Qwen3ForCausalLM(Qwen3Config(**shapes.qwen3)).eval()
    return encoder(model, qwen3_tokenizer(), max_length=shapes.n_txt, identity=f"random {shapes.name} qwen3 {seed}")


def diffusers_pipeline(shapes: Shapes, device, torch_dtype, seed: int = 0):
    """(a `Flux2KleinPipeline` (distilled) of random parts on `device`, its text encoder as a
    `fluxjax.text.TextEncoder`): transformer, text encoder and VAE in `torch_dtype` (as
    `from_pretrained(torch_dtype=...)` loads them; the VAE with diffusers' own initialisation), the
    offline tokenizer."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    text = qwen3_encoder(shapes, device, torch_dtype, seed + 2)
    with _built_on(device, torch_dtype, seed + 1):
        vae = AutoencoderKLFlux2(**{f.name: getattr(shapes.vae, f.name) for f in dataclasses.fields(VAEConfig)}).eval()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=text.model, tokenizer=text.tokenizer,
                              transformer=diffusers_model(shapes.transformer, torch_dtype, device, seed + 3),
                              is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, text


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
