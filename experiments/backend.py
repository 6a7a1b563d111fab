"""The model interface the experiments run: `ModelBackend`, one edit on any such model, and its
FLUX.2 implementation.

An experiment needs of a model the transformer (`config`, `params`), the sampler options, and the
ways in and out: prompt encoding, reference encoding, the image token grid, decoding, the noise
schedule, and the interventions every call must carry (`with_cuts`, e.g. an organism's routing
cuts). Two implementations:

    PipelineBackend   a FLUX.2 model folder (`fluxjax.pipeline.Flux2Model`): its VAE, text
                      encoder and schedule
    OrganismModel     a model organism (`experiments.organism`): word tokenizer, patch codec,
                      linear schedule, routing cuts

`backend(model)` gives the interface of either; `experiments.load_model(name or folder)` loads one.
One edit is an `Edit` (`prepare`: prompt embeddings, encoded references, layout, noise) run by
`run` under the model's cuts and schedule; `experiments.sweep` runs many as vmapped sweeps. Both
kinds of model have `Editing`'s two methods, this same path:

    model = experiments.load_model("text-routed")            # or an organism folder, or a FLUX.2 folder
    edit = model.prepare("draw a ring in this color", [swatch], seed=0)   # edit.layout, edit.content_mask
    cut = fluxjax.knockout(model.config, edit.layout, edit.content_mask, "ref->text[padding]")
    result = model.edit(edit, interventions=fluxjax.Interventions(knockout=cut),
                        capture=fluxjax.Capture(sites=("b1.text.output",)))
    result.images                                            # uint8 [1, H, W, 3]
    result.captures["b1.text.output"]                        # [steps, 1, T, D]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from fluxjax import images as imagelib
from fluxjax import pipeline
from fluxjax import sampler as samplerlib
from fluxjax import sharding
from fluxjax.config import Flux2Config
from fluxjax.flow import token_groups
from fluxjax.interventions import Capture, Captures, Interventions
from fluxjax.layout import TokenLayout
from fluxjax.options import RuntimeOptions
from fluxjax.sampler import SamplerOptions
from fluxjax.text import TextConditioning


@runtime_checkable
class ModelBackend(Protocol):
    """What the experiments read of a model."""

    config: Flux2Config
    params: Any  # the transformer's parameter tree
    options: SamplerOptions  # the model's default sampling
    multiple_of: int  # output sides are whole multiples of this many pixels
    default_size: int  # output side (pixels) of an edit without a reference or a size given
    trained_cuts: tuple[str, ...]  # attention edges cut in every block in training and in every call (`with_cuts`)

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

    def prepare(self, prompt: str, references=(), *, seed: int = 0, height: int | None = None,
                width: int | None = None): ...

    def edit(self, prompt, references=(), *, seed: int = 0, height: int | None = None, width: int | None = None,
             interventions: Interventions | None = None, capture: Capture | None = None,
             options: SamplerOptions | None = None, runtime: RuntimeOptions | None = None) -> EditResult: ...


# Text positions of a substitution: the names of the command line and the token groups they cover.
POSITIONS = {"all": "text", "padding": "text[padding]", "content": "text[content]"}


@dataclasses.dataclass(frozen=True, eq=False)
class Edit:
    """One sample's inputs, shared by every cell of a sweep (batch 1)."""

    txt: jax.Array  # [1, T, C] prompt embeddings, model dtype
    txt_ids: np.ndarray  # int32 [T, 4]
    content_mask: np.ndarray  # bool [1, T]: the prompt's own tokens
    refs: jax.Array | None  # [1, N_ref, P] reference tokens, or None (text-to-image)
    layout: TokenLayout
    noise: jax.Array  # [1, N_img, P]
    height: int  # output pixels (multiples of 16)
    width: int
    uncond: jax.Array | None = None  # [1, T, C] empty-prompt embeddings, for guidance "cfg" only

    def text_mask(self, positions: str) -> np.ndarray:
        """bool [1, T]: the text positions named by `positions`, a key of POSITIONS."""
        return self.layout.text_mask(POSITIONS[positions], self.content_mask)


def prepare(model, text, *, references: Sequence = (), seed: int, height: int | None = None,
            width: int | None = None, uncond=None) -> Edit:
    """An edit of `text` (a one-prompt `TextConditioning`) with reference images (paths or PIL; none:
    text-to-image) and the noise of `seed` (`fluxjax.sampler.initial_noise`, as `pipeline.generate`).
    height x width: output pixels, floored to whole tokens (default: the first reference's size as
    the model reads it, else the model's `default_size`)."""
    model = backend(model)
    dtype = model.params.img_in.dtype
    embeds = jnp.asarray(np.asarray(text.embeds, np.float32), dtype)
    if embeds.shape[0] != 1:
        raise ValueError(f"an Edit holds one prompt; got {embeds.shape[0]}")
    refs, grids, sizes = None, (), []
    if references:
        refs, grids, sizes = model.reference_tokens(list(references))
    first = tuple(int(v) for v in sizes[0]) if sizes else (model.default_size, model.default_size)
    grid = model.image_grid(first[0] if height is None else height, first[1] if width is None else width)
    layout = TokenLayout(n_txt=embeds.shape[1], img_grid=grid, ref_grids=tuple(grids))
    noise = samplerlib.initial_noise(seed, 1, layout.n_img, model.config.in_channels, dtype)
    if model.options.guidance == "cfg" and uncond is None:
        raise ValueError("this model samples with classifier-free guidance: pass `uncond`, the empty prompt's "
                         "TextConditioning")
    return Edit(txt=embeds, txt_ids=np.asarray(text.txt_ids), content_mask=np.asarray(text.content_mask, bool),
                refs=refs, layout=layout, noise=noise, height=grid[0] * model.multiple_of,
                width=grid[1] * model.multiple_of,
                uncond=None if uncond is None else jnp.asarray(np.asarray(uncond.embeds, np.float32), dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Where the sampler calls run: a (data, fsdp) mesh and the transformer's params on it (split
    over fsdp, replicated over data), made by `experiments.hosts.placement`."""

    mesh: jax.sharding.Mesh
    params: Any

    @property
    def replicas(self) -> int:
        """Model replicas: the cells of a sweep call are split over this many."""
        return self.mesh.shape[sharding.DATA]

    @property
    def shared(self) -> bool:
        """One call needs the whole mesh: the weights are split, or the mesh spans processes."""
        return self.mesh.shape[sharding.FSDP] > 1 or not all(
            d.process_index == jax.process_index() for d in self.mesh.devices.flat)


def run(model, edit: Edit, options: samplerlib.SamplerOptions, interventions: Interventions | None = None,
        capture: Capture | None = None, runtime: RuntimeOptions | None = None,
        placement: Placement | None = None) -> tuple[np.ndarray, Captures | None]:
    """One sampler call: (pixels uint8 [1, H, W, 3], captures with a leading [num_steps] axis or None).

    With a placement whose replicas are whole models on this process's devices, the call runs on
    the first device (a batch of one has nothing to split); else on the whole mesh, captures
    brought back as numpy arrays."""
    model = backend(model)
    shared = placement is not None and placement.shared
    interventions = model.with_cuts(edit.layout, edit.content_mask, interventions)
    flow = isinstance(capture, Capture) and capture.flow is not None
    latents, captures = samplerlib.sample(placement.params if shared else model.params, model.config, options,
                                          edit.txt, edit.txt_ids, edit.layout.img_ids(), noise=edit.noise,
                                          refs=edit.refs, uncond_txt=edit.uncond, interventions=interventions,
                                          capture=capture, sigmas=model.sigmas(options.num_steps),
                                          runtime=runtime,
                                          groups=token_groups(edit.layout, edit.content_mask) if flow else None)
    if shared:
        latents, captures = sharding.to_host((latents, captures))
    return model.decode(latents, edit.height, edit.width), captures


@dataclasses.dataclass(frozen=True, eq=False)
class EditResult:
    """What `Editing.edit` returns: the image, the captures, and the edit's inputs (its layout and
    content mask, for building more interventions)."""

    images: np.ndarray  # uint8 [1, H, W, 3]
    captures: Captures | None  # arrays with a leading [num_steps] axis; None when nothing was asked for
    edit: Any  # the `Edit` that ran

    @property
    def layout(self) -> TokenLayout:
        return self.edit.layout

    @property
    def content_mask(self) -> np.ndarray:
        """bool [1, T]: the prompt's own tokens (`text[content]`); every other text position is padding."""
        return self.edit.content_mask


class Editing:
    """One edit with interventions and captures, as the experiments make it (`prepare` and `run`
    below): mixed into every `ModelBackend`."""

    def prepare(self, prompt: str, references=(), *, seed: int = 0, height: int | None = None,
                width: int | None = None):
        """The edit of `prompt` with `references` (paths or PIL images; one or a list; none: text-to-image)
        and the noise of `seed`, not yet run: an `Edit`, whose `layout` and
        `content_mask` build interventions (`fluxjax.knockout(model.config, edit.layout,
        edit.content_mask, ...)`, `edit.text_mask("padding")`). Size: height x width pixels (default
        the first reference's, else `default_size`), floored to whole tokens."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: one string, got {type(prompt).__name__}")
        if isinstance(references, (str, os.PathLike, PIL.Image.Image)):
            references = [references]
        uncond = self.encode_prompts([""]) if self.options.guidance == "cfg" else None
        return prepare(self, self.encode_prompts([prompt]), references=list(references), seed=seed, height=height,
                       width=width, uncond=uncond)

    def edit(self, prompt, references=(), *, seed: int = 0, height: int | None = None, width: int | None = None,
             interventions: Interventions | None = None, capture: Capture | None = None,
             options: SamplerOptions | None = None, runtime: RuntimeOptions | None = None) -> EditResult:
        """Run one edit: `prompt` (with `references`, `seed`, size as `prepare`) or an edit `prepare`
        made, with `interventions` at every step and `capture` kept (`fluxjax.sampler.sample`), under
        the model's own cuts and schedule. options: the sampler's (default the model's)."""
        if isinstance(prompt, Edit):
            if references or height is not None or width is not None or seed != 0:
                raise ValueError("an Edit from `prepare` already holds its references, seed and size; pass them to "
                                 "`prepare`")
            edit = prompt
        else:
            edit = self.prepare(prompt, references, seed=seed, height=height, width=width)
        images, captures = run(self, edit, options or self.options, interventions, capture, runtime=runtime)
        return EditResult(images=images, captures=captures, edit=edit)


class PipelineBackend(Editing):
    """The experiment interface of a FLUX.2 model folder: its VAE, text encoder and schedule."""

    multiple_of = imagelib.MULTIPLE_OF
    default_size = pipeline.DEFAULT_SIZE
    trained_cuts = ()

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
