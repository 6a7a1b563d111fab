"""Sampler calls of the experiments: an edit prepared once, then run plainly, with captures, or as
a vmapped sweep over intervention values (`prepare`, `run` and `Edit` live in `experiments.backend`).

    edit = sweep.prepare(model, text, references=["red.png"], seed=task.seed, height=64, width=64)
    pixels, captures = sweep.run(model, edit, options, capture=Capture(sites=("b3.text.output",)))
    pixels = sweep.sweep(model, edit, options, [Interventions(knockout=k) for k in tables])  # [V, H, W, 3]

An `Edit` holds everything a sampler call needs except the interventions: the prompt embeddings,
the encoded reference, the token layout and the initial noise of one sample. `sweep` stacks a
list of interventions of one structure (only their array values differ: substitution sites and
values, masks, knockout tables) and runs them as `jax.vmap` over one compiled sampler program,
`chunk` cells per call (the last chunk padded by repeating its last cell, so every call has the
same shape and reuses the same program), then decodes the whole chunk with the VAE in one batch.

The model is a FLUX.2 `fluxjax.pipeline.Flux2Model` or any `experiments.backend.ModelBackend`
(`experiments.organism.OrganismModel`).

Several devices: given a `Placement` (a (data, fsdp) mesh and the params placed on it, made by
`experiments.hosts.placement`), a call holds `chunk` cells per model replica, chunk x data in all,
split over the mesh's `data` axis; the edit's arrays are the same on every device. The mesh may
span processes (one model sharded over several hosts): every process then makes the same calls,
and each gets the whole result back (`fluxjax.sharding.to_host`).

Axes as in `fluxjax.numerics`; V is the sweep axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.backend import POSITIONS, Edit, Placement, backend, prepare, run  # one edit; sweeps: here
from fluxjax import sampler as samplerlib
from fluxjax import sharding
from fluxjax.interventions import Capture, Captures, Interventions, check_sites, stack
from fluxjax.layout import TokenLayout
from fluxjax.options import RuntimeOptions


@functools.partial(jax.jit, static_argnames=("config", "options", "runtime"))
def _sample_many(params, txt, txt_ids, img_ids, noise, refs, uncond, interventions, sigmas, *, config, options,
                 runtime):
    """The sampler vmapped over the leading V axis of every intervention array: [V, 1, N_img, P]."""
    def one(iv):
        return samplerlib.sample(params, config, options, txt, txt_ids, img_ids, noise=noise, refs=refs,
                                 uncond_txt=uncond, interventions=iv, sigmas=sigmas, runtime=runtime)[0]

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
    stats = (device or jax.local_devices()[0]).memory_stats()
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
                  chunk, runtime: RuntimeOptions | None = None, free_bytes: int | None = None,
                  placement: Placement | None = None) -> int | None:
    """Cells per call (per model replica, with a placement) for `sweep`: an int or None as given, or
    for an `AutoChunk` the most cells whose compiled program fits in the device's free memory (XLA's
    memory plan of the program for one and two cells per replica, read once per program shape; the
    free memory, the least of the placement's devices here, is read at every call)."""
    if not isinstance(chunk, AutoChunk):
        return chunk
    if free_bytes is None:
        devices = [None] if placement is None else [d for d in placement.mesh.devices.flat
                                                    if d.process_index == jax.process_index()]
        free = [device_free_bytes(d) for d in devices]
        free_bytes = None if None in free else min(free)
    if free_bytes is None:
        return chunk.fallback
    model = backend(model)
    replicas = 1 if placement is None else placement.replicas
    cell = model.with_cuts(edit.layout, edit.content_mask, cells[0])  # every cell has its structure and shapes
    key = (model.config, options, runtime, jax.tree.structure(cell), edit.txt.shape, edit.noise.shape,
           tuple((a.shape, a.dtype) for a in jax.tree.leaves(cell)), None if placement is None else placement.mesh)
    if key not in _PROGRAM_BYTES:
        def program_bytes(v):  # XLA's plan per device: for a mesh, each device's part of the program
            stacked = stack([cell] * v * replicas)
            params = model.params
            if placement is not None:
                stacked, params = sharding.put(stacked, sharding.batch_sharding(placement.mesh)), placement.params
            compiled = _sample_many.lower(
                params, edit.txt, jnp.asarray(edit.txt_ids), jnp.asarray(edit.layout.img_ids()), edit.noise,
                edit.refs, edit.uncond, stacked, model.sigmas(options.num_steps), config=model.config,
                options=options, runtime=runtime).compile()
            mem = compiled.memory_analysis()
            return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)

        _PROGRAM_BYTES[key] = (program_bytes(1), program_bytes(2))
    return cells_that_fit(lambda v: _PROGRAM_BYTES[key][v - 1], free_bytes, len(cells))


def call_size(n_cells: int, chunk: int | None, replicas: int = 1) -> int:
    """Cells per vmapped call: `chunk` per replica (None: the whole sweep), never more per replica
    than the sweep needs; a multiple of `replicas`, so every replica gets as many."""
    per_replica = -(-n_cells // replicas)
    return replicas * (per_replica if chunk is None else max(1, min(int(chunk), per_replica)))


def sweep(model, edit: Edit, options: samplerlib.SamplerOptions, cells: Sequence[Interventions], *,
          chunk: int | None = None, runtime: RuntimeOptions | None = None, placement: Placement | None = None,
          on_chunk: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Every cell's image, as vmapped calls of one compiled sampler: uint8 [V, H, W, 3].

    cells: interventions of one pytree structure (a sweep varies values only). chunk: cells per
    call, per model replica with a placement (None: all at once; an `AutoChunk`: as many as fit the
    device, `fitting_chunk`); bounds memory on large models. placement: the devices (module
    docstring); None: the default device. on_chunk(cells done, cells): called after each call
    (progress).
    """
    chunk = fitting_chunk(model, edit, options, cells, chunk, runtime, placement=placement)
    model = backend(model)
    cells = [model.with_cuts(edit.layout, edit.content_mask, iv) for iv in cells]
    if not cells:
        raise ValueError("a sweep needs at least one cell")
    for iv in cells:  # inside the compiled sweep the sites are traced values
        check_sites(iv, model.config)
    size = call_size(len(cells), chunk, 1 if placement is None else placement.replicas)
    out = []
    for start in range(0, len(cells), size):
        part = cells[start:start + size]
        padded = stack(part + [part[-1]] * (size - len(part)))  # same shape every call: one program
        params = model.params
        if placement is not None:  # the cells split over the replicas, the params already placed
            padded, params = sharding.put(padded, sharding.batch_sharding(placement.mesh)), placement.params
        latents = _sample_many(params, edit.txt, jnp.asarray(edit.txt_ids), jnp.asarray(edit.layout.img_ids()),
                               edit.noise, edit.refs, edit.uncond, padded, model.sigmas(options.num_steps),
                               config=model.config, options=options, runtime=runtime)
        if placement is not None:
            latents = sharding.to_host(latents)
        pixels = model.decode(latents[:, 0], edit.height, edit.width)
        out.append(pixels[:len(part)])
        if on_chunk is not None:
            on_chunk(start + len(part), len(cells))
    return np.concatenate(out)
