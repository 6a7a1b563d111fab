# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Three interventions on a FLUX.2 model folder
#
# The study ("Vision-Language Binding in In-Context Image Generation", Ge et al. 2026) asks how
# FLUX.2 [klein] moves a reference image's content into its edit; its answer is that the text
# tokens, mostly the *padding* positions, absorb the reference's colour and style and the image
# reads them from there. This notebook walks one edit through the three interventions of its demo,
# on any FLUX.2 model folder in the diffusers layout:
#
# 1. **T2I Lens**: the edit's text stream, kept at one block, replaces the text stream of a
#    text-to-image run from an empty prompt with no reference; what the reference put there shows.
# 2. **Attention knockout**: cut `ref->text` (the text may not read the reference) or `ref->image`
#    in every block, and see what the edit loses.
# 3. **I2I -> I2I patching**: two edits with the same instruction and different references; the
#    source's text stream replaces the target's, and the target takes what it carries.
#
# **Your own edit.** The cell below holds the whole configuration: the model folder, the
# reference image (by default a flat red swatch written here), the instruction, the seed and the
# size. Change them and run the notebook again. Open this file as a notebook with
# `jupytext --to notebook docs/demo.py`. On FLUX.2 [klein] 9B (1024 x 1024) it wants a GPU; the
# tests run it on a tiny random model folder (`flux2ref.folder.build_model_folder`), whose
# pictures are noise: it shows that the code runs, not what the study found.
#
# The commands of `experiments/` run the same interventions over whole task files, with run
# folders, tables, intervals and reports (`docs/experiments.md`); this notebook calls the library
# directly, one edit at a time.

# %%
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from experiments import grids, sweep
from fluxjax import metrics, pipeline
from fluxjax.interventions import Capture, Interventions, knockout, per_step, substitution
from fluxjax.sites import site

MODEL = os.environ.get("FLUXJAX_DEMO_MODEL", "/models/FLUX.2-klein-9B")  # a model folder, diffusers layout
SIZE = int(os.environ.get("FLUXJAX_DEMO_SIZE", "1024"))  # output and reference side, pixels
REFERENCE = None  # a path to your reference image; None: a flat red swatch (the study's colour bucket)
SECOND_REFERENCE = None  # the patching source's reference; None: a flat blue swatch
INSTRUCTION = "draw a ball in this color"
SEED = 1234

# %%
model = pipeline.load_model(MODEL)
config, options = model.config, model.options
print(f"{model.name}: {config.depth} double + {config.depth_single_blocks} single blocks, "
      f"{options.num_steps} steps, {model.params.img_in.dtype}")

folder = Path(tempfile.mkdtemp(prefix="fluxjax-demo-"))


def swatch(name: str) -> Path:
    """A flat reference of one of the study's colours, written to the demo's folder."""
    path = folder / f"{name}.png"
    Image.new("RGB", (SIZE, SIZE), metrics.STUDY_COLOURS[name]).save(path)
    return path


reference = Path(REFERENCE) if REFERENCE else swatch("red")
second = Path(SECOND_REFERENCE) if SECOND_REFERENCE else swatch("blue")
colour = metrics.reference_colour(Image.open(reference).convert("RGB"))


def text(prompt: str):
    return pipeline.encode_prompts(model, [prompt])


def caption(image) -> str:
    """How far the image's dominant colour is from the reference's (CIEDE2000; <= 15: it shows it)."""
    return f"dE {metrics.colour_error(image, colour):.1f}"


def show(title: str, rows, labels=None) -> Image.Image:
    return grids.grid(rows, title=title, cell=192, row_labels=labels)


# %% [markdown]
# ## The edit, and the edit with the other reference
#
# The baseline edit is the instruction with the reference; the second edit has the same
# instruction and seed with the second reference (the patching's source, below). Both keep their
# text stream at `BLOCK` at every step. The study's block numbers are global, double blocks first:
# on klein-9B, double block 7 (the last) is where it reads its style and identity cells, global
# block 17 its colour cells. Here the lens and the patching use this model's last double block.

# %%
BLOCK = config.depth - 1  # the last double block: the study's double block 7 on klein-9B
AT = site(BLOCK, "text", "output")  # its text stream's output: "b<BLOCK>.text.output"
edit = sweep.prepare(model, text(INSTRUCTION), references=[reference], seed=SEED, height=SIZE, width=SIZE)
source = sweep.prepare(model, text(INSTRUCTION), references=[second], seed=SEED, height=SIZE, width=SIZE)
plain = sweep.run(model, edit, options, capture=Capture(sites=(AT,)))[0][0]  # the source's program, compiled once
source_edit, source_captures = sweep.run(model, source, options, capture=Capture(sites=(AT,)))
source_edit = source_edit[0]


def picture(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


show("The two edits", [[grids.Panel("reference", picture(reference)), grids.Panel("edit", plain, caption(plain))],
                       [grids.Panel("second reference", picture(second)),
                        grids.Panel("edit", source_edit, caption(source_edit))]])

# %% [markdown]
# ## 1. T2I Lens
#
# The edit runs one step, as the study's source run, and its text stream at the output of `BLOCK`
# is kept. The lens is a text-to-image run from the empty prompt `""` with no reference and seed
# + 1, whose text stream fed to block 0 is replaced by the kept one at every step: at all text
# positions, only the padding positions, or only the instruction's own (content) positions.

# %%
one_step = dataclasses.replace(options, num_steps=1)
_, captures = sweep.run(model, edit, one_step, capture=Capture(sites=(AT,)))
kept = captures[AT][-1]  # [1, T, D]: the last (only) step
target = sweep.prepare(model, text(""), seed=SEED + 1, height=SIZE, width=SIZE)
positions = ("all", "padding", "content")
lens = sweep.sweep(model, target, options, [
    Interventions(substitutions=(substitution("embed.text.output", kept, edit.text_mask(p)),)) for p in positions])
show(f"T2I Lens: block {BLOCK} fed to block 0", [[grids.Panel(f"{p} positions", image, caption(image))
                                                  for p, image in zip(positions, lens)]])

# %% [markdown]
# ## 2. Attention knockout
#
# `A->B`: the queries of B may not read the keys of A, in every block and at every step. The
# study: cutting `ref->text` loses the reference's colour and style, cutting `ref->image` (the
# image reading the reference directly) keeps them; the padding positions carry most of it.

# %%
cuts = ("ref->text", "ref->image", "ref->text[padding]", "ref->text[content]")
knocked = sweep.sweep(model, edit, options, [
    Interventions(knockout=knockout(config, edit.layout, edit.content_mask, cut)) for cut in cuts])
show("Attention knockout, every block", [[grids.Panel(cut, image, caption(image))
                                          for cut, image in zip(cuts, knocked)]])

# %% [markdown]
# ## 3. I2I -> I2I patching
#
# The source is the second edit: same instruction, the second reference. Its text stream at
# `BLOCK` replaces the target's (the first edit) at every step, step by step. If the text carries
# the reference, the target takes the source's colour (the captions: distance to the first
# reference's colour, so a transfer raises it).

# %%
values = per_step(source_captures[AT])  # [steps, 1, T, D]
patched = sweep.sweep(model, edit, options, [
    Interventions(substitutions=(substitution(AT, values, edit.text_mask(p)),)) for p in positions])
show(f"I2I -> I2I patching at block {BLOCK}: the second edit's text stream into the first",
     [[grids.Panel(f"{p} positions", image, caption(image)) for p, image in zip(positions, patched)]])

# %% [markdown]
# The same interventions over the study's task files, with its pass rules, 95 % intervals and a
# report: `python -m experiments.run_all --study --model MODEL` (the whole colour bucket; `--plan`
# counts the tasks first). A judge scores the run folder as the study did:
# `python -m experiments.judge RUN --judge ...` (docs/judging.md).
