"""One edit on any model the experiments run (`experiments.load_model(...).edit`): the same
interventions give the same images as the experiments' own runs, on both committed organisms and on
a tiny random model folder.

The experiment here is `experiments.knockout` on one colour task: its run folder holds the baseline
edit (one sampler call) and the knockout's image (a vmapped sweep call). The one-call edit is
compared with both: the plain edit bit for bit; the knockout to within 1 of 255, the rounding a
vmapped call may differ by from a single one (docs/experiments.md, tests/experiments/test_experiments.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fluxjax
from experiments import knockout, load_model
from experiments.backend import EditResult
from experiments.tasks import read_tasks

VMAP_ROUNDING = 1  # of 255: a vmapped sweep cell against the same cell alone (see the module docstring)
SETTING = "ref->text[padding]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from flux2ref.folder import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("model") / "tiny-klein")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def experiment_run(model: str, out: Path, *extra: str) -> tuple[Path, object]:
    """The knockout experiment on one red task, SETTING in every block: (its run folder, the task)."""
    assert knockout.main(["--model", model, "--colours", "red", "--seeds", "0", "--settings", SETTING,
                          "--layers", "all", "--out", str(out), "--no-progress", *extra]) == 0
    [task] = read_tasks(out / "tasks" / "tasks.jsonl")
    return out, task


def image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def same_as_the_experiment(model, run: Path, task, height: int, width: int):
    edit = model.prepare(task.instruction, task.reference, seed=task.seed, height=height, width=width)
    plain = model.edit(edit)
    assert isinstance(plain, EditResult) and plain.images.shape == (1, height, width, 3)
    np.testing.assert_array_equal(plain.images[0], image(run / "outputs" / "baselines" / task.task_id / "edit.png"))
    # The one call with a prompt gives the same edit as the prepared one.
    np.testing.assert_array_equal(model.edit(task.instruction, task.reference, seed=task.seed, height=height,
                                             width=width).images, plain.images)

    cut = fluxjax.knockout(model.config, edit.layout, edit.content_mask, SETTING)
    knocked = model.edit(edit, interventions=fluxjax.Interventions(knockout=cut),
                         capture=fluxjax.Capture(text=(0, model.config.num_blocks - 1)))
    want = image(run / "outputs" / "knockout" / task.task_id / "ref-to-text.padding--all.png")
    assert np.abs(knocked.images[0].astype(int) - want.astype(int)).max() <= VMAP_ROUNDING
    steps = model.options.num_steps
    assert knocked.captures.text.shape == (steps, 2, 1, edit.layout.n_txt, model.config.hidden_size)
    assert knocked.layout == edit.layout and knocked.content_mask.shape == (1, edit.layout.n_txt)
    return plain, knocked


@pytest.mark.parametrize("name", ["direct", "text-routed"])
def test_the_edit_call_gives_the_experiments_images_on_an_organism(name, tmp_path):
    run, task = experiment_run(name, tmp_path / "run", "--objects", "circle")
    model = load_model(name)
    plain, knocked = same_as_the_experiment(model, run, task, 32, 32)
    if name == "text-routed":  # the padding route is its only one: cutting it loses the colour
        from fluxjax import metrics

        red = metrics.reference_colour(image(task.reference))
        assert metrics.colour_error(plain.images[0], red) <= metrics.COLOUR_MATCH_DE00 < \
            metrics.colour_error(knocked.images[0], red)
        assert model.trained_cuts == ("ref->image", "ref->text[content]")


def test_the_edit_call_gives_the_experiments_images_on_a_model_folder(folder, cache, tmp_path):
    run, task = experiment_run(folder, tmp_path / "run", "--objects", "ball", "--size", "64", "--cache", cache)
    model = load_model(folder, cache=cache, progress=False)
    same_as_the_experiment(model, run, task, 64, 64)
    assert model.trained_cuts == ()


def test_the_edit_call_refuses_what_it_cannot_use():
    model = load_model("direct")
    edit = model.prepare("draw a circle in this color", Image.new("RGB", (32, 32), (220, 40, 40)))
    with pytest.raises(ValueError, match="already holds its references"):
        model.edit(edit, seed=3)
    with pytest.raises(TypeError, match="one string"):
        model.prepare(["two", "prompts"])
    with pytest.raises(ValueError, match="organisms draw 32 x 32"):
        model.prepare("draw a circle", height=64, width=64)
    with pytest.raises(ValueError, match="not a committed organism"):
        load_model("no-such-model")
