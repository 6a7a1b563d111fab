"""An organism as a model of the experiment commands (`python -m experiments.*`) and of one edit
(`OrganismModel.edit`, `experiments.backend.Editing`).

`OrganismModel` implements `experiments.backend.ModelBackend`: it gives the experiments what a FLUX.2
folder gives them: the transformer (config, params), the sampler options, and the ways in and out (prompt
encoding, reference encoding, decoding), here the organism's word tokenizer and text encoder and
the patch codec. Two things differ from a FLUX.2 folder and are applied here, so every experiment
runs the organism as it was trained:

    cuts      the organism's routing cuts are put in front of every intervention of every call
              (`organisms.model.organism_interventions`);
    sigmas    sampling uses the organism's linear schedule (`organisms.model.sigmas`).

Images are 32 x 32 (4-pixel tokens, 8 x 8 grid); the tasks are the colour bucket's study colours
with the organisms' shapes as objects (`experiments.models`).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments.backend import Editing
from fluxjax.images import load_image, to_rgb
from fluxjax.text import TextConditioning, text_ids
from organisms import codec
from organisms.checkpoint import NAMES, committed, load_organism
from organisms.data import SIZE
from organisms.model import SAMPLER, Organism, OrganismParams, organism_interventions, sigmas, text_features


@dataclasses.dataclass(frozen=True, eq=False)
class OrganismModel(Editing):
    organism: Organism
    organism_params: OrganismParams
    name: str
    multiple_of: int = codec.PATCH  # output sides are floored to whole tokens
    default_size: int = SIZE  # organisms draw 32 x 32

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> OrganismModel:
        """An organism folder, or the name of a committed organism (`direct`, `text-routed`)."""
        organism, params = load_organism(committed(path) if path in NAMES else path)
        return cls(organism=organism, organism_params=params, name=name or organism.name)

    # what the experiments read of a model ------------------------------------------------------
    @property
    def config(self):
        return self.organism.transformer

    @property
    def params(self):
        return self.organism_params.transformer

    @property
    def options(self):
        return dataclasses.replace(SAMPLER, num_steps=self.organism.sampler_steps)

    @property
    def trained_cuts(self) -> tuple[str, ...]:
        return self.organism.cuts

    def sigmas(self, num_steps: int) -> np.ndarray:
        return sigmas(num_steps)

    def encode_prompts(self, prompts) -> TextConditioning:
        tokens, content = self.organism.tokenize(list(prompts))
        embeds = np.asarray(text_features(self.organism_params, self.organism, jnp.asarray(tokens)), np.float32)
        return TextConditioning(embeds=embeds, content_mask=content, txt_ids=text_ids(tokens.shape[1]),
                                input_ids=tokens.astype(np.int64), attention_mask=np.ones(tokens.shape, np.int64))

    def reference_tokens(self, references):
        """Reference images (PIL or paths, resized to 32 x 32) -> (tokens [1, N_ref, 48], grids, sizes)."""
        tokens, grids, sizes = [], [], []
        for ref in references:
            image = to_rgb(load_image(ref))  # every PIL mode, 16-bit greyscale scaled (fluxjax.images)
            pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
            tokens.append(codec.images_to_tokens(pixels[None])[0])
            grids.append(codec.grid(SIZE, SIZE))
            sizes.append((SIZE, SIZE))
        return jnp.asarray(np.concatenate(tokens)[None]), tuple(grids), sizes

    def image_grid(self, height: int, width: int) -> tuple[int, int]:
        if (height, width) != (SIZE, SIZE):
            raise ValueError(f"organisms draw {SIZE} x {SIZE} images, not {height} x {width}")
        return codec.grid(height, width)

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        return codec.tokens_to_images(latents, codec.grid(height, width))

    def with_cuts(self, layout, content_mask, interventions):
        """`interventions` with the organism's routing cuts (None when it has none to add)."""
        return organism_interventions(self.organism, layout, content_mask, interventions)

    def describe(self) -> str:
        cuts = ", ".join(self.organism.cuts) or "none"
        return f"model organism '{self.organism.name}' (routing cuts in every block: {cuts})"

