"""The main job: the study's five experiments on a subset of the colour bucket, one report.

    python -m experiments.run_all
        both committed model organisms (`direct` and `text-routed`: small FLUX.2 editors whose
        routing is known by construction, see docs/organisms.md), the colour bucket's 8 colours x 2
        shapes (seed 0) at 32 x 32, every block swept; a few minutes on 2 CPU cores. One run folder
        per organism (runs/main/direct, runs/main/text-routed) and runs/main/report.html, which
        puts the two side by side.
    python -m experiments.run_all --model /models/FLUX.2-klein-9B --out runs/klein9b
        a real FLUX.2 [klein] 9B folder (diffusers layout) on a GPU or TPU machine: 1024 x 1024
        references and outputs, 4 steps, bf16 as stored; add --blocks 7,17 for the study's cells
        only, --chunk 2 (or 1) if the sweeps run out of memory, and --colours/--objects/--seeds
        for more of the bucket.

The experiments, in the study's order (see each module's --help):
    1. T2I Lens (experiments.lens), all text positions, source block swept
    2. padding-only and content-only T2I Lens (the same sweep)
    3. attention knockout (experiments.knockout): the eight single edges and ref->text+ref->image at
       all blocks, the double blocks only and the single blocks only, and the main four edges cut
       from block k on, k swept
    4. dropping the reference after block k (experiments.drop), k swept, the removal form checked
       against the mask form at the middle k
    5. I2I -> I2I patching (experiments.patching) between colours of one object (the study's pairs),
       block swept

With one model, --out is its run folder; with several (--model a,b), each gets the run folder
--out/<name> and --out/report.html compares them. Every experiment writes its cells under
outputs/<experiment>/ of a model's run folder; the task baselines (edit, text-to-image) are shared.
Rerunning the same command resumes: nothing complete is recomputed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments import cli, drop, knockout, lens, models, patching, report, tables, tasks as tasklib
from experiments.sweep import POSITIONS

NAME = "run_all"
TITLE = "The five experiments"
DEFAULT_MODELS = "direct,text-routed"
COLOUR_SUBSETS = {  # per model kind: (colours, objects, seeds) of the default colour-bucket subset
    "organism": (",".join(tasklib.COLOURS), "circle,triangle", "0"),
    "folder": ("red,green,blue,yellow", "ball", "0"),
}
STUDY_COLOUR_BLOCK, STUDY_BLOCKS = 17, 32  # the study's colour cell: global block 17 of klein-9B's 32

# The study's colour-bucket numbers (protocol table), next to which the report puts this run's.
STUDY = {
    "lens": "100 %", "lens_padding": "-", "lens_content": "-",
    "ref->text": "86 % lost", "ref->text[padding]": "70 % lost", "ref->text[content]": "5 % lost",
    "ref->image": "87 % kept", "patch_all": "92 %", "patch_padding": "85 %", "patch_content": "0.4 %",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("experiments")
    g.add_argument("--blocks", default="all",
                   help="blocks of the lens and patching sweeps, and the k of the knockout and drop sweeps (with 0 "
                        "and n added): 'all', 'a:b' or 'a,b,c' (default all)")
    g.add_argument("--headline-block", type=int, default=None,
                   help="the block of the summary table's lens and patching rows (default: the study's colour "
                        "cell, block 17 of 32, at the same relative depth)")
    g.add_argument("--source-steps", type=int, default=1, help="steps of the T2I Lens's source edit (default 1)")
    g.add_argument("--pairs", type=Path, default=None,
                   help="pair file of the patching experiment (default: the study's colour-bucket pairs)")


def plan(config, blocks_spec: str, source_steps: int, headline: int | None, pairs: Path | None = None) -> dict:
    """Every experiment's settings (the run config's `settings`)."""
    n, depth = config.num_blocks, config.depth
    blocks = cli.parse_blocks(blocks_spec, n)
    ks = sorted(set(blocks) | {0, n})
    if headline is None:
        headline = min(n - 1, round(STUDY_COLOUR_BLOCK * n / STUDY_BLOCKS))
    if not 0 <= headline < n:
        raise ValueError(f"--headline-block {headline}: this model has blocks 0..{n - 1}")
    headline = min(blocks, key=lambda b: (abs(b - headline), b))
    positions = list(POSITIONS)
    out = {
        "headline_block": headline,
        "lens": {"blocks": blocks, "positions": positions, "source_steps": source_steps, "form": "input",
                 "target_steps": None},
        "knockout": {"settings": [*knockout.MAIN_SETTINGS, *knockout.OTHER_SETTINGS, "ref->text+ref->image"],
                     "layers": ["all", f":{depth}", f"{depth}:"], "sweep": list(knockout.MAIN_SETTINGS),
                     "sweep_from": ks},
        "drop": {"blocks": ks, "check_removal": [ks[len(ks) // 2]]},
        "patching": {"blocks": blocks, "positions": positions, "pairs": patching.pair_file(pairs)},
    }
    if source_steps < 1:
        raise ValueError("--source-steps must be at least 1")
    lens.validate(out["lens"], config)
    knockout.validate(out["knockout"], config)
    drop.validate(out["drop"], config)
    patching.validate(out["patching"], config)
    return out


def _rates(run_path: Path, prefix: str) -> dict[str, Mapping]:
    path = run_path / f"{prefix}-pass-rates.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return {r["setting"]: r for r in csv.DictReader(f)}


def summary_rows(run_path: Path, s: Mapping) -> list[dict]:
    """This run's headline pass rates ({experiment, this run, study}) in the study's order."""
    b = s["headline_block"]
    by_prefix = {prefix: _rates(run_path, prefix) for prefix in ("lens", "knockout", "patching")}
    # (what, experiment, setting in its pass-rate table, reading of the rate, the study's number)
    lines = [(f"T2I Lens, block {b}: reference colour present", "lens", f"all b{b}", "", STUDY["lens"]),
             (f"T2I Lens padding-only, block {b}", "lens", f"padding b{b}", "", STUDY["lens_padding"]),
             (f"T2I Lens content-only, block {b}", "lens", f"content b{b}", "", STUDY["lens_content"])]
    lines += [(f"Knockout {e} (all blocks)", "knockout", f"{e} @ all", "kept" if e == "ref->image" else "lost",
               STUDY[e]) for e in knockout.MAIN_SETTINGS]
    lines += [(f"I2I->I2I patching {p}, block {b}: transferred", "patching", f"{p} b{b}", "", STUDY[f"patch_{p}"])
              for p in POSITIONS]
    rows = []
    for what, prefix, setting, reading, study in lines:
        r = by_prefix[prefix].get(setting)
        here = None
        if r is not None:
            rate = "n/a" if r["rate"] == "" else f"{float(r['rate']):.0%}"
            excluded = f", {r['excluded']} excluded" if int(r["excluded"]) else ""
            here = (f"{rate}{' ' + reading if reading else ''} (n = {r['n']}{excluded}; absolute "
                    f"{float(r['rate_absolute']):.0%})")
        rows.append({"experiment": what, "this run": here, "study": study})
    return rows


def summary_note(kind: str) -> str:
    note = (f"Colour threshold: CIEDE2000 {tables.THRESHOLD:g}. Rates follow the study's rules, relative to a "
            f"control (lens: {tables.RULES['present']}; knockout lost: {tables.RULES['lost']}; patching: "
            f"{tables.RULES['transferred']}); 'absolute' asks the output alone. The study scored with a VLM judge "
            "on klein-9B.")
    if kind == "organism":
        note += (" A model organism's routing is known by construction (docs/organisms.md): `direct` was trained "
                 "plainly, `text-routed` with the reference cut from the image and from the text content positions "
                 "in every block, so it can reach the image only through the text padding positions.")
    return note


def summary_table(run_path: Path, s: Mapping, kind: str) -> report.Table:
    """This run's pass rates next to the study's colour-bucket numbers."""
    return report.Table(title="This run against the study (colour bucket)", columns=["experiment", "this run", "study"],
                        rows=summary_rows(run_path, s), note=summary_note(kind))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One model's run of the five experiments."""

    name: str  # the model's short name (a --model value, or a folder's name)
    kind: str
    run_path: Path
    report: Path
    settings: Mapping


def run_model(parser: argparse.ArgumentParser, args: argparse.Namespace, out: str) -> Outcome:
    """The five experiments on `args.model`, into the run folder `out`."""
    try:
        spec = cli.task_spec(args)
        model, model_record = models.load(args)
        settings = plan(model.config, args.blocks, args.source_steps, args.headline_block, args.pairs)
        config = {**cli.base_config(args, model, model_record), "experiment": NAME, "settings": settings}
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(str(e))
    start = time.perf_counter()
    kind = model_record["kind"]
    with cli.open_run_folder(out, config) as run:
        ctx = cli.open_context(args, model, run)
        try:
            found = cli.load_tasks(spec, run)
            patching.resolve_pairs(ctx, found, settings["patching"])  # a bad pair file fails before any work
        except (ValueError, KeyError) as e:
            parser.error(str(e))
        sections = lens.run(ctx, found, settings["lens"], "lens")
        sections += knockout.run(ctx, found, settings["knockout"], "knockout")
        sections += drop.run(ctx, found, settings["drop"], "drop")
        sections += patching.run(ctx, found, settings["patching"], "patching")
        intro = report.Section("Setup", [
            report.Text(f"{ctx.describe()}\n\n{len(found)} tasks: "
                        f"{', '.join(t.task_id for t in found)}. This invocation took {time.perf_counter() - start:.0f} s"
                        f"{' (resumed)' if run.resumed else ''}."),
            summary_table(run.path, settings, kind)])
        path = report.write_run_report(run, f"{TITLE}: {model_record['name']}", [intro, *sections])
        run.write_summary({"experiment": NAME, "tasks": len(found), "seconds": time.perf_counter() - start,
                           "resumed": run.resumed})
    print(f"report: {path}")
    return Outcome(name=models.name(args.model), kind=kind, run_path=run.path, report=path, settings=settings)


def comparison_report(folder: Path, outcomes: Sequence[Outcome]) -> Path:
    """`folder/report.html`: the models' headline pass rates side by side, then their sweep plots."""
    rows = {}
    for o in outcomes:
        for r in summary_rows(o.run_path, o.settings):
            rows.setdefault(r["experiment"], {"experiment": r["experiment"], "study": r["study"]})[o.name] = r["this run"]
    names = [o.name for o in outcomes]
    kinds = {o.kind for o in outcomes}
    table = report.Table(title="Pass rates side by side", columns=["experiment", *names, "study"],
                         rows=list(rows.values()), note=summary_note(kinds.pop() if len(kinds) == 1 else "mixed"))
    links = report.Text("Each model's full report (grids, tables, every setting): " + "; ".join(
        f"{o.name}: {o.report.relative_to(folder.resolve()).as_posix()}" for o in outcomes) + ".")
    sections = [report.Section("Headline numbers", [table, links])]
    plots = {}
    for o in outcomes:
        for png in sorted((o.run_path / "plots").glob("*.png")):
            plots.setdefault(png.stem, []).append(report.Figure(path=png, caption=o.name))
    rows_of_plots = [report.FigureRow(figures, caption=stem) for stem, figures in plots.items()]
    if rows_of_plots:
        sections.append(report.Section("Block sweeps side by side", rows_of_plots))
    return report.write_report(folder, f"{TITLE}: {', '.join(names)}", sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cli.add_arguments(parser, out_default="runs/main", model_default=DEFAULT_MODELS,
                         colour_defaults=COLOUR_SUBSETS)
    args = parser.parse_args(argv)
    specs = [m.strip() for m in args.model.split(",") if m.strip()]
    if not specs:
        parser.error("--model: name at least one model")
    if len(specs) == 1:
        run_model(parser, _with_model(args, specs[0]), args.out)
        return 0
    names = [models.name(m) for m in specs]
    if len(set(names)) != len(names):
        parser.error(f"--model {args.model}: the models need different names (their run folders are --out/<name>)")
    folder = Path(args.out).resolve()
    outcomes = [run_model(parser, _with_model(args, m), str(folder / cli.slug(name)))
                for m, name in zip(specs, names)]
    path = comparison_report(folder, outcomes)
    print(f"report: {path}")
    return 0


def _with_model(args: argparse.Namespace, model: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "model": model})


if __name__ == "__main__":
    raise SystemExit(main())
