"""The study's experiments as reproducible runs: tasks, run folders, metrics, judge, grids, reports.

    experiments.tasks    the study's tasks.jsonl and pair files; the colour bucket, generated here
    experiments.runs     run folders: config, code version, resumable cells, atomic files, progress bars
    experiments.metrics  CIELAB / CIEDE2000 colour transfer, pixel difference and SSIM, pass rates
    experiments.judge    a yes/no judge interface over labelled images, with the questions per experiment
    experiments.grids    labelled PNG grids per task
    experiments.report   block-sweep plots and the HTML report of a run

Nothing here imports torch, diffusers or jax; matplotlib is imported only when a plot is drawn.
"""
