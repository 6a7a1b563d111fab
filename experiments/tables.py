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
    pass           the study's rule, relative to the control (RULES): True / False for every colour
                   row (the study judged every row: a lost / kept row whose baseline edit misses the
                   colour fails, since nothing was there to lose or keep); None where the metric has
                   no verdict (style, identity, reference: a judge scores them)
    pass_absolute  the output alone, without the control (ABSOLUTE_RULES); None where the metric has
                   no verdict
    baseline_misses
                   lost / kept colour rows: True where the baseline edit already misses the colour.
                   The stricter rule (this project's option, STRICT_RULE) leaves these rows out of
                   its rate; None for the other questions and properties

and the automatic metric's numbers: `colour_de` (CIEDE2000 between the output's dominant colour
and the reference colour, computed from the reference image file), `control_de` (the same for
the control image), `mad` and `ssim` against the task's baseline edit. Every verdict is a function
of the bundle's images alone, so a rule-based judge recomputes it exactly. The colour rules apply
to colour rows only: a style, identity or reference row has no automatic verdict, whatever colours
its images happen to have.

Every rate in the tables carries its 95 % interval (`fluxjax.metrics.wilson_interval`), and each
setting's absolute rate is compared with its control's on the same tasks (`vs_control`, with the
paired interval of `fluxjax.metrics.paired_difference_interval`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import grids, report, runs
from fluxjax import metrics
from fluxjax.metrics import rate_text  # '62.5 % [30.6 %, 86.3 %]': the reports' one format

THRESHOLD = metrics.COLOUR_MATCH_DE00

# metrics rows


def change(image: np.ndarray, baseline: np.ndarray) -> dict:
    """Change against a baseline image: mean absolute pixel difference (0-255) and SSIM."""
    return {"mad": metrics.mean_abs_diff(image, baseline), "ssim": metrics.ssim(image, baseline)}


RULES = {  # the study's pass rule of each question, relative to its control; every row judged
    "present": f"the reference colour is present in the output (CIEDE2000 <= {THRESHOLD:g}) and absent from "
               "t2i_clean",
    "lost": "the colour, present in the baseline edit, is absent from the output (a task whose baseline edit misses "
            "it fails)",
    "kept": "the colour, present in the baseline edit, is present in the output (a task whose baseline edit misses "
            "it fails)",
    "transferred": "the output's colour is closer (CIEDE2000) to the source reference's than to the target's",
}
ABSOLUTE_RULES = {  # the same questions asked of the output alone
    "present": "the reference colour is present in the output", "lost": "the colour is absent from the output",
    "kept": "the colour is present in the output",
    "transferred": f"the output's colour is within CIEDE2000 {THRESHOLD:g} of the source reference's",
}
STRICT_RULE = ("the stricter rule (this project's, not the study's) leaves out the tasks whose baseline edit "
               "misses the colour")
STRICT_KINDS = ("lost", "kept")  # the questions the stricter rule applies to


def verdict(judge: str, de: float, control_de: float) -> tuple[bool, bool, bool | None]:
    """(the study's relative rule, the absolute rule, whether the baseline edit misses the colour)
    for one output: the last is None for the questions the stricter rule does not apply to.

    de: CIEDE2000 from the output's dominant colour to the reference colour (patching: the source's).
    control_de: the control's: t2i_clean's to the reference colour (present), the baseline edit's
    (lost, kept), the output's to the target reference's colour (transferred).
    """
    present = bool(de <= THRESHOLD)
    if judge == "present":
        return present and bool(control_de > THRESHOLD), present, None
    if judge == "transferred":
        return bool(de < control_de), present, None
    if judge not in STRICT_KINDS:
        raise ValueError(f"unknown question {judge!r}; choose among {list(RULES)}")
    absolute = not present if judge == "lost" else present
    misses = bool(control_de > THRESHOLD)
    return absolute and not misses, absolute, misses


def judged_row(experiment: str, property: str, judge: str, bundle: Sequence[tuple[str, str]], image: np.ndarray,
               colour_lab, control_de: float, baseline: np.ndarray, **fields) -> dict:
    """A row a judge can score: the output `image` (the bundle's last image) against `colour_lab`,
    its verdicts under both rules (colour rows only: no verdict for another property), and its
    change against `baseline`."""
    de = metrics.colour_error(image, colour_lab)
    passed, absolute, misses = verdict(judge, de, control_de) if property == "colour" else (None, None, None)
    return {"experiment": experiment, "property": property, "judge": judge, "bundle": [list(b) for b in bundle],
            **fields, "colour_de": de, "control_de": control_de, "pass": passed, "pass_absolute": absolute,
            "baseline_misses": misses, **change(image, baseline)}


def row_verdict(row: Mapping) -> tuple[bool | None, bool | None]:
    """(the study's rule, baseline_misses) of a metrics row. Rows written before every row got the
    study's verdict carry pass None where the baseline edit misses the colour: read as a fail."""
    if "baseline_misses" in row:
        return row["pass"], row["baseline_misses"]
    if row.get("judge") in STRICT_KINDS and row["pass"] is None and row.get("pass_absolute") is not None:
        return False, True
    return row["pass"], (False if row.get("judge") in STRICT_KINDS and row["pass"] is not None else None)


def control_row(experiment: str, property: str, image: np.ndarray, colour_lab, baseline: np.ndarray, **fields) -> dict:
    """A control row (not judged): its colour distance, and whether the colour is present (pass_absolute;
    None for a property other than colour)."""
    de = metrics.colour_error(image, colour_lab)
    present = bool(de <= THRESHOLD) if property == "colour" else None
    return {"experiment": experiment, "property": property, "judge": None, "bundle": [], **fields, "colour_de": de,
            "control_de": None, "pass": None, "pass_absolute": present, "baseline_misses": None,
            **change(image, baseline)}


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


def _entity(row: Mapping) -> str:
    value = row.get("task", row.get("pair"))
    return "__".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def interval_columns(name: str, passed: int, n: int) -> dict:
    """{name: passed / n, name_low, name_high: its 95 % Wilson interval} (None where n = 0)."""
    low_high = metrics.wilson_interval(passed, n)
    return {name: passed / n if n else None, f"{name}_low": low_high and low_high[0],
            f"{name}_high": low_high and low_high[1]}


def pass_rates(rows: Sequence[Mapping], control: str | None = None) -> list[dict]:
    """Per setting (first-seen order), each rate with its 95 % Wilson interval (`<rate>_low`,
    `<rate>_high`):

        n, passed, rate    the study's rule over every row that has a verdict (the study judged
                           every row; a row with no automatic verdict, e.g. style, is left to a judge)
        excluded, n_strict, passed_strict, rate_strict
                           lost / kept: the stricter rule, leaving out the tasks whose baseline edit
                           misses the colour (empty for the other questions)
        n_absolute, rate_absolute
                           the output alone (a control setting: the colour present)
        vs_control         the share of outputs that show the property (the colour present; for a
                           lost question, 1 - rate_absolute) minus the control setting's on the
                           same tasks (`control`, e.g. the baseline edit), with the paired interval
                           of `fluxjax.metrics.paired_difference_interval`
    """
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r["setting"]), []).append(r)
    baseline = {_entity(r): r["pass_absolute"] for r in groups.get(control, []) if r["pass_absolute"] is not None}
    out = []
    for setting, rs in groups.items():
        kind = rs[0]["judge"]
        verdicts = [row_verdict(r) for r in rs]
        judged = [(p, m) for p, m in verdicts if p is not None]
        rate = {"setting": setting, "judge": kind, "n": len(judged), "passed": sum(bool(p) for p, _ in judged),
                **interval_columns("rate", sum(bool(p) for p, _ in judged), len(judged))}
        strict = [p for p, m in judged if not m]
        applies = kind in STRICT_KINDS and bool(judged)
        rate.update({"excluded": len(judged) - len(strict) if applies else None,
                     "n_strict": len(strict) if applies else None,
                     "passed_strict": sum(map(bool, strict)) if applies else None,
                     **(interval_columns("rate_strict", sum(map(bool, strict)), len(strict)) if applies else
                        {"rate_strict": None, "rate_strict_low": None, "rate_strict_high": None})})
        absolute = [bool(r["pass_absolute"]) for r in rs if r["pass_absolute"] is not None]
        rate.update({"n_absolute": len(absolute), **interval_columns("rate_absolute", sum(absolute), len(absolute))})
        shows = (lambda absolute: not absolute) if kind == "lost" else bool  # the property present in the output
        pairs = [(shows(r["pass_absolute"]), bool(baseline[_entity(r)])) for r in rs
                 if setting != control and r["pass_absolute"] is not None and _entity(r) in baseline]
        diff = metrics.paired_difference_interval(pairs)
        rate.update({"control": control if diff else None, "vs_control": diff and diff[0],
                     "vs_control_low": diff and diff[1], "vs_control_high": diff and diff[2]})
        if any("trained_cut" in r for r in rs):  # knockout rows: what the rate does not say
            rate["trained_cut"] = all(bool(r.get("trained_cut")) for r in rs)
            marked = [r for r in rs if "destroyed" in r]
            rate["destroyed"] = sum(bool(r["destroyed"]) for r in marked) if marked else None
        out.append(rate)
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
                 rates_title: str, control: str | None = None) -> list:
    """`<prefix>-metrics.csv` (every row) and `<prefix>-pass-rates.csv` (`pass_rates`, against the
    `control` setting); returns the report items: `text`, the pass rates (`rates_title`) and the
    means of `columns` per setting."""
    run.write_derived(f"{prefix}-metrics.csv", metrics.rows_to_csv(rows))
    rates = pass_rates(rows, control)
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


def difference_text(diff: float | None, low: float | None, high: float | None) -> str:
    """'-75 pp [-93, -41]': a difference of rates in percentage points and its 95 % interval."""
    if diff is None:
        return ""
    return f"{diff * 100:+.0f} pp [{low * 100:+.0f}, {high * 100:+.0f}]"


def rate_table(title: str, rates: Sequence[Mapping], note: str = "") -> report.Table:
    """Every rule's rate per setting with its 95 % interval, each question's rules spelled out under
    the table; the stricter rule's column where some question has it. A control row (not judged)
    shows what it is and the share of its images with the colour, nothing more; a knockout the rate
    does not describe says why in the `caveat` column."""
    judges = [j for j in dict.fromkeys(r["judge"] for r in rates) if j]
    rules = " ".join(f"{j}: {RULES[j]}; absolute: {ABSOLUTE_RULES[j]}." for j in judges)
    shown = []
    for r in rates:
        row = {**r, "rate [95% CI]": rate_text(r["rate"], r["rate_low"], r["rate_high"]),
               "strict [95% CI]": "" if r.get("rate_strict") is None else
               f"{rate_text(r['rate_strict'], r['rate_strict_low'], r['rate_strict_high'])} (n = {r['n_strict']})",
               "absolute [95% CI]": rate_text(r["rate_absolute"], r["rate_absolute_low"], r["rate_absolute_high"]),
               "shown vs control": difference_text(r.get("vs_control"), r.get("vs_control_low"),
                                                   r.get("vs_control_high")), "caveat": caveat(r)}
        if not r["judge"]:  # a control: not judged; what it is and the share of its images with the colour
            row = {"setting": r["setting"], "judge": CONTROL, "absolute [95% CI]": row["absolute [95% CI]"]}
        shown.append(row)
    strict = any(r.get("rate_strict") is not None for r in rates)
    control = next((r["control"] for r in rates if r.get("control")), None)
    columns = ["setting", "judge", "n", "passed", "rate [95% CI]", *(["excluded", "strict [95% CI]"] if strict else []),
               "absolute [95% CI]", *(["shown vs control"] if control else []),
               *(["caveat"] if any(r.get("caveat") for r in shown) else [])]
    return report.Table(title=title, rows=shown, columns=columns, note=(
        f"rate: the study's rule, relative to its control, over every task (the study judged every one); "
        f"absolute: the output alone (controls: the colour present), over n_absolute rows. Brackets: 95 % "
        f"intervals (Wilson)."
        + (f" strict: {STRICT_RULE} (excluded: how many)." if strict else "")
        + (f" shown vs control: the share of outputs showing the colour minus {control!r}'s on the same tasks, "
           f"in percentage points, with its paired 95 % interval (Bonett-Price)." if control else "")
        + f" {rules} {note}").strip())


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
