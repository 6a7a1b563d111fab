"""Sampler calls of the experiments: an edit prepared once, then run plainly, with captures, or as
a vmapped sweep over intervention values (`prepare`, `run` and `Edit` live in `experiments.backend`).

    edit = sweep.prepare(model, text, references=["red.png"], seed=task.seed, height=64, width=64)
    pixels, captures = sweep.run(model, edit, options, capture=Capture(text=(3,)))
    pixels = sweep.sweep(model, edit, options, [Interventions(knockout=k) for k in tables])  # [V, H, W, 3]

An `Edit` holds everything a sampler call needs except the interventions: the prompt embeddings,
the encoded reference, the token layout and the initial noise of one sample. `sweep` stacks a
list of interventions of one structure (only their array values differ: substitution sites and
values, masks, knockout tables) and runs them as `jax.vmap` over one compiled sampler program,
`chunk` cells per call (the last chunk padded by repeating its last cell, so every call has the
same shape and reuses the same program), then decodes the whole chunk with the VAE in one batch.

The model is a FLUX.2 `fluxjax.pipeline.Flux2Model` or any `experiments.backend.ModelBackend`
(`experiments.organism.OrganismModel`).

Axes as in `fluxjax.numerics`; V is the sweep axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.backend import POSITIONS, Edit, backend, prepare, run  # one edit; the sweep of many is here
from fluxjax import sampler as samplerlib
from fluxjax.interventions import Capture, Captures, Interventions, check_sites, stack
from fluxjax.layout import TokenLayout


@functools.partial(jax.jit, static_argnames=("config", "options", "attn_impl"))
def _sample_many(params, txt, txt_ids, img_ids, noise, refs, uncond, interventions, sigmas, *, config, options,
                 attn_impl):
    """The sampler vmapped over the leading V axis of every intervention array: [V, 1, N_img, P]."""
    def one(iv):
        return samplerlib.sample(params, config, options, txt, txt_ids, img_ids, noise=noise, refs=refs,
                                 uncond_txt=uncond, interventions=iv, sigmas=sigmas, attn_impl=attn_impl)[0]

    return jax.vmap(one)(interventions)


MEMORY_HEADROOM = 0.8  # share of the device's free memory a chunk's program may plan to use (the VAE decode,
#                        fragmentation and XLA's own estimates take the rest)


@dataclasses.dataclass(frozen=True)
class AutoChunk:
    """Chunk size chosen from the device's free memory (`fitting_chunk`); `fallback` cells per call
    where the device does not report its memory (CPU)."""
    fallback: int


def device_free_bytes(device=None) -> int | None:
    """Bytes the device can still allocate, or None where it does not say (XLA:CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def cells_that_fit(program_bytes, free_bytes: int, n_cells: int, headroom: float = MEMORY_HEADROOM) -> int:
    """The most cells per call (1 to n_cells) whose program fits in `headroom` of `free_bytes`.

    program_bytes(v): the compiled program's temporaries + outputs for v cells. The cost per cell
    is read from v = 1 and v = 2 (XLA plans memory per program, so it is linear in v but for a
    fixed part)."""
    one, two = program_bytes(1), program_bytes(2)
    per_cell = max(two - one, 1)
    fixed = one - per_cell
    return int(max(1, min(n_cells, (headroom * free_bytes - fixed) // per_cell)))


_PROGRAM_BYTES: dict = {}  # (program shape) -> XLA's planned bytes for one and for two cells


def fitting_chunk(model, edit: Edit, options: samplerlib.SamplerOptions, cells: Sequence[Interventions],
                  chunk, attn_impl: str | None = None, free_bytes: int | None = None) -> int | None:
    """Cells per call for `sweep`: an int or None as given, or for an `AutoChunk` the most cells whose
    compiled program fits in the device's free memory (XLA's memory plan of the program for one and
    two cells, read once per program shape; the free memory is read at every call)."""
    if not isinstance(chunk, AutoChunk):
        return chunk
    free = device_free_bytes() if free_bytes is None else free_bytes
    if free is None:
        return chunk.fallback
    model = backend(model)
    cell = model.with_cuts(edit.layout, edit.content_mask, cells[0])  # every cell has its structure and shapes
    key = (model.config, options, attn_impl, jax.tree.structure(cell), edit.txt.shape, edit.noise.shape,
           tuple((a.shape, a.dtype) for a in jax.tree.leaves(cell)))
    if key not in _PROGRAM_BYTES:
        def program_bytes(v):
            compiled = _sample_many.lower(
                model.params, edit.txt, jnp.asarray(edit.txt_ids), jnp.asarray(edit.layout.img_ids()), edit.noise,
                edit.refs, edit.uncond, stack([cell] * v), model.sigmas(options.num_steps), config=model.config,
                options=options, attn_impl=attn_impl).compile()
            mem = compiled.memory_analysis()
            return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)

        _PROGRAM_BYTES[key] = (program_bytes(1), program_bytes(2))
    return cells_that_fit(lambda v: _PROGRAM_BYTES[key][v - 1], free, len(cells))


def sweep(model, edit: Edit, options: samplerlib.SamplerOptions, cells: Sequence[Interventions], *,
          chunk: int | None = None, attn_impl: str | None = None,
          on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Every cell's image, as vmapped calls of one compiled sampler: uint8 [V, H, W, 3].

    cells: interventions of one pytree structure (a sweep varies values only). chunk: cells per
    call (None: all at once; an `AutoChunk`: as many as fit the device, `fitting_chunk`); bounds
    memory on large models. on_chunk(cells done, cells): called after each call (progress).
    """
    chunk = fitting_chunk(model, edit, options, cells, chunk, attn_impl)
    model = backend(model)
    cells = [model.with_cuts(edit.layout, edit.content_mask, iv) for iv in cells]
    if not cells:
        raise ValueError("a sweep needs at least one cell")
    for iv in cells:  # inside the compiled sweep the sites are traced values
        check_sites(iv, model.config)
    size = len(cells) if chunk is None else max(1, min(int(chunk), len(cells)))
    out = []
    for start in range(0, len(cells), size):
        part = cells[start:start + size]
        padded = part + [part[-1]] * (size - len(part))  # same shape every call: one program
        latents = _sample_many(model.params, edit.txt, jnp.asarray(edit.txt_ids), jnp.asarray(edit.layout.img_ids()),
                               edit.noise, edit.refs, edit.uncond, stack(padded), model.sigmas(options.num_steps),
                               config=model.config, options=options, attn_impl=attn_impl)
        pixels = model.decode(latents[:, 0], edit.height, edit.width)
        out.append(pixels[:len(part)])
        if on_chunk is not None:
            on_chunk(start + len(part), len(cells))
    return np.concatenate(out)
