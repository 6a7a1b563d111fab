"""An organism on disk: a folder that holds everything needed to run it.

    <folder>/organism.json   format, name, routing cuts (part of the model), transformer and
                             encoder configs, vocabulary, codec patch, sampler steps
    <folder>/transformer/    a native fluxjax checkpoint (`fluxjax.save_transformer`)
    <folder>/text_encoder/   the encoder's params (Orbax pytree, `fluxjax.checkpoint.write_tree`)

`load_organism` refuses a folder whose vocabulary or codec differ from this code's, so a checkpoint
is never run with a tokenizer it was not trained with. The committed organisms are the folders
`organisms/checkpoints/<name>` (`committed(name)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np

import fluxjax
from fluxjax.checkpoint import check_destination, config_to_json, expected_leaves, read_json, read_tree, write_tree
from fluxjax.files import atomic_directory
from fluxjax.trees import named_leaves
from organisms import codec
from organisms.model import ORGANISMS, Organism, OrganismParams
from organisms.text import VOCAB, TextEncoderConfig, encoder_shapes

FORMAT = "fluxjax-organism"
FORMAT_VERSION = 1
META_FILE = "organism.json"
COMMITTED = Path(__file__).parent / "checkpoints"  # the committed organisms, one folder each
NAMES = tuple(ORGANISMS)


def committed(name: str) -> Path:
    """The folder of a committed organism."""
    if name not in NAMES:
        raise ValueError(f"unknown organism {name!r}; the committed ones are {', '.join(NAMES)}")
    return COMMITTED / name


def is_organism_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def save_organism(path: str | os.PathLike, organism: Organism, params: OrganismParams, *,
                  overwrite: bool = False) -> Path:
    """Write the organism folder (float32) atomically: a temporary sibling renamed into place."""
    path = Path(path).absolute()
    check_destination(path, overwrite, META_FILE, "organism folder")
    host = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    with atomic_directory(path, replace=overwrite) as tmp:
        fluxjax.save_transformer(tmp / "transformer", organism.transformer, host.transformer)
        write_tree(tmp / "text_encoder", named_leaves(host.encoder), expected_leaves(encoder_shapes(organism.encoder)))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": organism.name,
                "cuts": list(organism.cuts), "cut_blocks": "all",
                "transformer": config_to_json(organism.transformer),
                "encoder": dataclasses.asdict(organism.encoder), "vocab": list(VOCAB),
                "patch": codec.PATCH, "sampler_steps": organism.sampler_steps}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return path


def load_organism(path: str | os.PathLike) -> tuple[Organism, OrganismParams]:
    path = Path(path).absolute()  # Orbax needs absolute paths
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: missing; {path} is not an organism folder "
                                f"(train one with `python -m organisms.train`)")
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} file")
    missing = [k for k in ("name", "cuts", "encoder", "vocab", "patch", "sampler_steps") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: key {missing[0]!r} missing; the organism folder is damaged")
    if meta["vocab"] != list(VOCAB):
        raise ValueError(f"{meta_file}: the organism was trained with another vocabulary than organisms.text.VOCAB")
    if meta["patch"] != codec.PATCH:
        raise ValueError(f"{meta_file}: the organism was trained with {meta['patch']}-pixel patches, the codec "
                         f"uses {codec.PATCH}")
    if meta.get("cut_blocks") != "all":
        raise ValueError(f"{meta_file}: cuts in blocks {meta.get('cut_blocks')!r}; only 'all' is defined")
    config, transformer = fluxjax.load_transformer(path / "transformer")
    try:
        organism = Organism(name=meta["name"], transformer=config, encoder=TextEncoderConfig(**meta["encoder"]),
                            cuts=tuple(meta["cuts"]), sampler_steps=int(meta["sampler_steps"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_file}: {e}") from None
    encoder = read_tree(path / "text_encoder", encoder_shapes(organism.encoder), what="encoder in organism.json")
    return organism, OrganismParams(transformer=transformer, encoder=encoder)
