"""The main job: the study's five experiments on a subset of the colour bucket, one report.

    python -m experiments.run_all
        both committed model organisms (`direct` and `text-routed`: small FLUX.2 editors whose
        routing is known by construction, see docs/organisms.md), 4 of the colour bucket's colours
        x 2 shapes (seed 0) at 32 x 32, every block swept; a few minutes on 2 CPU cores. One run
        folder per organism (runs/main/direct, runs/main/text-routed) and runs/main/report.html,
        which puts the two side by side and the study's table beside them.
    python -m experiments.run_all --study [--bucket colour|style|identity|add|remove]
        exactly the study's cells of a bucket (experiments.study) on the tasks given: colour: the
        diagonal T2I Lens at global block 17 (one step), the four knockouts in every block, patching
        at block 17 with the study's pairs; style, identity: the lens and patching at block 7 and
        the knockouts; add, remove: the lens. On a model with other than 32 blocks the report says
        which of its blocks stands for the study's. On a model folder the colour bucket is the
        study's n, all 320 tasks and 448 pairs (--quick: 4 tasks); the other buckets need their
        task files (--tasks), and the tasks their pairs only name go in --pair-tasks (the study's
        style -> real pairs' `manual` photographs, its identity pairs' shared-prompt humans), so
        the lens and knockouts run its 450 style and 90 identity tasks. --plan counts the tasks and
        pairs of every experiment and runs nothing.
    python -m experiments.run_all --model /models/FLUX.2-klein-9B --out runs/klein9b
        a real FLUX.2 [klein] 9B folder (diffusers layout) on a GPU or TPU machine: 1024 x 1024
        references and outputs, 4 steps, bf16 as stored; add --chunk 2 (or 1) if the sweeps run
        out of memory, and --colours/--objects/--seeds for more of the bucket.

The experiments, in the study's order (see each module's --help):
    1. T2I Lens (experiments.lens), all text positions, source block swept
    2. padding-only and content-only T2I Lens (the same sweep)
    3. attention knockout (experiments.knockout): the eight single edges and ref->text+ref->image at
       all blocks, the double blocks only and the single blocks only, and the main four edges cut
       from block k on, k swept; beside it the attention flow (experiments.flow): every edge's
       attention mass per block and step, in one plain edit per task, next to its knockout's effect
    4. dropping the reference after block k (experiments.drop), k swept, the removal form checked
       against the mask form at the middle k
    5. I2I -> I2I patching (experiments.patching) between colours of one object (the study's pairs),
       block swept
and the study's colour T2I Lens (diagonal form, block 17's place), so that the report's study
table holds every colour cell of the study. With --probe, also linear probes of the reference
colour: every block's text stream collected at every step with and without the reference
(experiments.collect, stores collect.zarr and collect-t2i.zarr in the run folder) and probed per
block, position group and step (experiments.probe), beside the knockouts, lens and patching.

With one model, --out is its run folder; with several (--model a,b), each gets the run folder
--out/<name> and --out/report.html compares them. Every experiment writes its cells under
outputs/<experiment>/ of a model's run folder; the task baselines (edit, text-to-image) are shared.
Rerunning the same command resumes: nothing complete is recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments import cli, collect, drop, flow, knockout, lens, models, patching, probe, report, study, tables
from experiments.hosts import Hosts
from experiments.sweep import POSITIONS

NAME = "run_all"
TITLE = "The five experiments"
DEFAULT_MODELS = "direct,text-routed"
EXPERIMENTS = ("lens", "study_lens", "knockout", "flow", "drop", "patching")  # in the order they run
COLOUR_SUBSETS = {  # per model kind: (colours, objects, seeds) of the default colour-bucket subset
    "organism": ("red,yellow,green,blue", "circle,triangle", "0"),  # 8 tasks, 24 study-rule pairs
    "folder": ("red,green,blue,yellow", "ball", "0"),
}

def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("experiments")
    g.add_argument("--blocks", default="all",
                   help="blocks of the lens and patching sweeps, and the k of the knockout and drop sweeps (with 0 "
                        "and n added): 'all', 'a:b' or 'a,b,c' (default all)")
    g.add_argument("--study", action="store_true",
                   help="run exactly the study's cells of --bucket (experiments.study) instead of the sweeps")
    g.add_argument("--bucket", choices=study.BUCKETS, default="colour",
                   help="with --study: the bucket whose cells run on the given tasks (default colour)")
    g.add_argument("--source-steps", type=int, default=1, help="steps of the T2I Lens's source edit (default 1)")
    g.add_argument("--pairs", type=Path, default=None,
                   help="pair file of the patching experiment (default: the study's colour-bucket pairs)")
    g.add_argument("--quick", action="store_true",
                   help="with --study on a model folder: the 4-task subset of the colour bucket (red, green, blue, "
                        "yellow ball, seed 0) instead of the whole bucket, the study's n (320 tasks, 448 pairs)")
    g.add_argument("--probe", action="store_true",
                   help="also collect every block's text stream for the tasks, with the reference and without it, and "
                        "probe it for the reference's colour (experiments.collect, experiments.probe)")
    g.add_argument("--plan", action="store_true",
                   help="check the inputs and print how many tasks and pairs each experiment would run; run nothing")


def plan(config, blocks_spec: str, source_steps: int, kind: str, pairs: Path | None = None) -> dict:
    """Every experiment's settings (the run config's `settings`): the sweeps, and the study's colour
    cells (its diagonal lens, prefix study-lens; its knockouts and patching block, read from the sweeps)."""
    n, depth = config.num_blocks, config.depth
    blocks = cli.parse_blocks(blocks_spec, n, "--blocks")
    ks = sorted(set(blocks) | {0, n})
    study_block = study.block(study.PATCH_BLOCK["colour"], config)
    if study_block not in blocks:
        raise ValueError(f"--blocks {blocks_spec}: include block {study_block}, the study's colour block here")
    positions = list(POSITIONS)
    out = {
        "study_block": study_block,
        "study_lens": study.plan(config, "colour", kind, None)["lens"],
        "lens": {"blocks": blocks, "positions": positions, "source_steps": source_steps, "form": "input",
                 "target_steps": None},
        "knockout": {"settings": [*knockout.MAIN_SETTINGS, *knockout.OTHER_SETTINGS, "ref->text+ref->image"],
                     "layers": ["all", f":{depth}", f"{depth}:"], "sweep": list(knockout.MAIN_SETTINGS),
                     "sweep_from": sorted(set(blocks) | {0}), "sweep_mode": "suffix", "window": 3,
                     "sweep_index": "study", "sweep_steps": knockout.sweep_steps(None, kind)},
        "flow": {"blocks": list(range(n)), "token_blocks": sorted({max(depth - 1, 0), min(depth, n - 1)}),
                 "carried": True},
        "drop": {"blocks": ks, "check_removal": [ks[len(ks) // 2]]},
        "patching": {"blocks": blocks, "positions": positions, "pairs": patching.pair_file(pairs), "mode": "replace"},
    }
    if source_steps < 1:
        raise ValueError("--source-steps must be at least 1")
    lens.validate(out["lens"], config)
    lens.validate(out["study_lens"], config)
    knockout.validate(out["knockout"], config)
    flow.validate(out["flow"], config)
    drop.validate(out["drop"], config)
    patching.validate(out["patching"], config)
    return out


def describe_settings(args: argparse.Namespace) -> str:
    """What this invocation runs, in a few words: a report's title names it."""
    if args.study:
        return f"the study's {args.bucket} cells (--study)"
    return f"the five experiments, blocks {args.blocks} swept"


def summary_note(kind: str) -> str:
    note = (f"Colour threshold: CIEDE2000 {tables.THRESHOLD:g}. Rates follow the study's rules, relative to a "
            f"control (lens: {tables.RULES['present']}; knockout lost: {tables.RULES['lost']}; patching: "
            f"{tables.RULES['transferred']}); 'absolute' asks the output alone. The study scored with a VLM judge "
            "on klein-9B.")
    if kind == "organism":
        note += (" A model organism's routing is known by construction (docs/organisms.md): `direct` was trained "
                 "plainly, `text-routed` with the reference cut from the image and from the text content positions "
                 "in every block, so it can reach the image only through the text padding positions. The diagonal "
                 "T2I Lens's target runs the organism's own steps rather than the study's one: an organism draws no "
                 "shape or colour in one Euler step of its linear schedule.")
    return note




@dataclasses.dataclass(frozen=True)
class Outcome:
    """One model's run of the five experiments."""

    name: str  # the model's short name (a --model value, or a folder's name)
    kind: str
    run_path: Path
    report: Path
    settings: Mapping
    config: object  # the model's Flux2Config


def settings_of(args: argparse.Namespace, model: models.Spec, found: list | None) -> dict:
    """Every experiment's settings for one model (the run config's `settings`), checked against its
    architecture and, when they could be read, the tasks (the patching pairs)."""
    if args.study:
        settings = study.plan(model.config, args.bucket, model.kind, patching.pair_file(args.pairs))
    else:
        settings = plan(model.config, args.blocks, args.source_steps, model.kind, args.pairs)
    if found is not None and "patching" in settings:
        patching.check_tasks(settings["patching"], found)
    if args.probe:
        settings.update(probe_plan(model.config, model.kind))
    return settings


def probe_plan(config, kind: str) -> dict:
    """The collections of --probe: every block's text output at every step, with and without the reference."""
    every = {"sites": [f"b{b}.text.output" for b in range(config.num_blocks)], "keep_steps": "all",
             "chunk_tasks": collect.DEFAULT_CHUNK_TASKS[kind], "knockout": None, "knockout_layers": "all"}
    return {"collect": {**every, "reference": True}, "collect_t2i": {**every, "reference": False}}


def probe_sections(ctx, found: Sequence, settings: Mapping) -> list[report.Section]:
    """--probe: the two collections, then the probes of both (process 0 writes their files)."""
    stores = {"edit": collect.collect(ctx, found, settings["collect"], "collect"),
              "t2i": collect.collect(ctx, found, settings["collect_t2i"], "collect-t2i")}
    if not ctx.hosts.writer:
        return []
    rows = [row for name, store in stores.items() for row in probe.probe_store(store, name=name)]
    return [probe.section(ctx.run.path, rows, list(stores), num_double_blocks=ctx.model.config.depth,
                          notes="The stores: collect.zarr (the edit) and collect-t2i.zarr (no reference) in this "
                                "run folder.")]


def run_model(parser: argparse.ArgumentParser, args: argparse.Namespace, out: str, checked: cli.Checked,
              hosts: Hosts | None = None) -> Outcome:
    """The five experiments on `args.model`, into the run folder `out`, with inputs already checked;
    hosts: this process among those sharing the run folder (experiments.hosts)."""
    hosts = hosts or Hosts()
    spec, settings = checked.tasks, checked.settings
    model, model_record, placement = cli.load_model(parser, args, hosts)
    try:
        kind = model_record["kind"]
        config = {**cli.base_config(args, model, model_record, spec), "experiment": NAME, "settings": settings}
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(str(e))
    start = time.perf_counter()
    with cli.open_run(parser, out, config, hosts) as run:
        done = hosts.agree("nothing to do", run.nothing_to_do() if run.resumed and hosts.writer else None)
        if done is not None:
            path = run.path / "report.html"
            if hosts.writer:
                print(f"{run.path}: nothing to do: finished by this code, {done} cells intact; report: {path}")
            return Outcome(name=models.name(args.model), kind=kind, run_path=run.path, report=path,
                           settings=settings, config=model.config)
        ctx = cli.open_context(args, model, run, hosts, placement)
        ctx.judged_property = settings.get("property", "colour")
        found, pair_found = cli.load_run_tasks(parser, spec, run, hosts)
        try:
            if "patching" in settings:  # a bad pair file fails before any work
                patching.resolve_pairs(ctx, [*found, *pair_found], settings["patching"])
        except (ValueError, KeyError) as e:
            run.discard()
            cli.fail(parser, str(e))
        if hosts.writer:
            cli.announce(ctx, found, [name for name in EXPERIMENTS if name in settings])
        sections = lens.run(ctx, found, settings["lens"], "lens")
        if "study_lens" in settings:
            sections += lens.run(ctx, found, settings["study_lens"], "study-lens")
        for name, module in (("knockout", knockout), ("flow", flow), ("drop", drop), ("patching", patching)):
            if name in settings:  # the pair tasks resolve the patching pairs only
                sections += module.run(ctx, [*found, *pair_found] if name == "patching" else found, settings[name],
                                       name)
        if "collect" in settings:
            sections += probe_sections(ctx, found, settings)
        path = run.path / "report.html"
        counts = cli.cell_counts(run, hosts)
        if hosts.writer:  # the run's own files: process 0's, once every process's cells are done
            pairs_only = f"; {len(pair_found)} more that only resolve the patching pairs" if pair_found else ""
            intro = report.Section("Setup", [
                report.Text(f"{ctx.describe()}\n\n{len(found)} tasks: "
                            f"{', '.join(t.task_id for t in found)}{pairs_only}. "
                            f"This invocation took "
                            f"{time.perf_counter() - start:.0f} s"
                            f"{' (resumed)' if run.resumed else ''}."),
                study.table(run.path, settings, model.config, summary_note(kind))])
            title = describe_settings(args)
            path = report.write_run_report(run, f"{title[:1].upper()}{title[1:]}: {models.name(args.model)}",
                                           [intro, *sections], command=args.command)
            run.write_summary({"experiment": NAME, "tasks": len(found), "seconds": time.perf_counter() - start,
                               "resumed": run.resumed, "cells": counts})
            run.mark_finished()
            print(run.counts_line(counts))
    hosts.barrier("report written")  # every process goes on once process 0 has written the run's files
    if hosts.writer:
        print(f"report: {path}")
    return Outcome(name=models.name(args.model), kind=kind, run_path=run.path, report=path, settings=settings,
                   config=model.config)


def comparison_report(folder: Path, outcomes: Sequence[Outcome], args: argparse.Namespace) -> Path:
    """`folder/report.html`: the models' headline pass rates side by side, links to each model's report
    and grids, then their sweep plots side by side."""
    rows = {}
    for o in outcomes:
        for r in study.rows(o.run_path, o.settings):
            mark = {"yes": "; the study's number inside", "no": "; the study's number outside"}.get(
                r["study inside"], "")
            rows.setdefault(r["cell"], {"cell": r["cell"], "study": r["study"], "rule": r["rule"]})[o.name] = \
                None if r["this run"] is None else r["this run"] + mark
    names = [o.name for o in outcomes]
    kinds = {o.kind for o in outcomes}
    table = report.Table(title="The study's table: its cells beside each model's",
                         columns=["cell", "study", *names, "rule"],
                         rows=list(rows.values()), note=f"{study.mapping_note(outcomes[0].config)} Each model's "
                         "rate comes with its 95 % interval (Wilson) and whether the study's number lies inside it. "
                         f"{summary_note(kinds.pop() if len(kinds) == 1 else 'mixed')}")
    links = []
    for o in outcomes:
        report_file = o.report.relative_to(folder.resolve()).as_posix()
        sections = [(title, report.anchor(title)) for title in _grid_sections(o.settings)]
        links.append(report.Links(f"{o.name}:", [("full report (tables, plots, every setting)", report_file)]
                                  + [(title, f"{report_file}#{anchor}") for title, anchor in sections]))
    parts = [report.Section("The study's cells", [table]),
             report.Section("Each model's report and grids", [
                 report.Text("Each model's run folder has its own report: its tables, plots and, per experiment, "
                             "the per-task image grids (reference, baseline edit, text-to-image, then the cells)."),
                 *links])]
    plots = {}
    for o in outcomes:
        for png in sorted((o.run_path / "plots").glob("*.png")):
            plots.setdefault(png.stem, []).append((o, png))
    rows_of_plots = []
    for stem, found in plots.items():
        about = _plot_caption(found[0][1])
        rows_of_plots.append(report.FigureRow([report.Figure(path=png, caption=o.name) for o, png in found],
                                              caption=about or stem))
    if rows_of_plots:
        parts.append(report.Section("Block sweeps side by side", rows_of_plots))
    what = describe_settings(args)
    return report.write_report(folder, f"{what[:1].upper()}{what[1:]}: {', '.join(names)}", parts,
                               command=args.command)


def _grid_sections(settings: Mapping) -> list[str]:
    """The titles of a run report's per-task grid sections, in the order the experiments ran."""
    out = []
    if "lens" in settings:
        out.append(f"{lens.form_title(settings['lens'])}: per-task grids")
    if "study_lens" in settings:
        out.append(f"{lens.form_title(settings['study_lens'])}: per-task grids")
    for name, module, kind in (("knockout", knockout, "task"), ("drop", drop, "task"), ("patching", patching, "pair")):
        if name in settings:
            out.append(f"{module.TITLE}: per-{kind} grids")
    return out


def _plot_caption(png: Path) -> str:
    """A plot's title and caption in words (`experiments.tables.plot` writes them beside it)."""
    import json

    try:
        about = json.loads(png.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return ""
    return ": ".join(part for part in (about.get("title"), about.get("caption")) if part)


def counts(checked: cli.Checked) -> dict[str, str]:
    """What each experiment of one model's plan runs: '<n> tasks' or '<n> pairs'."""
    out = {}
    for name in ("lens", "study_lens", "knockout", "flow", "drop"):
        if name in checked.settings:
            out[name] = f"{len(checked.found)} tasks"
    if "patching" in checked.settings:
        pairs = patching.pairs_of(checked.settings["patching"], [*checked.found, *checked.pair_found])
        out["patching"] = f"{len(pairs)} pairs"
    if "collect" in checked.settings:
        out["probe"] = f"{len(checked.found)} tasks collected with and without the reference"
    return out


def print_plan(names: Sequence[str], checked: Sequence[cli.Checked]) -> None:
    for name, c in zip(names, checked):
        more = f", {len(c.pair_found)} more that only resolve pairs" if c.pair_found else ""
        print(f"plan for {name}: {len(c.found)} tasks{more}; nothing run")
        for experiment, count in counts(c).items():
            print(f"  {experiment}: {count}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cli.add_arguments(parser, out_default="runs/main", model_default=DEFAULT_MODELS,
                      colour_defaults=COLOUR_SUBSETS, pair_tasks=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = cli.command_line(NAME, argv)
    if args.study and args.bucket != "colour" and args.tasks is None:
        cli.fail(parser, f"--study --bucket {args.bucket}: give the bucket's task files with --tasks (the study's "
                         f"data/tasks/<bucket>/tasks.jsonl); only the colour bucket is generated")
    if args.quick and not args.study:
        cli.fail(parser, "--quick picks the quick subset of --study; the sweeps already run a subset")
    if args.study and not args.quick:  # the study's n on a model folder: the whole colour bucket
        args.colour_defaults = {k: v for k, v in args.colour_defaults.items() if k != "folder"}
    specs = [m.strip() for m in args.model.split(",") if m.strip()]
    if not specs:
        parser.error("--model: name at least one model")
    names = [models.name(m) for m in specs]
    if len(set(names)) != len(names):
        parser.error(f"--model {args.model}: the models need different names (their run folders are --out/<name>)")
    outs = [args.out] if len(specs) == 1 else [str(Path(args.out) / cli.slug(name)) for name in names]
    if args.verify:
        return cli.verify_folders([Path(out) for out in outs])
    hosts = Hosts() if args.check or args.plan else cli.start_hosts(parser, args)  # they start nothing
    try:
        if len(specs) > 1 and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: is a file; with several models --out is a folder of run folders")
        for out in outs:
            cli.check_out(out, NAME, hosts)
    except ValueError as e:
        cli.fail(parser, str(e))
    checked = cli.check_inputs(parser, args, specs, settings_of)  # every model, before any runs
    if args.plan:
        print_plan(names, checked)
        return 0
    if args.check:
        for c in checked:
            print(cli.checked_line(c))
        return 0
    if len(specs) == 1:
        run_model(parser, _with_model(args, specs[0]), args.out, checked[0], hosts)
        return 0
    folder = Path(args.out).resolve()
    outcomes = [run_model(parser, _with_model(args, m), str(folder / cli.slug(name)), c, hosts)
                for m, name, c in zip(specs, names, checked)]
    if hosts.writer:
        path = comparison_report(folder, outcomes, args)
        print(f"report: {path}")
    return 0


def _with_model(args: argparse.Namespace, model: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "model": model})


if __name__ == "__main__":
    raise SystemExit(main())
