"""The five experiments end to end on a tiny random model folder (diffusers layout: transformer, VAE,
tiny Qwen3 text encoder, offline tokenizer): grids, metrics and reports; resume after an
interruption; vmapped block sweeps against one call per block.

Pixel tolerance: a vmapped sweep batches the sampler's matmuls over the sweep axis, and removing
the reference tokens shortens the softmax's key axis; XLA's CPU kernels then block and sum in
another order, so a few float32 values differ in the last bits, and after the VAE and the rounding
to uint8 an occasional pixel lands one level away. So "the same image" is: at most 1 of 255 apart.
"""

from __future__ import annotations

import json
from html import escape as html_escape
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from experiments import cli, drop, flow, knockout, lens, patching, run_all, runs, sweep  # noqa: E402

PIXEL_TOL = 1  # max |difference| on 0..255 between two computations of one image (module docstring)


class Killed(RuntimeError):
    """Stands for the process being killed mid-run."""
TASKS = ("solid_red_ball_s0", "solid_blue_ball_s0")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from flux2ref.folder import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-klein", seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def argv(folder, cache, out, *extra, colours="red,blue"):
    return ["--model", str(folder), "--cache", cache, "--size", "64", "--colours", colours, "--objects", "ball",
            "--seeds", "0", "--chunk", "4", "--no-progress", "--out", str(out), *extra]


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def check_report(out: Path, prefix: str, grid_names, plots=()):
    """The report exists and shows every grid and plot; the CSVs hold one row per (task, setting)."""
    html = (out / "report.html").read_text()
    for name in grid_names:
        assert (out / "grids" / prefix / f"{name}.png").is_file()
        assert f"grids/{prefix}/{name}.png" in html
    for name in plots:
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{name}.png" in html
    rates = read_csv(out / f"{prefix}-pass-rates.csv")
    assert rates and all(0.0 <= float(r["rate_absolute"]) <= 1.0 for r in rates)
    judged = [r for r in rates if r["judge"]]  # control rows have an absolute rate only
    assert judged and all(r["rate"] == "" or 0.0 <= float(r["rate"]) <= 1.0 for r in judged)
    return rates


# ---------------------------------------------------------------------------------------------
# each experiment end to end


def test_lens(folder, cache, tmp_path):
    out = tmp_path / "lens"
    assert lens.main(argv(folder, cache, out, "--blocks", "1,3", "--positions", "all", "padding", "content")) == 0
    rates = check_report(out, "lens", TASKS, ["lens-colour-distance", "lens-pass-rate"])
    assert [r["setting"] for r in rates] == ["baseline edit", "t2i_clean", "unconditional (empty prompt)", "all b1",
                                            "all b3", "padding b1", "padding b3", "content b1", "content b3"]
    rows = read_csv(out / "lens-metrics.csv")
    assert len(rows) == 2 * 9 and all(float(r["colour_de"]) >= 0 for r in rows)
    cell = out / "outputs" / "lens" / TASKS[0]
    # Content-only and all-position lenses of one block read different text streams.
    assert np.abs(image(cell / "all-b1.png") - image(cell / "content-b1.png")).max() > 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"] == {"blocks": [1, 3], "positions": ["all", "padding", "content"], "source_steps": 1,
                                  "form": "input", "target_steps": None}


def test_knockout(folder, cache, tmp_path):
    out = tmp_path / "knockout"
    assert knockout.main(argv(folder, cache, out, "--settings", "ref->text", "ref->image", "ref->text+ref->image",
                              "--layers", "all", ":2", "--sweep", "ref->image")) == 0
    rates = check_report(out, "knockout", TASKS, ["knockout-sweep-colour-distance", "knockout-sweep-change"])
    assert [r["setting"] for r in rates][2:] == ["ref->text @ all", "ref->text @ :2", "ref->image @ all",
                                                "ref->image @ :2", "ref->text+ref->image @ all",
                                                "ref->text+ref->image @ :2"]
    for task in TASKS:
        cell, base = out / "outputs" / "knockout" / task, out / "outputs" / "baselines" / task
        edit = image(base / "edit.png")
        # Cutting ref->image everywhere changes the edit.
        assert np.abs(image(cell / "ref-to-image--all.png") - edit).max() > PIXEL_TOL
        assert (cell / "ref-to-text+ref-to-image--to2.png").is_file()
        # The sweep, as the study's on a model folder: one step, against a one-step plain edit; from L = 0
        # (every block cut) it differs from that edit.
        one_step = image(cell / knockout.SWEEP_EDIT)
        assert np.abs(one_step - edit).max() > PIXEL_TOL
        assert np.abs(image(cell / "sweep--ref-to-image--from0.png") - one_step).max() > PIXEL_TOL
    swept = read_csv(out / "knockout-sweep-metrics.csv")
    assert sorted({int(r["from_block"]) for r in swept}) == list(range(5))  # the study's index: L = 0..n-1
    assert {r["sweep_steps"] for r in swept} == {"1"} and {r["sweep_index"] for r in swept} == {"study"}


def test_drop(folder, cache, tmp_path):
    out = tmp_path / "drop"
    assert drop.main(argv(folder, cache, out, "--sweep", "--check-removal", "2", "5")) == 0
    check_report(out, "drop", TASKS, ["drop-colour-distance", "drop-change"])
    checks = read_csv(out / "drop-removal-checks.csv")
    assert sorted((r["task"], int(r["block"])) for r in checks) == sorted((t, k) for t in TASKS for k in (2, 5))
    assert all(int(r["max_abs_diff"]) <= PIXEL_TOL for r in checks)  # removal form == mask form
    for task in TASKS:
        cell, base = out / "outputs" / "drop" / task, out / "outputs" / "baselines" / task
        # k = 0: the reference is never seen, a plain text-to-image run with the task's seed.
        assert np.abs(image(cell / "mask-k0.png") - image(base / "t2i.png")).max() <= PIXEL_TOL
        # k = n: the reference stays, readable through the text only; ref->image cut changes the edit.
        assert np.abs(image(cell / "mask-k5.png") - image(base / "edit.png")).max() > PIXEL_TOL


def test_patching(folder, cache, tmp_path):
    out = tmp_path / "patching"
    assert patching.main(argv(folder, cache, out, "--blocks", "0,4", "--positions", "all", "content")) == 0
    check_report(out, "patching", [f"{a}__{b}" for a, b in (TASKS, TASKS[::-1])],
                 ["patching-transfer-rate", "patching-margin"])
    # The study's rule on one seed: colours in alphabetical order, blue -> red first.
    assert (out / "tasks" / "pairs.tsv").read_text() == f"{TASKS[1]}\t{TASKS[0]}\n{TASKS[0]}\t{TASKS[1]}\n"
    cell = out / "outputs" / "patching" / f"{TASKS[0]}__{TASKS[1]}"
    target_edit = image(out / "outputs" / "baselines" / TASKS[1] / "edit.png")
    # The text stream after the last block is read by nothing; at block 0 the source's stream changes the edit.
    assert np.abs(image(cell / "all-b4.png") - target_edit).max() <= PIXEL_TOL
    assert np.abs(image(cell / "all-b0.png") - target_edit).max() > 0


def test_self_patching_from_a_pair_file_is_the_identity(folder, cache, tmp_path):
    """Patching an edit with its own step-s activations at every step s gives the edit back: checks
    that the per-step capture and substitution line up step for step."""
    from experiments import tasks as tasklib

    data = tmp_path / "data"
    tasks_file = tasklib.write_colour_bucket(data, ["red"], ["mug"], [1], size=64)
    (data / "pairs.tsv").write_text("solid_red_mug_s1\tsolid_red_mug_s1\n")
    out = tmp_path / "self"
    assert patching.main(["--model", str(folder), "--cache", cache, "--tasks", str(tasks_file), "--pairs",
                          str(data / "pairs.tsv"), "--sweep", "--no-progress", "--out", str(out)]) == 0
    cell = out / "outputs" / "patching" / "solid_red_mug_s1__solid_red_mug_s1"
    edit = image(out / "outputs" / "baselines" / "solid_red_mug_s1" / "edit.png")
    for png in sorted(cell.glob("*-b*.png")):
        assert np.abs(image(png) - edit).max() <= PIXEL_TOL, png.name


# ---------------------------------------------------------------------------------------------
# the main job


def test_run_all_writes_every_experiment_and_one_report(folder, cache, tmp_path):
    out = tmp_path / "main"
    assert run_all.main(argv(folder, cache, out)) == 0
    html = (out / "report.html").read_text()
    for title in ("The study's table, colour bucket", lens.TITLE, knockout.TITLE, drop.TITLE, patching.TITLE):
        assert html_escape(title, quote=False) in html
    for prefix, names in (("lens", TASKS), ("knockout", TASKS), ("drop", TASKS),
                          ("patching", [f"{TASKS[0]}__{TASKS[1]}", f"{TASKS[1]}__{TASKS[0]}"])):
        check_report(out, prefix, names)
    assert len(list((out / "plots").glob("*.png"))) == 10  # the flow's two heatmaps among them
    # the attention flow beside the knockouts of the same run folder
    assert html_escape(flow.TITLE, quote=False) in html and "Flow per edge beside its knockout" in html
    assert "No knockout cells" not in html
    edges = read_csv(out / "flow-edges.csv")
    assert len(edges) == len(TASKS) * 5 * len(flow.EDGES)
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["lens"]["blocks"] == [0, 1, 2, 3, 4]
    assert config["settings"]["knockout"]["layers"] == ["all", ":2", "2:"]
    assert config["settings"]["study_block"] == 3  # global block 17 of 32 at the same relative depth of 5
    assert config["settings"]["study_lens"]["form"] == "diagonal"
    # The baselines are computed once and shared by the four experiments.
    assert sorted(p.name for p in (out / "outputs" / "baselines").iterdir()) == sorted(TASKS)


def test_help_of_every_command(capsys):
    for module in (lens, knockout, flow, drop, patching, run_all):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--model" in text and "--tasks" in text and "--out" in text


def test_bad_settings_are_refused(folder, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # every key of the text queries cut: nothing left to attend to
        knockout.main(argv(folder, cache, tmp_path / "k", "--settings", "ref->text+image->text+text->text"))
    assert e.value.code == 2 and "no key to attend to" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lens.main(argv(folder, cache, tmp_path / "l", "--block", "9"))
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "k").exists() and not (tmp_path / "l").exists()


# ---------------------------------------------------------------------------------------------
# resume


def _files(root: Path) -> dict[str, bytes]:
    keep = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] in ("outputs", "grids", "plots")
            or p.suffix == ".csv"]
    return {str(p.relative_to(root)): p.read_bytes() for p in keep}


def test_an_interrupted_run_resumes_to_the_same_outputs_without_recomputing(folder, cache, tmp_path, monkeypatch):
    calls = []
    real_run, real_sweep = sweep.run, sweep.sweep
    monkeypatch.setattr(sweep, "run", lambda *a, **k: calls.append("run") or real_run(*a, **k))
    monkeypatch.setattr(sweep, "sweep", lambda *a, **k: calls.append("sweep") or real_sweep(*a, **k))
    args = ["--blocks", "1,3", "--positions", "all", "padding"]

    assert lens.main(argv(folder, cache, tmp_path / "whole", *args)) == 0
    whole_calls, calls[:] = list(calls), []

    finished, real_finish = [], runs.Cell.finish

    def finish_then_die(self, record=None):
        if len(finished) == 2:  # killed after the first task's two cells (its baselines and its lens cell)
            raise Killed
        real_finish(self, record)
        finished.append(self.key)

    monkeypatch.setattr(runs.Cell, "finish", finish_then_die)
    with pytest.raises(Killed):
        lens.main(argv(folder, cache, tmp_path / "cut", *args))
    monkeypatch.setattr(runs.Cell, "finish", real_finish)
    assert finished == [f"baselines/{TASKS[0]}", f"lens/{TASKS[0]}"]
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "outputs" / "lens" / TASKS[0]).iterdir()}
    calls[:] = []

    assert lens.main(argv(folder, cache, tmp_path / "cut", *args)) == 0
    # The rerun did the second task's work only: half the sampler calls of the whole run.
    assert sorted(calls) == sorted(whole_calls[:len(whole_calls) // 2]) and len(calls) == len(whole_calls) // 2
    assert {p: p.stat().st_mtime_ns for p in done} == done  # complete cells untouched
    assert json.loads((tmp_path / "cut" / "invocations" / "0002.json").read_text())["resumed"]
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


# ---------------------------------------------------------------------------------------------
# vmapped sweeps


def test_a_vmapped_block_sweep_equals_one_call_per_block(folder, cache):
    from fluxjax import pipeline
    from fluxjax.interventions import BLOCK0_INPUT, Capture, Interventions, knockout as make_knockout, substitution

    model = pipeline.load_model(folder, cache=cache, progress=False)
    text = pipeline.encode_prompts(model, ["draw a vase in this color"])
    ref = Image.new("RGB", (64, 64), (40, 90, 220))
    edit = sweep.prepare(model, text, references=[ref], seed=11, height=48, width=64)
    n, options = model.config.num_blocks, model.options

    # Knockout of ref->image from block k on, k = 0..n (k = n cuts nothing: the sweep's plain end).
    cells = [Interventions(knockout=make_knockout(model.config, edit.layout, edit.content_mask, "ref->image",
                                                   range(k, n), allow_empty=True)) for k in range(n + 1)]
    swept = sweep.sweep(model, edit, options, cells, chunk=4)  # chunks of 4, the last one padded
    alone = np.stack([sweep.run(model, edit, options, c)[0][0] for c in cells])
    assert swept.shape == alone.shape == (n + 1, 48, 64, 3)
    assert np.abs(swept.astype(np.int16) - alone).max() <= PIXEL_TOL
    assert np.abs(swept[0].astype(np.int16) - swept[-1]).max() > PIXEL_TOL  # the sweep does vary

    # The lens's substitution sweep: every block's captured text stream fed to block 0.
    _, caps = sweep.run(model, edit, options, capture=Capture(text=tuple(range(n))))
    target = sweep.prepare(model, pipeline.encode_prompts(model, [""]), seed=12, height=48, width=64)
    cells = [Interventions(substitutions=(substitution(BLOCK0_INPUT, caps.text[-1, k]),)) for k in range(n)]
    swept = sweep.sweep(model, target, options, cells)
    alone = np.stack([sweep.run(model, target, options, c)[0][0] for c in cells])
    assert np.abs(swept.astype(np.int16) - alone).max() <= PIXEL_TOL

    # Cells per call chosen from the device's memory: XLA's plan for one and two cells, against a budget.
    auto = sweep.AutoChunk(fallback=3)
    if sweep.device_free_bytes() is None:  # XLA:CPU
        assert sweep.fitting_chunk(model, target, options, cells, auto) == 3
    assert sweep.fitting_chunk(model, target, options, cells, auto, free_bytes=1 << 40) == len(cells)
    assert sweep.fitting_chunk(model, target, options, cells, auto, free_bytes=1) == 1
    assert np.abs(sweep.sweep(model, target, options, cells, chunk=auto).astype(np.int16) - swept).max() <= PIXEL_TOL


def test_cells_that_fit_reads_the_cost_per_cell_from_one_and_two_cells():
    program_bytes = lambda v: 100 + 50 * v  # fixed 100 bytes, 50 per cell
    assert sweep.cells_that_fit(program_bytes, free_bytes=1000, n_cells=64, headroom=0.8) == (800 - 100) // 50
    assert sweep.cells_that_fit(program_bytes, free_bytes=1000, n_cells=5, headroom=0.8) == 5
    assert sweep.cells_that_fit(program_bytes, free_bytes=10, n_cells=5, headroom=0.8) == 1
    assert sweep.device_free_bytes(jax.devices("cpu")[0]) is None  # XLA:CPU reports no memory: the fallback


def test_plain_sweep_run_equals_pipeline_generate(folder, cache):
    from fluxjax import pipeline

    model = pipeline.load_model(folder, cache=cache, progress=False)
    text = pipeline.encode_prompts(model, ["draw a hat in this color"])
    ref = Image.new("RGB", (64, 64), (230, 120, 40))
    edit = sweep.prepare(model, text, references=[ref], seed=3, height=32, width=32)
    ours = sweep.run(model, edit, model.options)[0][0]
    theirs = np.asarray(pipeline.generate(model, text=text, references=[ref], seed=3, height=32, width=32).images[0])
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# small pieces


def test_names_blocks_and_colour_pairs():
    from experiments import tasks as tasklib

    assert cli.slug("ref->text[padding]") == "ref-to-text.padding"
    assert [cli.slug(s) for s in (":3", "3:", "1:3", "0,2", "all")] == ["to3", "3to", "1to3", "0_2", "all"]
    assert cli.parse_blocks("all", 5) == [0, 1, 2, 3, 4]
    assert cli.parse_blocks("3:", 5) == [3, 4] and cli.parse_blocks("4,0", 5) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        cli.parse_blocks("7", 5)
    found = tasklib.colour_bucket(["red", "green", "blue"], ["mug", "hat"], [0])
    pairs = [(a.task_id, b.task_id) for a, b in tasklib.colour_pairs(found)]
    assert ("solid_red_mug_s0", "solid_green_mug_s0") in pairs and ("solid_blue_hat_s0", "solid_red_hat_s0") in pairs
    assert len(pairs) == 12 and all(a.split("_")[2] == b.split("_")[2] and a != b for a, b in pairs)
    with pytest.raises(ValueError, match="no colour-bucket pairs"):
        tasklib.colour_pairs(found[:1])


# ---------------------------------------------------------------------------------------------
# model organisms through the experiment commands


@pytest.mark.slow  # 156 s in the default run; run_all on one organism stays in the default run
def test_run_all_on_both_organisms_puts_them_side_by_side(tmp_path):
    """The default model of the main job: both committed organisms, one run folder each, one
    comparison report; inside the experiments an organism's own cuts come with every call."""
    out = tmp_path / "main"
    assert run_all.main(["--model", "direct,text-routed", "--colours", "red,blue", "--objects", "circle",
                         "--blocks", "1,3", "--no-progress", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "The study's table" in html and "direct/report.html" in html and "text-routed/report.html" in html
    for name in ("direct", "text-routed"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["model"]["kind"] == "organism"
        assert config["tasks"]["colour_bucket"]["size"] == 32
        check_report(out / name, "knockout", ("solid_red_circle_s0", "solid_blue_circle_s0"))
    for task in ("solid_red_circle_s0", "solid_blue_circle_s0"):
        # text-routed was trained with ref->image cut: cutting it again changes nothing
        edit = image(out / "text-routed" / "outputs" / "baselines" / task / "edit.png")
        cut = image(out / "text-routed" / "outputs" / "knockout" / task / "ref-to-image--all.png")
        assert np.abs(edit - cut).max() <= PIXEL_TOL
        # while in the direct organism the same cut changes the image
        edit = image(out / "direct" / "outputs" / "baselines" / task / "edit.png")
        cut = image(out / "direct" / "outputs" / "knockout" / task / "ref-to-image--all.png")
        assert np.abs(edit - cut).mean() > 5


def test_organism_models_refuse_what_they_cannot_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lens.main(["--model", "direct", "--objects", "ball", "--no-progress", "--out", str(tmp_path / "a")])
    assert "unknown objects ball" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lens.main(["--model", "direct", "--dtype", "bfloat16", "--no-progress", "--out", str(tmp_path / "b")])
    assert "organisms run in float32" in capsys.readouterr().err


def test_both_model_kinds_implement_the_backend_interface(folder, cache):
    from experiments.backend import ModelBackend, PipelineBackend, backend
    from fluxjax import pipeline
    from experiments.organism import OrganismModel
    from organisms.checkpoint import committed

    organism = OrganismModel.load(committed("direct"))
    assert isinstance(organism, ModelBackend) and backend(organism) is organism
    wrapped = backend(pipeline.load_model(folder, cache=cache, progress=False))
    assert isinstance(wrapped, PipelineBackend) and isinstance(wrapped, ModelBackend)
    with pytest.raises(TypeError, match="not an experiment model"):
        backend(object())
