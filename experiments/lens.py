"""T2I Lens: read what an edit's text stream carries with a text-to-image run.

The study's experiments 1 and 2. Run the edit (instruction + reference, the task's noise seed) for
--source-steps steps (default 1, as the study) and keep the text stream at the output of block k
(at the last source step). Then run text-to-image from the empty prompt "" with no reference and
the noise of seed + 1, with a text stream replaced at every step by the kept activations: at all
text positions, only text[padding], or only text[content] (--positions; content = the
instruction's tokens in the edit's prompt). The other positions keep the empty prompt's values.
Which stream is replaced is the form (--form):

    input      the text stream fed to block 0 (site BLOCK0_INPUT, the output of the text input
               projection); the target runs the model's steps (the study's style, identity,
               add and remove cells: block 7 -> block 0, four steps)
    diagonal   the text stream at the output of the same block k (a substitution at site k); the
               target runs --target-steps steps, default 1 (the study's colour cell: block 17, one
               step, against a one-step t2i_clean)

Compared against t2i_clean (the instruction, no reference, seed + 1, the target's step count), the
unconditional baseline (the target unpatched: the empty prompt, no reference) and the baseline
edit. A pass (the study's rule): the reference colour is present in the output and
absent from t2i_clean; the absolute rate (present in the output) is reported beside it.

A sweep (--sweep or --blocks) captures every block in one source run and runs every
(positions, block) cell as vmapped compiled calls; it ends in plots of colour distance and pass
rate against the block.

    python -m experiments.lens --sweep --colours red,blue --objects circle --seeds 0
    python -m experiments.lens --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --form diagonal --block 17
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence

from experiments import cli, grids, report, tables
from experiments.context import Context
from experiments.sweep import POSITIONS

NAME = "lens"
TITLE = "T2I Lens"
FORMS = ("input", "diagonal")
MEANS = ("colour_de", "pass_absolute", "mad", "ssim")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("T2I Lens")
    cli.add_block_arguments(g, "default: the last double block, the study's style cell")
    g.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS),
                   help="which text positions are replaced (default: all padding content)")
    g.add_argument("--source-steps", type=int, default=1, help="steps of the source edit (default 1, as the study)")
    g.add_argument("--form", choices=FORMS, default="input",
                   help="input: block k's output fed to block 0; diagonal: block k's output replaces the target's "
                        "at block k (default input)")
    g.add_argument("--target-steps", type=int, default=None,
                   help="steps of the target and t2i_clean runs (default: the model's for --form input, 1 for "
                        "--form diagonal, as the study)")


def settings(args, config) -> dict:
    target_steps = args.target_steps if args.target_steps is not None else (1 if args.form == "diagonal" else None)
    out = {**cli.sweep_settings(args, config), "source_steps": args.source_steps, "form": args.form,
           "target_steps": target_steps}
    return out


def validate(s: Mapping, config) -> None:
    cli.check_blocks_and_positions("lens", s, config)
    if s["form"] not in FORMS:
        raise ValueError(f"lens form {s['form']!r}: choose among {list(FORMS)}")
    if s["source_steps"] < 1 or (s["target_steps"] is not None and s["target_steps"] < 1):
        raise ValueError("the lens's source and target runs need at least one step")


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    from fluxjax.interventions import BLOCK0_INPUT, Capture, Interventions, substitution

    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    blocks = tuple(s["blocks"])
    source = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    pixels, captures = ctx.sample(source, capture=Capture(text=blocks), options=_steps(ctx, s["source_steps"]))
    cell.write_image("source.png", pixels[0])
    kept = captures.text[-1]  # [n_blocks, 1, T, D] at the last source step
    target_options = _steps(ctx, s["target_steps"])
    if target_options.num_steps == ctx.options.num_steps:
        clean, clean_file = base["t2i-next-seed"], ctx.baseline_file(task, "t2i-next-seed")
    else:  # t2i_clean with the target's step count
        clean = ctx.sample(ctx.edit(task.instruction, None, task.seed + 1, task.height, task.width),
                           options=target_options)[0][0]
        clean_file = ctx.file(cell, "t2i-clean.png")
        cell.write_image("t2i-clean.png", clean)
    target = ctx.edit("", None, task.seed + 1, task.height, task.width)
    cells, labels = [], []
    for pos in s["positions"]:
        for j, k in enumerate(blocks):
            site = BLOCK0_INPUT if s["form"] == "input" else k
            cells.append(Interventions(substitutions=(substitution(site, kept[j], source.text_mask(pos)),)))
            labels.append((pos, k))
    images = ctx.sweep(target, cells, options=target_options)
    unconditional = ctx.sample(target, options=target_options)[0][0]  # the target unpatched
    cell.write_image("unconditional.png", unconditional)

    rows = [tables.control_row(NAME, ctx.judged_property, image, ref_lab, base["edit"], task=task.task_id,
                               setting=setting, positions=None, block=None)
            for image, setting in ((base["edit"], "baseline edit"), (clean, "t2i_clean"))]
    rows.append(tables.control_row(NAME, ctx.judged_property, unconditional, ref_lab, base["edit"], task=task.task_id,
                                   setting="unconditional (empty prompt)", positions=None, block=None))
    clean_de = rows[1]["colour_de"]
    for (pos, k), image in zip(labels, images):
        cell.write_image(f"{pos}-b{k}.png", image)
        bundle = [("reference", ctx.baseline_file(task, "reference")), ("t2i_clean", clean_file),
                  ("output", ctx.file(cell, f"{pos}-b{k}.png"))]
        rows.append(tables.judged_row(NAME, ctx.judged_property, "present", bundle, image, ref_lab, clean_de,
                                      base["edit"], task=task.task_id, setting=f"{pos} b{k}", positions=pos, block=k))
    return {"rows": rows}


def _steps(ctx: Context, steps: int | None):
    return ctx.options if steps is None else dataclasses.replace(ctx.options, num_steps=steps)


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    """Every task's lens cell, then the tables, plots, grids and report sections."""
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    items = tables.write_tables(ctx.run, prefix, rows, MEANS, rates_title="Pass rates", text=(
        f"Source: the edit run for {s['source_steps']} step(s), text stream kept at the output of block k. Target: "
        f"empty prompt, no reference, seed + 1, {_steps(ctx, s['target_steps']).num_steps} step(s), the text stream "
        f"{'fed to block 0' if s['form'] == 'input' else 'at the output of block k'} replaced at the "
        f"{', '.join(s['positions'])} positions ({s['form']} form). Controls: the baseline edit and t2i_clean (the "
        f"instruction, no reference, seed + 1, the target's steps). mad / ssim: against the baseline edit."))
    blocks = list(s["blocks"])
    if len(blocks) > 1:
        swept = [r for r in rows if r["block"] is not None]
        clean = [r["colour_de"] for r in rows if r["setting"] == "t2i_clean"]
        de = tables.series_by_block(swept, blocks, "positions", "block", "colour_de")
        de["t2i_clean (control)"] = [sum(clean) / len(clean)] * len(blocks)
        items.append(tables.plot(ctx.run, f"{prefix}-colour-distance", blocks, de,
                                 ylabel="CIEDE2000 to reference colour",
                                 caption="Mean colour distance of the lens output to the reference colour, by source "
                                         "block (lower: the colour appears)", threshold=tables.THRESHOLD,
                                 num_double_blocks=ctx.model.config.depth, title=TITLE))
        rate = tables.series_by_block(swept, blocks, "positions", "block", "pass")
        items.append(tables.plot(ctx.run, f"{prefix}-pass-rate", blocks, rate,
                                 ylabel="share passing (the study's rule)",
                                 caption="Pass rate by source block", ylim=(-0.05, 1.05),
                                 num_double_blocks=ctx.model.config.depth, title=TITLE))
    return [report.Section(f"{TITLE}: all, padding-only and content-only positions", items),
            tables.task_grids(ctx.run, f"{TITLE}: per-task grids", prefix, tasks, rows,
                              functools.partial(_grid, ctx, s, prefix))]


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    top = [grids.Panel("reference", base["reference"]),
           grids.Panel("baseline edit", base["edit"], tables.de_caption(mine["baseline edit"])),
           grids.Panel("t2i_clean (seed + 1)", _clean_image(ctx, task, s, cell), tables.de_caption(mine["t2i_clean"])),
           grids.Panel(f"source edit ({s['source_steps']} step)", cell.load_image("source.png")),
           grids.Panel("unconditional (target unpatched)", cell.load_image("unconditional.png"),
                       tables.de_caption(mine["unconditional (empty prompt)"]))]
    return tables.write_sweep_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png",
                                   f"{TITLE}: {task.task_id} ({task.instruction!r})", top, cell, s["positions"],
                                   s["blocks"], mine, tables.de_caption, "lens")


def _clean_image(ctx: Context, task, s: Mapping, cell):
    if _steps(ctx, s["target_steps"]).num_steps == ctx.options.num_steps:
        return ctx.baselines(task)["t2i-next-seed"]
    return cell.load_image("t2i-clean.png")


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
