# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # A tour of the study's five experiments, on the model organisms
#
# The study ("Vision-Language Binding in In-Context Image Generation", Ge et al. 2026) asks how
# FLUX.2 moves a reference image's content into its edit. Its answer: the text tokens, mostly the
# *padding* positions, absorb the reference's colour and style, and the image reads them from
# there. This tour runs its five experiments on two small FLUX.2 editors committed in this
# repository whose routing is known by construction (docs/organisms.md):
#
# - `direct` was trained plainly: it reads the reference straight into the image;
# - `text-routed` was trained with the reference cut from the image and from the text content
#   positions: the colour can reach the image only through the text padding positions.
#
# Each experiment is a command (`python -m experiments.<name>`); here we call their `main` with a
# few tasks (a red and a blue swatch, drawn as a circle) and look at the grids they write. Open
# this file as a notebook with `jupytext --to notebook docs/tour.py`.

# %%
import csv
import tempfile
from pathlib import Path

from PIL import Image

from experiments import drop, knockout, lens, patching

RUNS = Path(tempfile.mkdtemp(prefix="fluxjax-tour-"))
TASKS = ["--colours", "red,blue", "--objects", "circle", "--seeds", "0", "--no-progress"]


def rates(run: Path, prefix: str) -> dict:
    """The run's pass rates per setting: the study's relative rule, and the absolute one."""
    with open(run / f"{prefix}-pass-rates.csv", newline="") as f:
        return {r["setting"]: (r["rate"], r["rate_absolute"]) for r in csv.DictReader(f)}


def grid(run: Path, prefix: str, name: str) -> Image.Image:
    return Image.open(run / "grids" / prefix / f"{name}.png")


# %% [markdown]
# ## 1-2. The T2I Lens: what does the edit's text stream carry?
#
# The edit runs one step; its text stream at the output of block k is kept. A text-to-image run
# from the empty prompt, with no reference, then gets that stream in place of its own: fed to
# block 0 (`--form input`, the study's style cells) or at the output of the same block k
# (`--form diagonal`, the study's colour cell). At all text positions, only the padding, or only
# the instruction's own (content) positions. A pass: the reference colour appears, and it is
# absent from `t2i_clean` (the instruction without the reference).

# %%
lens_runs = {}
for form in lens.FORMS:
    lens_runs[form] = RUNS / f"lens-{form}"
    lens.main(["--model", "text-routed", "--form", form, "--target-steps", "8", "--blocks", "2,5",
               *TASKS, "--out", str(lens_runs[form])])
    print(form, {k: v for k, v in rates(lens_runs[form], "lens").items() if " b" in k})

# %% [markdown]
# In both forms the padding positions at block 2 carry the colour and the content positions do
# not, as `text-routed` was built. At the last block (5) the diagonal form carries nothing: no
# block reads the text stream after the last one.

# %%
grid(lens_runs["diagonal"], "lens", "solid_red_circle_s0")

# %% [markdown]
# ## 3. Attention knockout: which edge carries the reference?
#
# "A->B" cuts attention from the keys of A to the queries of B, in every block and step. The
# study's rule: a knockout *loses* the colour when the baseline edit shows it and the knocked-out
# edit does not; cutting `ref->image` should *keep* it in a model that routes through the text.

# %%
ko_runs = {}
for name in ("direct", "text-routed"):
    ko_runs[name] = RUNS / f"knockout-{name}"
    knockout.main(["--model", name, "--settings", "ref->text", "ref->image", "ref->text[padding]",
                   "ref->text[content]", *TASKS, "--out", str(ko_runs[name])])
    print(name, {k: v for k, v in rates(ko_runs[name], "knockout").items() if "@" in k})

# %%
grid(ko_runs["text-routed"], "knockout", "solid_red_circle_s0")

# %% [markdown]
# ## 4. Dropping the reference after block k
#
# Before block k the reference may reach the image only through the text; from block k on it is
# gone. If the colour survives, the text tokens already hold it by block k.

# %%
drop_run = RUNS / "drop"
drop.main(["--model", "text-routed", "--sweep", "--check-removal", *TASKS, "--out", str(drop_run)])
grid(drop_run, "drop", "solid_red_circle_s0")

# %% [markdown]
# ## 5. I2I -> I2I patching: does the colour follow the text stream?
#
# Two edits with one instruction and different references. The target's text stream at block k is
# replaced, at every step, by the source's. A pass: the output's colour is closer to the source's
# than to the target's.

# %%
patch_run = RUNS / "patching"
patching.main(["--model", "text-routed", "--blocks", "2", *TASKS, "--out", str(patch_run)])
print(rates(patch_run, "patching"))
grid(patch_run, "patching", "solid_blue_circle_s0__solid_red_circle_s0")

# %% [markdown]
# ## The study's table
#
# `python -m experiments.run_all --study` runs exactly the study's cells of a bucket on any model
# and tasks, and its report puts each beside the study's number, with n and the rule used. On
# the organisms (6 blocks) the report says which block stands for the study's blocks 7 and 17.
