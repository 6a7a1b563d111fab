"""The model interface the experiments run: `ModelBackend`, and its FLUX.2 implementation.

An experiment needs of a model the transformer (`config`, `params`), the sampler options, and the
ways in and out: prompt encoding, reference encoding, the image token grid, decoding, the noise
schedule, and the interventions every call must carry (`with_cuts`, e.g. an organism's routing
cuts). Two implementations:

    PipelineBackend   a FLUX.2 model folder (`fluxjax.pipeline.Flux2Model`): its VAE, text
                      encoder and schedule
    OrganismModel     a model organism (`organisms.experiment_model`): word tokenizer, patch
                      codec, linear schedule, routing cuts

`backend(model)` gives the interface of either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fluxjax import images as imagelib
from fluxjax import pipeline
from fluxjax.config import Flux2Config
from fluxjax.interventions import Interventions
from fluxjax.layout import TokenLayout
from fluxjax.sampler import SamplerOptions
from fluxjax.text import TextConditioning


@runtime_checkable
class ModelBackend(Protocol):
    """What the experiments read of a model."""

    config: Flux2Config
    params: Any  # the transformer's parameter tree
    options: SamplerOptions  # the model's default sampling
    multiple_of: int  # output sides are whole multiples of this many pixels

    def encode_prompts(self, prompts: Sequence[str]) -> TextConditioning: ...

    def reference_tokens(self, references: Sequence) -> tuple[Any, tuple, list]:
        """Reference images (paths or PIL) -> (tokens [1, N_ref, P], their grids, their sizes)."""

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        """The noisy image's token grid (rows, columns) for an output of height x width pixels."""

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents [B, N_img, P] -> uint8 pixels [B, H, W, 3]."""

    def sigmas(self, num_steps: int) -> np.ndarray | None:
        """The noise schedule (None: the sampler's FLUX.2 schedule of the image's token count)."""

    def with_cuts(self, layout: TokenLayout, content_mask, interventions: Interventions | None
                  ) -> Interventions | None:
        """`interventions` with whatever every call of this model must carry."""


class PipelineBackend:
    """The experiment interface of a FLUX.2 model folder: its VAE, text encoder and schedule."""

    multiple_of = imagelib.MULTIPLE_OF

    def __init__(self, model: pipeline.Flux2Model):
        self.model = model
        self.config, self.params, self.options = model.config, model.params, model.options

    def encode_prompts(self, prompts):
        return pipeline.encode_prompts(self.model, prompts)

    def reference_tokens(self, references):
        return pipeline.reference_tokens(self.model, references)

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        return imagelib.image_grid(height, width)

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents [B, N_img, P] -> uint8 pixels [B, H, W, 3] (diffusers' postprocess)."""
        return np.asarray(pipeline.decode_pixels(self.model.vae_params, self.model.vae_config, latents, height,
                                                  width))

    def sigmas(self, num_steps: int):
        return None

    def with_cuts(self, layout, content_mask, interventions):
        return interventions


def backend(model) -> ModelBackend:
    """The experiment interface of `model`: a `Flux2Model` wrapped, anything else checked and returned."""
    if isinstance(model, pipeline.Flux2Model):
        return PipelineBackend(model)
    if not isinstance(model, ModelBackend):
        raise TypeError(f"{type(model).__name__} is not an experiment model: it needs the attributes of "
                        "experiments.backend.ModelBackend")
    return model
