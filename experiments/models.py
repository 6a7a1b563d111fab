"""The models the experiment commands run, as named by --model, and what each kind implies.

Three kinds:

    organism     `direct` or `text-routed` (the committed model organisms), or an organism folder
                 (`organisms.experiment_model.OrganismModel`): 32 x 32 images, the organisms'
                 shapes as the colour bucket's objects
    random-tiny  a deterministic random tiny FLUX.2 [klein] in the diffusers layout, built on
                 first use into <cache>/models/: every code path of a real folder, no behaviour
    folder       a FLUX.2 model folder in the diffusers layout (`fluxjax.pipeline.load_model`)

The organism side is imported only when an organism is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from experiments import tasks as tasklib

DEFAULT_MODEL = "text-routed"
RANDOM_TINY = "random-tiny"
RANDOM_TINY_SEED = 0
RANDOM_TINY_SIZE = 64  # the colour bucket's size for the random tiny model: 4 x 4 latent tokens
REAL_SIZE = 1024  # the study's size
# Sweep cells per vmapped compiled call: all of a tiny model's sweep at once; two for a model folder,
# as a 1024 x 1024 klein-9B cell with a knockout mask holds about 10 GB of attention logits ('xla').
TINY_CHUNK, FOLDER_CHUNK = 8, 2


def _organisms():
    from organisms import experiment_model

    return experiment_model


def kind(model: str) -> str:
    """'organism', 'random-tiny' or 'folder' for a --model value."""
    if model == RANDOM_TINY:
        return RANDOM_TINY
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
    return RANDOM_TINY_SIZE if model_kind == RANDOM_TINY else REAL_SIZE


def default_chunk(model_kind: str) -> int:
    return FOLDER_CHUNK if model_kind == "folder" else TINY_CHUNK


def random_tiny_folder(cache: str | None) -> str:
    """The random tiny model's folder, built once per cache."""
    from fluxjax.pipeline import cache_root

    folder = Path(cache if cache is not None else cache_root()) / "models" / f"tiny-klein-seed{RANDOM_TINY_SEED}"
    if not (folder / "model_index.json").is_file():
        from flux2ref.folder import build_model_folder

        try:
            build_model_folder(folder, seed=RANDOM_TINY_SEED)
        except (FileExistsError, OSError):
            if not (folder / "model_index.json").is_file():  # another process did not just build it
                raise
    return str(folder)


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

    if model_kind == RANDOM_TINY:
        folder, title = random_tiny_folder(args.cache), f"random tiny FLUX.2 [klein] (seed {RANDOM_TINY_SEED})"
    else:
        folder, title = os.path.abspath(os.path.expanduser(args.model)), None
        if not os.path.isdir(folder):
            raise ValueError(f"--model {args.model}: no such folder (a FLUX.2 model folder in the diffusers layout)")
    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    model = pipeline.load_model(folder, dtype=dtype, cache=args.cache, progress=not args.no_progress)
    record = {"name": title or folder, "kind": model_kind, "dtype": str(model.params.img_in.dtype),
              "num_blocks": model.config.num_blocks, "double_blocks": model.config.depth}
    return model, record
