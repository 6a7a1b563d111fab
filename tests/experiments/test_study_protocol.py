"""The study's protocol: both T2I Lens forms on the text-routed organism against its known routing,
and the study's pass rules, relative to their controls, on constructed cases where they and the
absolute rules disagree."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from experiments import lens, tables
from fluxjax import metrics

T = tables.THRESHOLD
TASKS = ("solid_red_circle_s0", "solid_blue_circle_s0")


def _rates(out):
    with open(out / "lens-pass-rates.csv", newline="") as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def lens_runs(tmp_path_factory):
    """Both forms at block 2 (its text padding holds the colour) and the last block, 5, on text-routed."""
    out = {}
    for form in lens.FORMS:
        out[form] = tmp_path_factory.mktemp("lens") / form
        # The diagonal target runs the organism's own step count: one Euler step of its linear
        # schedule draws no shape or colour, with or without a lens.
        assert lens.main(["--model", "text-routed", "--form", form, "--target-steps", "8", "--blocks", "2,5",
                          "--colours", "red,blue", "--objects", "circle", "--seeds", "0", "--no-progress",
                          "--out", str(out[form])]) == 0
    return out


@pytest.mark.parametrize("form", lens.FORMS)
def test_both_lens_forms_carry_the_colour_through_the_padding_and_not_the_content(lens_runs, form):
    rates = _rates(lens_runs[form])
    assert float(rates["t2i_clean"]["rate_absolute"]) == 0.0  # the control never shows the colour
    assert float(rates["padding b2"]["rate"]) == 1.0 and float(rates["all b2"]["rate"]) == 1.0
    assert float(rates["content b2"]["rate"]) == 0.0


def test_the_diagonal_lens_at_the_last_block_carries_nothing(lens_runs):
    """The text stream after the last block is read by nothing: the output is the empty prompt's."""
    rates = _rates(lens_runs["diagonal"])
    assert all(float(rates[f"{pos} b5"]["rate_absolute"]) == 0.0 for pos in ("all", "padding", "content"))
    assert float(_rates(lens_runs["input"])["padding b5"]["rate"]) == 1.0  # while fed to block 0 it carries


def test_lens_rows_carry_the_judge_contract(lens_runs):
    out = lens_runs["diagonal"]
    record = json.loads((out / "outputs" / "lens" / TASKS[0] / "DONE.json").read_text())["record"]
    judged = [r for r in record["rows"] if r["judge"] is not None]
    assert judged and all(r["experiment"] == "lens" and r["property"] == "colour" and r["judge"] == "present"
                          for r in judged)
    for r in judged:
        assert [label for label, _ in r["bundle"]] == ["reference", "t2i_clean", "output"]
        assert all((out / path).is_file() for _, path in r["bundle"])
        # The target runs the organism's own 8 steps, so t2i_clean is the baseline's seed + 1 run.
        assert r["bundle"][1][1] == f"outputs/baselines/{TASKS[0]}/t2i-next-seed.png"
        # The verdict is a function of the bundle's images alone.
        ref, clean, output = (np.asarray(Image.open(out / p).convert("RGB")) for _, p in r["bundle"])
        lab = metrics.reference_colour(ref)
        assert tables.verdict("present", metrics.colour_error(output, lab), metrics.colour_error(clean, lab)) == \
            (r["pass"], r["pass_absolute"], r["baseline_misses"])


# ---------------------------------------------------------------------------------------------
# the relative rules where they and the absolute ones disagree


def test_a_chance_match_in_t2i_clean_fails_the_lens_but_passes_absolutely():
    assert tables.verdict("present", de=3.0, control_de=5.0) == (False, True, None)
    assert tables.verdict("present", de=3.0, control_de=T + 1) == (True, True, None)


def test_a_baseline_edit_that_misses_the_colour_fails_by_the_studys_rule_and_leaves_the_strict_one():
    # the study judged every row: nothing was there to lose or keep, so the row fails (and is counted)
    assert tables.verdict("lost", de=40.0, control_de=T + 10) == (False, True, True)  # absolutely "lost"
    assert tables.verdict("kept", de=2.0, control_de=T + 10) == (False, True, True)
    assert tables.verdict("lost", de=40.0, control_de=2.0) == (True, True, False)
    rows = [{"setting": "ref->text @ all", "judge": "lost", "task": "a", "pass": False, "pass_absolute": True,
             "baseline_misses": True},
            {"setting": "ref->text @ all", "judge": "lost", "task": "b", "pass": False, "pass_absolute": False,
             "baseline_misses": False},
            {"setting": "ref->text @ all", "judge": "lost", "task": "c", "pass": True, "pass_absolute": True,
             "baseline_misses": False}]
    (rate,) = tables.pass_rates(rows)
    assert (rate["n"], rate["passed"], rate["rate"]) == (3, 1, 1 / 3)  # every row
    assert (rate["excluded"], rate["n_strict"], rate["rate_strict"]) == (1, 2, 0.5)  # the stricter rule
    assert rate["rate_absolute"] == 2 / 3
    # rows written before every row had the study's verdict (pass None where the baseline misses) read the same
    old = [{k: v for k, v in r.items() if k != "baseline_misses"} for r in rows]
    old[0]["pass"] = None
    (again,) = tables.pass_rates(old)
    keys = ("n", "passed", "excluded", "n_strict", "rate_strict")
    assert {k: again[k] for k in keys} == {k: rate[k] for k in keys}


def test_the_colour_rule_is_for_colour_rows_only():
    """A style (identity, reference) row has no automatic verdict, whatever its colours: not a pass,
    not a fail, and never left out by the stricter rule."""
    red, green = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    red[8:24, 8:24], green[8:24, 8:24] = (220, 40, 40), (50, 170, 80)
    lab = metrics.reference_colour(red)
    far = metrics.colour_error(green, lab)  # the baseline edit's colour: far from the reference's
    assert far > T
    bundle = [("reference", "r.png"), ("baseline edit", "e.png"), ("output", "o.png")]
    for prop in ("style", "identity", "reference"):
        row = tables.judged_row("knockout", prop, "lost", bundle, green, lab, far, green, task="t", setting="s")
        assert (row["pass"], row["pass_absolute"], row["baseline_misses"]) == (None, None, None)
        control = tables.control_row("knockout", prop, green, lab, green, task="t", setting="no knockout (edit)")
        assert control["pass_absolute"] is None
    row = tables.judged_row("knockout", "colour", "lost", bundle, green, lab, far, green, task="t", setting="s")
    assert (row["pass"], row["pass_absolute"], row["baseline_misses"]) == (False, True, True)


def test_a_neutral_patching_output_is_judged_by_which_colour_is_closer():
    # Far from both references (no colour absolutely present), but closer to the source's: transferred.
    assert tables.verdict("transferred", de=30.0, control_de=45.0) == (True, False, None)
    # Within the threshold of the source's colour yet closer to the target's: not transferred.
    assert tables.verdict("transferred", de=10.0, control_de=8.0) == (False, True, None)


# ---------------------------------------------------------------------------------------------
# knockout layer modes, additive patching, one compiled call per sweep chunk

PIXEL_TOL = 1  # as tests/experiments/test_experiments.py: a vmapped cell may land one uint8 level away


def _image(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_knockout_layer_modes_are_one_vmapped_call_per_task(tmp_path, monkeypatch):
    from experiments import knockout, sweep

    calls = []
    real = sweep._sample_many
    monkeypatch.setattr(sweep, "_sample_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for mode in ("prefix", "individual", "window"):
        out[mode] = tmp_path / mode
        calls.clear()
        assert knockout.main(["--model", "direct", "--settings", "ref->image", "--layers", "all", "--sweep",
                              "ref->image", "--sweep-mode", mode, "--sweep-index", "project", "--window", "2",
                              "--colours", "red",
                              "--objects", "circle", "--seeds", "0", "--chunk", "0", "--no-progress",
                              "--out", str(out[mode])]) == 0
        assert len(calls) == 1  # the layer modes and the whole sweep: one compiled call
    cell = out["prefix"] / "outputs" / "knockout" / TASKS[0]
    edit = _image(out["prefix"] / "outputs" / "baselines" / TASKS[0] / "edit.png")
    # Cutting blocks 0..k-1: k = 0 cuts nothing, k = 6 cuts every block.
    assert np.abs(_image(cell / "sweep--ref-to-image--to0.png") - edit).max() <= PIXEL_TOL
    assert np.abs(_image(cell / "sweep--ref-to-image--to6.png") - _image(cell / "ref-to-image--all.png")).max() \
        <= PIXEL_TOL
    assert np.abs(_image(cell / "sweep--ref-to-image--to6.png") - edit).mean() > 5  # direct reads ref->image
    assert sorted(p.name for p in (out["individual"] / "outputs" / "knockout" / TASKS[0]).glob("sweep-*")) == \
        sorted(f"sweep--ref-to-image--at{k}.png" for k in range(6))
    assert sorted(p.name for p in (out["window"] / "outputs" / "knockout" / TASKS[0]).glob("sweep-*")) == \
        sorted(f"sweep--ref-to-image--win{k}.png" for k in range(5))


@pytest.mark.slow  # 39 s in the default run
def test_additive_patching_equals_replacement_in_one_step_and_adds_nothing_to_itself(tmp_path):
    from experiments import patching

    def run(name, *extra):
        assert patching.main(["--model", "text-routed", "--blocks", "2", "--positions", "padding", "--colours",
                              "red,blue", "--objects", "circle", "--seeds", "0", "--no-progress", "--out",
                              str(tmp_path / name), *extra]) == 0
        return tmp_path / name / "outputs" / "patching" / "solid_blue_circle_s0__solid_red_circle_s0"

    # One step: the current activations are the unpatched target's, so adding (source - target) is the source.
    replaced, added = run("replace", "--steps", "1"), run("add", "--steps", "1", "--mode", "add")
    assert np.abs(_image(replaced / "padding-b2.png") - _image(added / "padding-b2.png")).max() <= PIXEL_TOL
    # Over the organism's steps the two differ, and additive patching moves the target towards the source.
    replaced, added = run("replace8"), run("add8", "--mode", "add")
    assert np.abs(_image(replaced / "padding-b2.png") - _image(added / "padding-b2.png")).max() > PIXEL_TOL
    with open(tmp_path / "add8" / "patching-pass-rates.csv", newline="") as f:
        assert float({r["setting"]: r for r in csv.DictReader(f)}["padding b2"]["rate"]) == 1.0


def test_run_all_study_runs_exactly_a_buckets_cells(tmp_path):
    """--study --bucket add on its task file: only the lens, in the input form at the study's block 7's
    place (the last double block), its rows about the generic reference property, which the colour
    rule does not judge (a judge does): no automatic verdict, every rate with its interval."""
    from experiments import run_all, study, tasks

    task_file = tasks.write_colour_bucket(tmp_path / "tasks", ["red"], ["circle"], [0], size=32,
                                          known_objects=["circle"])  # any task file of the organism's size
    out = tmp_path / "add"
    assert run_all.main(["--study", "--bucket", "add", "--model", "text-routed", "--tasks", str(task_file),
                         "--no-progress", "--out", str(out)]) == 0
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert set(settings) == {"study", "property", "lens"} and settings["lens"]["form"] == "input"
    assert settings["lens"]["blocks"] == [1]  # the organism's last double block stands for the study's 7
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["baselines", "lens"]
    record = json.loads((out / "outputs" / "lens" / TASKS[0] / "DONE.json").read_text())["record"]
    assert {r["property"] for r in record["rows"]} == {"reference"}
    assert all(r["pass"] is None and r["pass_absolute"] is None for r in record["rows"])
    with open(out / "lens-pass-rates.csv", newline="") as f:
        rates = list(csv.DictReader(f))
    assert {"rate", "rate_low", "rate_high", "rate_absolute_low", "vs_control_high"} <= set(rates[0])
    html = (out / "report.html").read_text()
    assert "76.8 %" in html and "block 1 here" in html and "95% CI" in html
    assert [c[0] for c in study.cells(settings)] == ["lens all", "lens padding", "lens content"]
