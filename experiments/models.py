"""The models the experiment commands run, as named by --model, and what each kind implies.

Two kinds:

    organism     `direct` or `text-routed` (the committed model organisms), or an organism folder
                 (`organisms.experiment_model.OrganismModel`): 32 x 32 images, the organisms'
                 shapes as the colour bucket's objects
    folder       a FLUX.2 model folder in the diffusers layout (`fluxjax.pipeline.load_model`),
                 e.g. a real FLUX.2 [klein] 9B, or a tiny random one built for tests
                 (`flux2ref.folder.build_model_folder`)

The organism side is imported only when an organism is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from experiments import tasks as tasklib

DEFAULT_MODEL = "text-routed"
REAL_SIZE = 1024  # the study's size
# Sweep cells per vmapped compiled call: all of an organism's sweep at once; for a model folder as many
# as the accelerator's memory holds (measured per program), two where the device reports no memory (CPU).
TINY_CHUNK, FOLDER_CHUNK = 8, 2


def _organisms():
    from organisms import experiment_model

    return experiment_model


def kind(model: str) -> str:
    """'organism' or 'folder' for a --model value."""
    organisms = _organisms()
    if model in organisms.NAMES or organisms.is_organism_folder(os.path.expanduser(model)):
        return "organism"
    return "folder"


def name(model: str) -> str:
    """A short name of a --model value: an organism's own name, else the folder's name."""
    if kind(model) == "organism" and model not in _organisms().NAMES:
        return json.loads((Path(os.path.expanduser(model)) / "organism.json").read_text())["name"]
    return Path(model).name


def objects(model_kind: str) -> tuple[str, ...]:
    """The colour bucket's objects a model of this kind can be asked to draw."""
    if model_kind == "organism":
        from organisms.data import SHAPES

        return SHAPES
    return tasklib.OBJECTS


def default_size(model_kind: str) -> int:
    """The generated colour bucket's reference and output size."""
    if model_kind == "organism":
        from organisms.data import SIZE

        return SIZE
    return REAL_SIZE


def default_chunk(model_kind: str):
    """Organisms: all of a sweep's cells at once. A model folder: as many cells per call as the
    accelerator's free memory holds (`experiments.sweep.AutoChunk`), FOLDER_CHUNK on a CPU."""
    from experiments.sweep import AutoChunk

    return AutoChunk(fallback=FOLDER_CHUNK) if model_kind == "folder" else TINY_CHUNK


def load(args: argparse.Namespace):
    """(model, the run config's model record) from --model, --cache, --dtype."""
    model_kind = kind(args.model)
    if model_kind == "organism":
        organisms = _organisms()
        if args.dtype not in (None, "float32"):
            raise ValueError(f"--dtype {args.dtype}: the organisms run in float32")
        path = (organisms.committed(args.model) if args.model in organisms.NAMES
                else Path(os.path.expanduser(args.model)).resolve())
        model = organisms.OrganismModel.load(path)
        record = {"name": model.describe(), "kind": model_kind, "path": str(path), "dtype": "float32",
                  "num_blocks": model.config.num_blocks, "double_blocks": model.config.depth}
        return model, record

    import jax.numpy as jnp

    from fluxjax import pipeline

    folder = os.path.abspath(os.path.expanduser(args.model))
    if not os.path.isdir(folder):
        raise ValueError(f"--model {args.model}: no such folder (a FLUX.2 model folder in the diffusers layout)")
    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    model = pipeline.load_model(folder, dtype=dtype, cache=args.cache, progress=not args.no_progress)
    record = {"name": folder, "kind": model_kind, "dtype": str(model.params.img_in.dtype),
              "num_blocks": model.config.num_blocks, "double_blocks": model.config.depth}
    return model, record
