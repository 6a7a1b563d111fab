"""The study's table, cell for cell: which experiment, setting, block, step count and rule produced
each of its numbers, where our runs put the same cell, and how a model's blocks map to its 32.

`plan(config, bucket, kind)` gives the settings of exactly the study's cells of one bucket
(`python -m experiments.run_all --study`); `rows(run_path, settings)` reads a run's pass rates
back into the study's table, each of our cells beside the study's number with n and the rule.

The study's cells (Ge et al. 2026, FLUX.2 [klein] 9B, 32 blocks, 4 steps; the protocol notes in
docs/experiments.md):

    colour    the T2I Lens in its diagonal form at global block 17, one step, against a one-step
              t2i_clean; the four knockouts in every block; I2I -> I2I patching at block 17 with
              its 448 pairs, all / padding / content positions
    style     the T2I Lens (input form: block 7 fed to block 0, four steps), all / padding /
    identity  content; the four knockouts in every block; patching at block 7
    add       the T2I Lens at block 7 ("generic reference information")
    remove

The study also ran cells outside its table: the lens one content token or one position at a
time, and the lens with a knockout on the source, the target or both. They are options of
`experiments.lens` (--per-position, --knockout / --knockout-on); --study does not run them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

from experiments import knockout, report, tables
from experiments.sweep import POSITIONS

STUDY_DOUBLE, STUDY_SINGLE = 8, 24  # klein-9B: 8 double-stream then 24 single-stream blocks
LENS_BLOCK = {"colour": 17, "style": 7, "identity": 7, "add": 7, "remove": 7}
PATCH_BLOCK = {"colour": 17, "style": 7, "identity": 7}
PROPERTY = {"colour": "colour", "style": "style", "identity": "identity", "add": "reference", "remove": "reference"}
BUCKETS = tuple(LENS_BLOCK)
# The study's sample sizes per bucket and experiment (docs: the paper protocol): the colour bucket's
# 320 tasks and 448 pairs; 450 style tasks and pairs; 90 identity tasks and 90 directed pairs x 5
# prompts; the add and remove buckets' 789 and 726 tasks.
STUDY_N = {"colour": {"lens": 320, "knockout": 320, "patching": 448},
           "style": {"lens": 450, "knockout": 450, "patching": 450},
           "identity": {"lens": 90, "knockout": 90, "patching": 450},
           "add": {"lens": 789}, "remove": {"lens": 726}}

# The study's numbers: {bucket: {cell: number}}, cells named as in `cells`.
NUMBERS = {
    "colour": {"lens all": "100 %", "ref->text": "86 % lost", "ref->text[padding]": "70 % lost",
               "ref->text[content]": "5 % lost", "ref->image": "87 % kept", "patching all": "92 %",
               "patching padding": "85 %", "patching content": "0.4 %"},
    "style": {"lens all": "92 %", "lens padding": "80 %", "lens content": "44 %", "ref->text": "97 % lost",
              "ref->text[padding]": "63 % lost", "ref->text[content]": "28 % lost", "ref->image": "84 % kept",
              "patching all": "88 %", "patching padding": "82 %", "patching content": "3 %"},
    "identity": {"lens all": "0 % (a different person)", "ref->text": "46 % lost", "ref->text[padding]": "17 % lost",
                 "ref->text[content]": "8 % lost", "ref->image": "23 % kept", "patching all": "0.7 %",
                 "patching padding": "0 %", "patching content": "0.4 %"},
    "add": {"lens all": "76.8 %"},
    "remove": {"lens all": "69.0 %"},
}


def block(study_block: int, config) -> int:
    """The model's block in the study block's place: a double block keeps its share of the double
    blocks (double block 7, the last, stays the last), a single block its share of the single ones
    (global 17, single block 9 of 24, goes to the same relative depth). The identity on klein-9B."""
    if study_block < STUDY_DOUBLE:
        return round(study_block * (config.depth - 1) / (STUDY_DOUBLE - 1))
    share = (study_block - STUDY_DOUBLE) / (STUDY_SINGLE - 1)
    return config.depth + round(share * (config.depth_single_blocks - 1))


def mapping_note(config) -> str:
    """How this model's blocks stand for the study's."""
    if (config.depth, config.depth_single_blocks) == (STUDY_DOUBLE, STUDY_SINGLE):
        return "This model has the study's 32 blocks; every cell is at the study's block."
    return (f"This model has {config.depth} double + {config.depth_single_blocks} single blocks = "
            f"{config.num_blocks}, the study's klein-9B 8 + 24 = 32. The study's double block 7 (the last double "
            f"block) is block {block(7, config)} here; its global block 17 (single block 9 of 24) is block "
            f"{block(17, config)}, the single block at the same relative depth. The knockouts cut every block, as "
            "the study's.")


def plan(config, bucket: str, kind: str, pairs: Mapping | None) -> dict:
    """The settings of the study's cells of `bucket` on a model of `config` ('organism' or 'folder')."""
    if bucket not in BUCKETS:
        raise ValueError(f"--bucket {bucket}: choose among {list(BUCKETS)}")
    diagonal = bucket == "colour"
    out = {"study": bucket, "property": PROPERTY[bucket], "lens": {
        "blocks": [block(LENS_BLOCK[bucket], config)], "positions": list(POSITIONS), "source_steps": 1,
        "form": "diagonal" if diagonal else "input",
        # One step as the study's colour cell; an organism draws no shape or colour in one Euler step of
        # its linear schedule, so there the target keeps the organism's own steps (the report says so).
        "target_steps": (1 if kind == "folder" else None) if diagonal else None}}
    if bucket in PATCH_BLOCK:
        out["knockout"] = {"settings": list(knockout.MAIN_SETTINGS), "layers": ["all"], "sweep": [], "sweep_from": [],
                           "sweep_mode": "suffix", "window": 3}
        out["patching"] = {"blocks": [block(PATCH_BLOCK[bucket], config)], "positions": list(POSITIONS),
                           "pairs": pairs, "mode": "replace"}
    return out


def cells(s: Mapping) -> list[tuple[str, str, str, str]]:
    """(cell, what, run table prefix, setting) of the study's table for settings `s` (a --study plan, or
    a sweep plan holding `study_lens`, run under the prefix study-lens, and the study's block)."""
    bucket = s.get("study", "colour")
    lens_prefix = "lens" if "study" in s else "study-lens"
    lens_s = s["lens"] if "study" in s else s["study_lens"]
    k = lens_s["blocks"][0]
    form = f"{lens_s['form']} form, block {k}"
    out = [(f"lens {p}", f"T2I Lens, {p} positions ({form})", lens_prefix, f"{p} b{k}") for p in POSITIONS]
    if bucket in PATCH_BLOCK:
        out += [(e, f"Knockout {e}, every block", "knockout", f"{e} @ all") for e in knockout.MAIN_SETTINGS]
        b = s["patching"]["blocks"][0] if "study" in s else s["study_block"]
        out += [(f"patching {p}", f"I2I -> I2I patching, {p} positions, block {b}", "patching", f"{p} b{b}")
                for p in POSITIONS]
    return out


def _rates(run_path: Path, prefix: str) -> dict[str, Mapping]:
    path = run_path / f"{prefix}-pass-rates.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def study_rate(number: str) -> float | None:
    """The study's number as a proportion ('86 % lost' -> 0.86; '-' -> None)."""
    found = re.match(r"\s*([0-9.]+)\s*%", number)
    return None if found is None else float(found.group(1)) / 100


def _number(r: Mapping, key: str) -> float | None:
    value = r.get(key, "")
    return None if value in ("", None) else float(value)


def _shown(r: Mapping, key: str, n: str, asked: str = "") -> str | None:
    """'rate asked [low, high] (n = N)' of a pass-rates CSV row's rate `key` (asked: ' lost' or ' kept',
    as the study writes its knockouts), None where it is empty."""
    rate = _number(r, key)
    if rate is None:
        return None
    low, high = _number(r, f"{key}_low"), _number(r, f"{key}_high")
    return f"{report.percent(rate)}{asked} [{report.percent(low)}, {report.percent(high)}] (n = {r[n]})"


def rows(run_path: Path, s: Mapping) -> list[dict]:
    """The study's table for this run, in the study's order: {cell, study, this run (the study's
    rule over every task, with its 95 % interval), inside (whether the study's number lies in that
    interval), strict (the stricter rule, where it applies), absolute, rule}."""
    bucket = s.get("study", "colour")
    found = {}
    out = []
    for cell, what, prefix, setting in cells(s):
        found.setdefault(prefix, _rates(run_path, prefix))
        r = found[prefix].get(setting)
        number = NUMBERS[bucket].get(cell, "-")
        here = absolute = rule = strict = inside = None
        if r is not None:
            asked = f" {r['judge']}" if r["judge"] in ("lost", "kept") else ""
            here = _shown(r, "rate", "n", asked)
            if here is not None and tables.caveat(r):
                here = f"{here}: {tables.caveat(r, short=True)}"
            strict = _shown(r, "rate_strict", "n_strict", asked)
            if strict is not None:
                strict += f", {r['excluded']} excluded"
            absolute = _shown(r, "rate_absolute", "n_absolute")
            rule = f"{r['judge']}: {tables.RULES[r['judge']]}"
            theirs, low, high = study_rate(number), _number(r, "rate_low"), _number(r, "rate_high")
            if theirs is not None and low is not None:
                inside = "yes" if low - 1e-9 <= theirs <= high + 1e-9 else "no"
        out.append({"cell": what, "study": study_number(bucket, cell), "this run": here, "study inside": inside,
                    "strict": strict, "absolute": absolute, "rule": rule})
    return out


def study_number(bucket: str, cell: str) -> str:
    """The study's number of a cell with its n, e.g. '86 % lost (n = 320)'; '-' where it reports none."""
    number = NUMBERS[bucket].get(cell)
    if number is None:
        return "-"
    experiment = "lens" if cell.startswith("lens") else "patching" if cell.startswith("patching") else "knockout"
    return f"{number} (n = {STUDY_N[bucket][experiment]})"


def table(run_path: Path, s: Mapping, config, note: str = "") -> report.Table:
    bucket = s.get("study", "colour")
    shown = rows(run_path, s)
    strict = any(r["strict"] for r in shown)
    return report.Table(
        title=f"The study's table, {bucket} bucket: its cells beside ours",
        columns=["cell", "study", "this run", "study inside", *(["strict"] if strict else []), "absolute", "rule"],
        rows=shown,
        note=f"{mapping_note(config)} 'study': its number and n (the paper protocol); 'this run': the study's rule, relative to its control, over every task (as the "
             f"study judged every one), with its 95 % interval (Wilson); 'study inside': whether the study's number "
             f"lies in that interval (a model and sample other than the study's: a check of scale, not of "
             f"agreement). "
             + (f"'strict': {tables.STRICT_RULE}. " if strict else "")
             + f"'absolute': the output alone. Our verdicts are the automatic colour metric (CIEDE2000 "
             f"{tables.THRESHOLD:g}); the study's, a VLM judge (run experiments.judge for ours). {note}".strip())
