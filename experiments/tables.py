"""Metrics rows, the study's pass rules, their tables, and the pieces of a run's report built from
them: pass-rate and mean tables, block-sweep plots, per-task grids.

Each experiment records one row per (task or pair, setting). A row a judge can score carries

    experiment     "lens" | "knockout" | "drop" | "patching"
    property       "colour" for the colour bucket; else the study's: "style", "identity", or
                   "reference" (add / remove)
    judge          the question: "present" (the lens: Image 3 shows Image 1's property and Image 2
                   does not), "lost" (Image 1's property, shown by Image 2, is absent from Image 3),
                   "kept" (Image 3, like Image 2, still shows Image 1's property), "transferred"
                   (Image 4 takes Image 1's property rather than Image 2's); None for a control row
    bundle         [label, path relative to the run folder] of the images shown, in the question's
                   order: present: reference, t2i_clean, output; lost / kept: reference, baseline
                   edit, output; transferred: source reference, target reference, target edit
                   (unpatched), output
    pass           the study's rule, relative to the control (RULES): True / False, or None when
                   the row is excluded (lost / kept: the baseline edit already misses the property)
    pass_absolute  the output alone, without the control (ABSOLUTE_RULES)

and the automatic metric's numbers: `colour_de` (CIEDE2000 between the output's dominant colour
and the reference colour, computed from the reference image file), `control_de` (the same for
the control image), `mad` and `ssim` against the task's baseline edit. Every verdict is a function
of the bundle's images alone, so a rule-based judge recomputes it exactly.
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


RULES = {  # the study's pass rule of each question, relative to its control
    "present": f"the reference colour is present in the output (CIEDE2000 <= {THRESHOLD:g}) and absent from "
               "t2i_clean",
    "lost": "the colour, present in the baseline edit, is absent from the output (tasks whose baseline edit "
            "misses it are excluded)",
    "kept": "the colour, present in the baseline edit, is present in the output (tasks whose baseline edit "
            "misses it are excluded)",
    "transferred": "the output's colour is closer (CIEDE2000) to the source reference's than to the target's",
}
ABSOLUTE_RULES = {  # the same questions asked of the output alone
    "present": "the reference colour is present in the output", "lost": "the colour is absent from the output",
    "kept": "the colour is present in the output",
    "transferred": f"the output's colour is within CIEDE2000 {THRESHOLD:g} of the source reference's",
}


def verdict(judge: str, de: float, control_de: float) -> tuple[bool | None, bool]:
    """(the relative rule's pass, or None for an excluded row; the absolute rule's pass) of one output.

    de: CIEDE2000 from the output's dominant colour to the reference colour (patching: the source's).
    control_de: the control's: t2i_clean's to the reference colour (present), the baseline edit's
    (lost, kept), the output's to the target reference's colour (transferred).
    """
    present = bool(de <= THRESHOLD)
    if judge == "present":
        return present and bool(control_de > THRESHOLD), present
    if judge == "transferred":
        return bool(de < control_de), present
    if judge not in ("lost", "kept"):
        raise ValueError(f"unknown question {judge!r}; choose among {list(RULES)}")
    absolute = not present if judge == "lost" else present
    return (None if control_de > THRESHOLD else absolute), absolute


def judged_row(experiment: str, property: str, judge: str, bundle: Sequence[tuple[str, str]], image: np.ndarray,
               colour_lab, control_de: float, baseline: np.ndarray, **fields) -> dict:
    """A row a judge can score: the output `image` (the bundle's last image) against `colour_lab`,
    its verdicts under both rules, and its change against `baseline`."""
    de = metrics.colour_error(image, colour_lab)
    passed, absolute = verdict(judge, de, control_de)
    return {"experiment": experiment, "property": property, "judge": judge, "bundle": [list(b) for b in bundle],
            **fields, "colour_de": de, "control_de": control_de, "pass": passed, "pass_absolute": absolute,
            **change(image, baseline)}


def control_row(experiment: str, property: str, image: np.ndarray, colour_lab, baseline: np.ndarray, **fields) -> dict:
    """A control row (not judged): its colour distance, and whether the colour is present (pass_absolute)."""
    de = metrics.colour_error(image, colour_lab)
    return {"experiment": experiment, "property": property, "judge": None, "bundle": [], **fields, "colour_de": de,
            "control_de": None, "pass": None, "pass_absolute": bool(de <= THRESHOLD), **change(image, baseline)}


# A knockout output that no longer shows the edit's scene is "destroyed": its colour verdict would
# say "lost" of an image that lost everything. Destroyed: no object drawn (under NO_OBJECT of the image
# stands out from its border colour; the organisms' objects cover 10-40 %), or a change against the
# baseline edit more than DESTROYED_CHANGE times the text-to-image baseline's (the change of removing the
# reference altogether; at least MIN_SPREAD of 255, so a model that ignores its reference is not
# judged on noise). On the direct organism, text->image in every block fills the frame with the colour
# (mean |diff| 73-87 against 23-31 for text-to-image).
NO_OBJECT = 0.01
DESTROYED_CHANGE = 2.0
MIN_SPREAD = 10.0


def destroyed(image: np.ndarray, edit_mad: float, t2i_mad: float) -> bool:
    """Whether an intervened output is destroyed rather than edited (see NO_OBJECT): `edit_mad` its
    mean |pixel difference| to the baseline edit, `t2i_mad` the text-to-image baseline's."""
    no_object = metrics.foreground_share(image) < NO_OBJECT
    return bool(no_object or edit_mad > DESTROYED_CHANGE * max(t2i_mad, MIN_SPREAD))


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


def pass_rates(rows: Sequence[Mapping]) -> list[dict]:
    """Per setting (first-seen order): the relative rule's rate over the judged rows (n, passed,
    excluded), and the absolute rule's over every row. A control setting has the absolute rate only
    (the colour present)."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r["setting"]), []).append(r)
    out = []
    for setting, rs in groups.items():
        judged = [r for r in rs if r["pass"] is not None]
        passed = sum(bool(r["pass"]) for r in judged)
        out.append({"setting": setting, "judge": rs[0]["judge"], "n": len(judged), "passed": passed,
                    "rate": passed / len(judged) if judged else None,
                    "excluded": len(rs) - len(judged) if rs[0]["judge"] else 0, "n_absolute": len(rs),
                    "rate_absolute": float(np.mean([bool(r["pass_absolute"]) for r in rs]))})
        if any("destroyed" in r for r in rs):  # knockout rows: what the rate does not say
            out[-1]["trained_cut"] = all(bool(r.get("trained_cut")) for r in rs)
            out[-1]["destroyed"] = sum(bool(r.get("destroyed")) for r in rs)
    return out


def caveat(rate: Mapping, short: bool = False) -> str:
    """What a pass-rate row (`pass_rates`, or its CSV row) is not a finding about: an edge the model
    was trained without, or outputs destroyed rather than edited. Empty when nothing."""
    if str(rate.get("trained_cut")) == "True":
        return ("cut in training: not a finding" if short else
                "cut in training: the model never used these edges, so this knockout cuts nothing (not a finding)")
    destroyed = int(rate.get("destroyed") or 0)
    if destroyed:
        if short:
            return f"{destroyed} of {rate['n_absolute']} images destroyed"
        return (f"{destroyed} of {rate['n_absolute']} images destroyed (no object drawn, or changed over "
                f"{DESTROYED_CHANGE:g}x the text-to-image baseline): lost with the image, not recoloured")
    return ""


def write_tables(run: runs.RunFolder, prefix: str, rows: Sequence[Mapping], columns: Sequence[str], *, text: str,
                 rates_title: str) -> list:
    """`<prefix>-metrics.csv` (every row) and `<prefix>-pass-rates.csv`; returns the report items: `text`,
    the pass rates (`rates_title`) and the means of `columns` per setting."""
    run.write_derived(f"{prefix}-metrics.csv", metrics.rows_to_csv(rows))
    rates = pass_rates(rows)
    run.write_derived(f"{prefix}-pass-rates.csv", metrics.rows_to_csv(rates))
    means = setting_means(rows, columns)
    return [report.Text(text), rate_table(rates_title, rates), means_table("Means per setting", means, columns)]


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


CONTROL = "control (not judged)"  # a control row's question in a rate table


def rate_table(title: str, rates: Sequence[Mapping], note: str = "") -> report.Table:
    """Both rules' rates per setting, each question's rules spelled out under the table. A control
    row (not judged) shows what it is and the share of its images with the colour, nothing more; a
    knockout the rate does not describe says why in the `caveat` column."""
    judges = [j for j in dict.fromkeys(r["judge"] for r in rates) if j]
    rules = " ".join(f"{j}: {RULES[j]}; absolute: {ABSOLUTE_RULES[j]}." for j in judges)
    shown = []
    for r in rates:
        if r["judge"]:
            shown.append({**r, "caveat": caveat(r)})
        else:
            shown.append({"setting": r["setting"], "judge": CONTROL, "rate_absolute": r["rate_absolute"],
                          "n_absolute": r["n_absolute"]})
    columns = ["setting", "judge", "n", "passed", "rate", "excluded", "rate_absolute"]
    if any(r.get("caveat") for r in shown):
        columns.append("caveat")
    return report.Table(title=title, rows=shown, columns=columns,
                        formats={"rate": report.percent, "rate_absolute": report.percent},
                        note=(f"rate: the study's rule, relative to its control, over n judged rows; rate_absolute: "
                              f"the output alone, over n + excluded rows (a control: the share of its images "
                              f"with the colour). {rules} {note}").strip())


def means_table(title: str, means: Sequence[Mapping], columns: Sequence[str], note: str = "") -> report.Table:
    formats = {c: report.percent if c == "pass_absolute" else "{:.2f}" for c in columns}
    return report.Table(title=title, columns=["setting", "n", *columns], rows=list(means), formats=formats, note=note)


def plot(run: runs.RunFolder, name: str, blocks: Sequence[int], series: Mapping, caption: str,
         **kwargs) -> report.Figure:
    """A sweep plot saved as `plots/<name>.png` (its title and caption beside it, `plots/<name>.json`, for
    reports that gather plots from several runs), as a report figure."""
    path = run.write_derived(f"plots/{name}.png", report.sweep_plot(blocks, series, **kwargs))
    run.write_derived(f"plots/{name}.json", runs.canonical_json({"title": kwargs.get("title", ""),
                                                                 "caption": caption}) + "\n")
    return report.Figure(path=path, caption=caption)


def heatmap(run: runs.RunFolder, name: str, blocks: Sequence[int], rows: Sequence[str],
            values: Sequence[Sequence[float | None]], caption: str, **kwargs) -> report.Figure:
    """A (rows x blocks) heatmap saved as `plots/<name>.png` (title and caption in `plots/<name>.json`), as
    a report figure."""
    path = run.write_derived(f"plots/{name}.png", report.heatmap_plot(blocks, rows, values, **kwargs))
    run.write_derived(f"plots/{name}.json", runs.canonical_json({"title": kwargs.get("title", ""),
                                                                 "caption": caption}) + "\n")
    return report.Figure(path=path, caption=caption)


def de_caption(row: Mapping) -> str:
    return f"dE {row['colour_de']:.1f}"
