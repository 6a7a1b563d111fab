"""The model organisms: small FLUX.2 transformers (fluxjax's own `Flux2Config`, `forward`, `sample`
and interventions) with a jointly trained text encoder and the patchify codec.

An organism is (transformer config, text encoder config, routing cuts):

    direct       no cut: trained plainly; it may read the reference from anywhere.
    text-routed  `ref->image` and `ref->text[content]` cut in every block. The reference reaches the
                 noisy image only through the text padding positions, the route the study reports
                 for FLUX.2.

The routing cuts are part of the model, not an experiment: the text-routed organism was trained
with them, so it is only defined with them. Every call that runs an organism (training's
`velocity`, `generate`) goes through `organism_interventions`, which puts the cuts in front of
whatever interventions an experiment adds (`&`: an edge is open only if both leave it open).
Experiments therefore measure the organism as trained; an extra knockout such as
`ref->text[padding]` is cut on top of the cuts. Text-to-image runs have no reference tokens, so
the cuts have nothing to cut there and no knockout is passed (bit-identical to the plain forward).

Token layouts: text-to-image [text 32 | image 64]; edit [text 32 | image 64 | reference 64].
Sampling integrates the rectified flow with `Organism.sampler_steps` Euler steps (SAMPLER_STEPS
unless replaced; sampling only, so changing it needs no retraining) on a linear schedule
(`sigmas`), not FLUX.2's shifted schedule: the shift's empirical fit is for thousands of image
tokens and would leave the last step of a 64-token image jumping from sigma 0.5 to 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import fluxjax
from fluxjax import Flux2Config, Interventions, Knockout, SamplerOptions, TokenLayout
from fluxjax.init import init_tree
from fluxjax.interventions import check_knockout
from fluxjax.params import Flux2Weights
from organisms import codec
from organisms.data import SIZE
from organisms.text import TEXT_LENGTH, TextEncoderConfig, TextEncoderParams, encode, encoder_shapes, tokenize

ENCODER = TextEncoderConfig()
TRANSFORMER = dataclasses.replace(
    fluxjax.FLUX2_KLEIN_9B, in_channels=codec.CHANNELS, context_in_dim=ENCODER.output_dim, hidden_size=128,
    num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 8, 8, 8), theta=10, use_guidance_embed=False)
# RoPE base 10, not FLUX.2's 2000: with 8 dimensions per axis, base 2000 turns two of the four
# frequencies by under 0.16 rad across the 8 x 8 grid (1, 0.15, 0.022, 0.0033 rad per token), so
# attention can barely tell near tokens from far ones; base 10 gives 1, 0.56, 0.32, 0.18.

GRID = codec.grid(SIZE, SIZE)  # (8, 8) tokens
T2I_LAYOUT = TokenLayout(n_txt=TEXT_LENGTH, img_grid=GRID)
EDIT_LAYOUT = TokenLayout(n_txt=TEXT_LENGTH, img_grid=GRID, ref_grids=(GRID,))

SAMPLER_STEPS = 8
SAMPLER = SamplerOptions(num_steps=SAMPLER_STEPS, guidance="none")


def sigmas(num_steps: int = SAMPLER_STEPS) -> np.ndarray:
    """float32 [num_steps + 1]: the linear rectified-flow schedule from 1 to 0."""
    return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Organism:
    name: str
    transformer: Flux2Config = TRANSFORMER
    encoder: TextEncoderConfig = ENCODER
    cuts: tuple[str, ...] = ()  # attention edges cut in every block, at training and at sampling
    sampler_steps: int = SAMPLER_STEPS  # a sampling choice: change it with dataclasses.replace, no retraining

    def __post_init__(self):
        if self.transformer.context_in_dim != self.encoder.output_dim:
            raise ValueError(f"the transformer reads {self.transformer.context_in_dim} text channels, the encoder "
                             f"writes {self.encoder.output_dim}")
        if self.transformer.in_channels != codec.CHANNELS:
            raise ValueError(f"the codec writes {codec.CHANNELS} channels per token, the transformer reads "
                             f"{self.transformer.in_channels}")

    @property
    def text_length(self) -> int:
        """Text positions T (the encoder's length; TEXT_LENGTH unless a training regime changed it)."""
        return self.encoder.length

    def layout(self, refs: bool) -> TokenLayout:
        """[text T | image 64] or, with a reference, [text T | image 64 | reference 64]."""
        return TokenLayout(n_txt=self.text_length, img_grid=GRID, ref_grids=(GRID,) if refs else ())

    def tokenize(self, instructions) -> tuple[np.ndarray, np.ndarray]:
        """`organisms.text.tokenize` at this organism's text length."""
        return tokenize(instructions, self.text_length)


DIRECT = Organism("direct")
TEXT_ROUTED = Organism("text-routed", cuts=("ref->image", "ref->text[content]"))
ORGANISMS = {o.name: o for o in (DIRECT, TEXT_ROUTED)}


@struct.dataclass
class OrganismParams:
    transformer: Flux2Weights
    encoder: TextEncoderParams


INIT_STREAM = 3  # first SeedSequence entry of the initial parameters (organisms.data uses 0..2)


def init_organism(organism: Organism, seed: int, *, adaln_zero: bool = True) -> OrganismParams:
    """Initial parameters by fluxjax's one rule (`fluxjax.init`), drawn on the host with numpy
    (nothing to compile; the same numbers on any JAX version): matrices N(0, 1/fan_in), embeddings
    N(0, 1), one flat draw from `default_rng([INIT_STREAM, seed])` for the transformer then the encoder.

    adaln_zero: the training init: QK-norm weights 1, every modulation and the final layer 0, so
    each block starts as the identity and the first prediction is 0. False draws them like in
    `fluxjax.init_params` (a random model in which every path carries signal, for tests).
    """
    shapes = OrganismParams(transformer=fluxjax.param_shapes(organism.transformer),
                            encoder=encoder_shapes(organism.encoder))
    host = init_tree(shapes, np.random.default_rng([INIT_STREAM, seed]), training=adaln_zero)
    return jax.tree_util.tree_map(jnp.asarray, host)


# ---------------------------------------------------------------------------------------------
# the routing cuts


def routing_knockout(organism: Organism, layout: TokenLayout, content_mask) -> Knockout | None:
    """The organism's own cuts for this layout (built with `fluxjax.knockout`), or None when it has
    none or the layout has no reference (nothing to cut)."""
    if not organism.cuts or layout.num_refs == 0:
        return None
    return fluxjax.knockout(organism.transformer, layout, content_mask, organism.cuts, blocks="all")


def organism_interventions(organism: Organism, layout: TokenLayout, content_mask,
                           interventions: Interventions | None = None) -> Interventions | None:
    """`interventions` with the organism's routing cuts added (see the module docstring).

    An extra knockout may carry a sampler step axis ([S, blocks, G, G]); it must be built from the
    same layout and content mask.
    """
    own = routing_knockout(organism, layout, content_mask)
    if own is None:
        return interventions
    iv = interventions if interventions is not None else Interventions()
    extra = iv.knockout
    if extra is None:
        return dataclasses.replace(iv, knockout=own)
    if np.shape(extra.groups)[-1] != np.shape(own.groups)[-1]:
        raise ValueError(f"the knockout covers {np.shape(extra.groups)[-1]} tokens, this layout {layout.total}")
    if not isinstance(extra.groups, jax.core.Tracer):
        if not np.array_equal(*np.broadcast_arrays(np.asarray(extra.groups), np.asarray(own.groups))):
            raise ValueError("the knockout was built from another content mask than this run's; build it with "
                             "this run's content mask")
    own_allowed = own.allowed  # [blocks, G, G]; with a head axis for a knockout per head [blocks, H, G, G]
    if np.ndim(extra.allowed) == 4 and np.shape(extra.allowed)[:2] == (organism.transformer.num_blocks,
                                                                       organism.transformer.num_heads):
        own_allowed = own_allowed[:, None]
    allowed = jnp.logical_and(extra.allowed, own_allowed)
    if not isinstance(allowed, jax.core.Tracer):
        check_knockout(np.asarray(allowed).reshape(-1, *allowed.shape[-2:]), own.groups, layout)
    return dataclasses.replace(iv, knockout=Knockout(allowed=allowed, groups=extra.groups,
                                                          stream_counts=own.stream_counts))


# ---------------------------------------------------------------------------------------------
# running an organism


def text_features(params: OrganismParams, organism: Organism, tokens) -> jax.Array:
    """[B, T, C]: what the transformer reads as its text input."""
    return encode(params.encoder, organism.encoder, tokens)


def velocity(params: OrganismParams, organism: Organism, x, refs, tokens, t, interventions=None, capture=None,
             runtime: fluxjax.RuntimeOptions | None = None):
    """(The predicted velocity [B, 64, 48] of the noisy tokens x at time t [B], Captures): training's
    forward.

    refs: reference tokens [B, 64, 48] or None; interventions: built by `organism_interventions`
    for this layout (on the host: the knockout needs the concrete content mask); runtime: the
    attention kernel (`fluxjax.RuntimeOptions`).
    """
    layout = organism.layout(refs is not None)
    img = x if refs is None else jnp.concatenate([x, refs], axis=1)
    out, captures = fluxjax.forward(params.transformer, organism.transformer, img,
                                    text_features(params, organism, tokens), t, layout.img_ids(), layout.txt_ids(),
                                    interventions=interventions, capture=capture, runtime=runtime)
    return out[:, :layout.n_img], captures


def generate(params: OrganismParams, organism: Organism, tokens, content_mask, *, refs=None, seed=None, noise=None,
             interventions: Interventions | None = None, capture=None, txt=None, num_steps: int | None = None,
             runtime: fluxjax.RuntimeOptions | None = None):
    """Sample image tokens [B, 64, 48] with `fluxjax.sample`, the organism's cuts applied.

    tokens, content_mask: from `organisms.text.tokenize`. refs: reference tokens [B or 1, 64, 48].
    seed: int or [B] ints (or `noise` [B, 64, 48]). txt: text features to use instead of encoding
    `tokens` (e.g. the empty prompt's, for a lens run). num_steps: None for the organism's
    `sampler_steps`. Returns what `fluxjax.sample` returns: (tokens, captures).
    """
    layout = organism.layout(refs is not None)
    if txt is None:
        txt = text_features(params, organism, tokens)
    iv = organism_interventions(organism, layout, content_mask, interventions)
    num_steps = organism.sampler_steps if num_steps is None else num_steps
    options = dataclasses.replace(SAMPLER, num_steps=num_steps)
    return fluxjax.sample(params.transformer, organism.transformer, options, txt, layout.txt_ids(), layout.img_ids(),
                          noise=noise, seed=seed, refs=refs, interventions=iv, capture=capture,
                          sigmas=sigmas(num_steps), runtime=runtime)


def generate_images(params: OrganismParams, organism: Organism, instructions, references=None, *, seeds,
                    interventions: Interventions | None = None, num_steps: int | None = None) -> np.ndarray:
    """uint8 images [B, 32, 32, 3] for instructions and (optional) uint8 references [B, 32, 32, 3]."""
    tokens, content = organism.tokenize(list(instructions))
    refs = None if references is None else jnp.asarray(codec.images_to_tokens(np.asarray(references)))
    out, _ = generate(params, organism, tokens, content, refs=refs, seed=np.asarray(seeds),
                      interventions=interventions, num_steps=num_steps)
    return codec.tokens_to_images(out, GRID)
