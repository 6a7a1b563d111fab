"""The models the experiment commands run, as named by --model, and what each kind implies.

Two kinds:

    organism     `direct` or `text-routed` (the committed model organisms), or an organism folder
                 (`experiments.organism.OrganismModel`): 32 x 32 images, the organisms'
                 shapes as the colour bucket's objects
    folder       a FLUX.2 model folder in the diffusers layout (`fluxjax.pipeline.load_model`),
                 e.g. a real FLUX.2 [klein] 9B, or a tiny random one built for tests
                 (`flux2ref.folder.build_model_folder`)

`load_model(value)` loads either as the experiments run it, with `edit` and `prepare`
(`experiments.backend.Editing`). The organism side is imported only when an organism is asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from experiments import tasks as tasklib

DEFAULT_MODEL = "text-routed"
REAL_SIZE = 1024  # the study's size
# Sweep cells per vmapped compiled call: all of an organism's sweep at once; for a model folder as many
# as the accelerator's memory holds (measured per program), two where the device reports no memory (CPU).
TINY_CHUNK, FOLDER_CHUNK = 8, 2


def _organisms():
    from organisms import checkpoint

    return checkpoint


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


@dataclasses.dataclass(frozen=True)
class Spec:
    """A --model value inspected without loading any weights: enough to check every setting."""

    value: str  # as given on the command line
    kind: str  # 'organism' or 'folder'
    name: str
    config: Any  # the transformer's Flux2Config


def inspect(model: str, dtype: str | None = None) -> Spec:
    """Check a --model value (and --dtype) and read its transformer's architecture, loading nothing:
    an organism's organism.json, a model folder's model_index.json and transformer config (checked
    against its tensors' shapes, read from the file headers). ValueError naming the value otherwise."""
    from fluxjax.checkpoint import config_from_json

    model_kind = kind(model)
    if model_kind == "organism":
        organisms = _organisms()
        if dtype not in (None, "float32"):
            raise ValueError(f"--dtype {dtype}: the organisms run in float32")
        path = organisms.committed(model) if model in organisms.NAMES else Path(os.path.expanduser(model))
        meta_file = path / "organism.json"
        try:
            meta = json.loads(meta_file.read_text())
            config = config_from_json(dict(meta["transformer"]), str(meta_file))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--model {model}: {meta_file} is not a readable organism file ({e})") from None
        return Spec(value=model, kind=model_kind, name=str(meta.get("name", path.name)), config=config)

    from fluxjax import pipeline
    from fluxjax.conversion.convert import open_source, resolve_config

    folder = os.path.abspath(os.path.expanduser(model))
    if not os.path.isdir(folder):
        raise ValueError(f"--model {model}: not a committed organism ({', '.join(_organisms().NAMES)}), an organism "
                         "folder, or a FLUX.2 model folder in the diffusers layout (no such folder)")
    index_file = os.path.join(folder, "model_index.json")
    try:
        with open(index_file) as f:
            pipeline_class = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--model {model}: {index_file} is missing or unreadable ({e}); a FLUX.2 model folder in "
                         "the diffusers layout has model_index.json, transformer/, vae/, text_encoder/ and "
                         "tokenizer/") from None
    if pipeline_class not in pipeline.PIPELINES:
        raise ValueError(f"--model {model}: {index_file} names pipeline {pipeline_class!r}; fluxjax loads "
                         f"{', '.join(sorted(pipeline.PIPELINES))}")
    try:
        config = resolve_config(open_source(os.path.join(folder, "transformer")))
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model}: {e}") from None
    return Spec(value=model, kind=model_kind, name=Path(folder).name, config=config)


def check_size(model_kind: str, width: int, height: int, what: str) -> None:
    """Refuse an output size a model of this kind cannot draw; `what` names the task or option."""
    if model_kind == "organism":
        from organisms.data import SIZE

        if (width, height) != (SIZE, SIZE):
            raise ValueError(f"{what}: organisms draw {SIZE} x {SIZE} images, not {width} x {height}")
    else:
        from fluxjax.images import MULTIPLE_OF

        if min(width, height) < MULTIPLE_OF:
            raise ValueError(f"{what}: {width} x {height} is smaller than one {MULTIPLE_OF} px token")


def check_reference(model_kind: str, path) -> None:
    """Refuse a reference image a model of this kind cannot read: unreadable, of a mode that holds no
    picture, or (a model folder) smaller than the FLUX.2 pipelines accept. One line naming the file."""
    from fluxjax import images

    images.open_reference(path, min_side=0 if model_kind == "organism" else images.MIN_SIDE)


def load_model(model: str | os.PathLike, *, dtype: str | None = None, cache: str | None = None,
               progress: bool = True, max_text_length: int | None = None):
    """The model a --model value names, as the experiments run it (`experiments.backend.ModelBackend`,
    with `edit` and `prepare`): `direct` or `text-routed`, an organism folder, or a FLUX.2 model
    folder in the diffusers layout (converted into the cache on first use; dtype 'float32' or
    'bfloat16', default the checkpoint's; max_text_length: the text tokens prompts are padded to,
    default the pipeline's 512)."""
    model = os.fspath(model)
    if kind(model) == "organism":
        from experiments.organism import OrganismModel

        if dtype not in (None, "float32"):
            raise ValueError(f"dtype {dtype}: the organisms run in float32")
        if max_text_length is not None:
            raise ValueError(f"max_text_length {max_text_length}: an organism's text length is fixed when it is "
                             "trained")
        organisms = _organisms()
        return OrganismModel.load(organisms.committed(model) if model in organisms.NAMES
                                  else Path(os.path.expanduser(model)).resolve())

    import jax.numpy as jnp

    from experiments.backend import PipelineBackend
    from fluxjax import pipeline

    folder = os.path.abspath(os.path.expanduser(model))
    if not os.path.isdir(folder):
        raise ValueError(f"{model}: not a committed organism ({', '.join(_organisms().NAMES)}), an organism folder, "
                         "or a FLUX.2 model folder in the diffusers layout (no such folder)")
    return PipelineBackend(pipeline.load_model(folder, dtype=None if dtype is None else jnp.dtype(dtype), cache=cache,
                                               progress=progress, max_text_length=max_text_length))


def load(args: argparse.Namespace):
    """(model, the run config's model record) from --model, --cache, --dtype."""
    model_kind = kind(args.model)
    if model_kind == "organism":
        organisms = _organisms()
        if args.dtype not in (None, "float32"):
            raise ValueError(f"--dtype {args.dtype}: the organisms run in float32")
        if getattr(args, "text_length", None) is not None:
            raise ValueError(f"--text-length {args.text_length}: an organism's text length is fixed when it is "
                             "trained (organisms.train --text-length); the option is for model folders")
        path = (organisms.committed(args.model) if args.model in organisms.NAMES
                else Path(os.path.expanduser(args.model)).resolve())
        model = load_model(path)
        record = {"name": model.describe(), "kind": model_kind, "path": str(path), "dtype": "float32",
                  "num_blocks": model.config.num_blocks, "double_blocks": model.config.depth}
        return model, record

    folder = os.path.abspath(os.path.expanduser(args.model))
    if not os.path.isdir(folder):
        raise ValueError(f"--model {args.model}: no such folder (a FLUX.2 model folder in the diffusers layout)")
    text_length = getattr(args, "text_length", None)
    model = load_model(folder, dtype=args.dtype, cache=args.cache, progress=not args.no_progress,
                       max_text_length=text_length)
    record = {"name": folder, "kind": model_kind, "dtype": str(model.params.img_in.dtype),
              "num_blocks": model.config.num_blocks, "double_blocks": model.config.depth}
    if text_length is not None:  # absent: the pipelines' 512, as folders made before the option record it
        record["text_length"] = int(text_length)
    return model, record
