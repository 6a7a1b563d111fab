"""Metrics rows, their tables, and the pieces of a run's report built from them: pass-rate and mean
tables, block-sweep plots, per-task grids.

Each experiment records one row of metrics per (task, setting): `colour_de` (CIEDE2000 between the
output's dominant colour and a reference colour), `pass` (the experiment's criterion), `mad` and
`ssim` against the task's baseline edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import grids, report, runs
from fluxjax import metrics

THRESHOLD = metrics.COLOUR_MATCH_DE00

# metrics rows


def change(image: np.ndarray, baseline: np.ndarray) -> dict:
    """Change against a baseline image: mean absolute pixel difference (0-255) and SSIM."""
    return {"mad": metrics.mean_abs_diff(image, baseline), "ssim": metrics.ssim(image, baseline)}


def colour_row(image: np.ndarray, colour_lab: Sequence[float], baseline: np.ndarray, **fields) -> dict:
    """A metrics row: `colour_de` to `colour_lab`, `colour_match` (<= THRESHOLD), and change vs `baseline`."""
    de = metrics.colour_error(image, colour_lab)
    return {**fields, "colour_de": de, "colour_match": bool(de <= THRESHOLD), **change(image, baseline)}


def setting_means(rows: Sequence[Mapping], columns: Sequence[str], key: str = "setting") -> list[dict]:
    """Per-setting means of numeric columns (bools as rates), settings in first-seen order."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    out = []
    for name, rs in groups.items():
        row = {key: name, "n": len(rs)}
        for c in columns:
            vals = [float(r[c]) for r in rs if r.get(c) is not None]
            row[c] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def series_by_block(rows: Sequence[Mapping], blocks: Sequence[int], series_key: str, block_key: str,
                    value: str) -> dict[str, list[float | None]]:
    """{series: [mean of `value` at each block]} for a sweep plot."""
    out: dict[str, list[float | None]] = {}
    for name in dict.fromkeys(str(r[series_key]) for r in rows):
        means = []
        for b in blocks:
            vals = [float(r[value]) for r in rows if str(r[series_key]) == name and r[block_key] == b]
            means.append(float(np.mean(vals)) if vals else None)
        out[name] = means
    return out


# ---------------------------------------------------------------------------------------------
# derived files and report sections


def cell_size(image: np.ndarray) -> int:
    return 192 if max(image.shape[:2]) <= 128 else 256


def write_grid(run: runs.RunFolder, name: str, title: str, rows: Sequence[Sequence[grids.Panel]],
               row_labels: Sequence[str] | None = None) -> Path:
    first = next(p.image for row in rows for p in row if p.image is not None)
    image = grids.grid(rows, title=title, cell=cell_size(np.asarray(first)), row_labels=row_labels)
    return run.write_derived(name, runs.encode_image(image))


def write_tables(run: runs.RunFolder, prefix: str, rows: Sequence[Mapping], *, pass_key: str, criterion: str,
                 threshold: float | None, columns: Sequence[str]) -> tuple[list, list[dict]]:
    """`<prefix>-metrics.csv` (every row) and `<prefix>-pass-rates.csv`; returns (pass rates, means)."""
    run.write_derived(f"{prefix}-metrics.csv", metrics.rows_to_csv(rows))
    rates = metrics.pass_rates(rows, criterion=criterion, threshold=threshold, pass_key=pass_key)
    run.write_derived(f"{prefix}-pass-rates.csv", metrics.pass_rates_csv(rates))
    return rates, setting_means(rows, columns)


MAX_GRIDS = 24  # per-task grids shown in a report (all are written to grids/<prefix>/)


def grids_section(title: str, prefix: str, grid_files: Sequence[tuple[Path, str]]) -> report.Section:
    """A report section of per-task grids, (path, caption) each: the first MAX_GRIDS shown."""
    note = [] if len(grid_files) <= MAX_GRIDS else [
        report.Text(f"The first {MAX_GRIDS} of {len(grid_files)} grids; all are in grids/{prefix}/.")]
    return report.Section(title, note + [report.Figure(path=p, caption=c) for p, c in grid_files[:MAX_GRIDS]])


def write_sweep_grid(run: runs.RunFolder, name: str, title: str, top: Sequence[grids.Panel], cell: runs.Cell,
                     positions: Sequence[str], blocks: Sequence[int], rows: Mapping[str, Mapping],
                     caption: Callable[[Mapping], str], label: str) -> Path:
    """The grid of a (positions x blocks) sweep: the `top` panels, then a row per position set
    (labelled '<label>: <positions>') with a panel per block, from the cell's `{pos}-b{k}.png` and
    the metrics row of setting `{pos} b{k}`."""
    swept = [[grids.Panel(f"block {k}", cell.load_image(f"{pos}-b{k}.png"), caption(rows[f"{pos} b{k}"]))
              for k in blocks] for pos in positions]
    return write_grid(run, name, title, [list(top), *swept], ["", *(f"{label}: {pos}" for pos in positions)])


def task_grids(run: runs.RunFolder, title: str, prefix: str, tasks: Sequence, rows: Sequence[Mapping],
               draw: Callable[[Any, runs.Cell, Mapping[str, Mapping]], Path]) -> report.Section:
    """The report section of per-task grids: draw(task, its cell, its rows by setting) writes each."""
    files = [(draw(t, run.cell(f"{prefix}/{t.task_id}"), {r["setting"]: r for r in rows if r["task"] == t.task_id}),
              t.task_id) for t in tasks]
    return grids_section(title, prefix, files)


def baseline_panels(base: Mapping[str, np.ndarray], edit_row: Mapping, t2i_row: Mapping) -> list[grids.Panel]:
    """A task grid's first row: the reference, the baseline edit, the text-to-image run with the task's seed."""
    return [grids.Panel("reference", base["reference"]),
            grids.Panel("baseline edit", base["edit"], de_caption(edit_row)),
            grids.Panel("t2i baseline", base["t2i"], de_caption(t2i_row))]


def rate_table(title: str, rates: Sequence, note: str = "") -> report.Table:
    rows = [{"setting": p.setting, "n": p.n, "passed": p.passed, "rate": p.rate} for p in rates]
    criterion = rates[0].criterion if rates else ""
    return report.Table(title=title, columns=["setting", "n", "passed", "rate"], rows=rows,
                        formats={"rate": "{:.0%}"}, note=(f"A pass: {criterion}. " + note).strip())


def means_table(title: str, means: Sequence[Mapping], columns: Sequence[str], note: str = "") -> report.Table:
    formats = {c: "{:.0%}" if c in ("colour_match", "transferred") else "{:.2f}" for c in columns}
    return report.Table(title=title, columns=["setting", "n", *columns], rows=list(means), formats=formats, note=note)


def plot(run: runs.RunFolder, name: str, blocks: Sequence[int], series: Mapping, caption: str,
         **kwargs) -> report.Figure:
    """A sweep plot saved as `plots/<name>.png`, as a report figure."""
    path = run.write_derived(f"plots/{name}.png", report.sweep_plot(blocks, series, **kwargs))
    return report.Figure(path=path, caption=caption)


def de_caption(row: Mapping) -> str:
    return f"dE {row['colour_de']:.1f}"
