"""The study's experiments as reproducible runs: tasks, run folders, metrics, judge, grids, reports.

    experiments.load_model("text-routed")   a committed organism, an organism folder or a FLUX.2
                         model folder, as the experiments run it, with `prepare` and `edit`: one edit
                         with interventions and captures (experiments.backend.Editing)

    experiments.tasks    the study's tasks.jsonl and pair files (read unchanged); the colour bucket and
                         its pairs, generated here
    experiments.runs     run folders: config, code version, resumable cells, atomic files, progress bars
    experiments.judge    a yes/no judge interface over labelled images, with the questions per experiment
    experiments.grids    labelled PNG grids per task
    experiments.report   block-sweep plots and the HTML report of a run
    experiments.backend  the model interface the experiments run (FLUX.2 folders, model organisms), one edit
    experiments.organism  a model organism as such a model
    experiments.sweep    prepared edits, sampler calls and vmapped sweeps over interventions
    experiments.cli      the command line every experiment takes
    experiments.context  the model, run folder and task baselines an experiment works with
    experiments.tables   metrics rows, the study's pass rules, tables, plots and grids of a report
    experiments.study    the study's table cell for cell, and how a model's blocks map to its 32
    experiments.lens, .knockout, .drop, .patching, .run_all    the commands
    experiments.store    the activation store: captures of many tasks in a zarr group (TensorStore; no fluxjax)
    experiments.collect, .probe    the captures of a task set kept on disk; linear probes of them

The first five import no torch, diffusers or jax; matplotlib is imported only when a plot is drawn.
"""

from experiments.models import load_model

__all__ = ["load_model"]
