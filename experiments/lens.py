"""T2I Lens: read what an edit's text stream carries with a text-to-image run.

The study's experiments 1 and 2. Run the edit (instruction + reference, the task's noise seed) for
--source-steps steps (default 1, as the study) and keep the text stream at the output of block k
(at the last source step). Then run text-to-image from the empty prompt "" with no reference and
the noise of seed + 1 for --steps steps, with the text stream fed to block 0 (site BLOCK0_INPUT,
the output of the text input projection) replaced by the kept activations at every step: at all
text positions, only text[padding], or only text[content] (--positions; content = the
instruction's tokens in the edit's prompt). The other positions keep the empty prompt's values.

Compared against t2i_clean (the instruction, no reference, seed + 1) and the baseline edit. A pass:
the output's dominant colour is within CIEDE2000 15 of the reference colour (the reference
property appears).

A sweep (--sweep or --blocks) captures every block in one source run and runs every
(positions, block) cell as vmapped compiled calls; it ends in plots of colour distance and pass
rate against the block.

    python -m experiments.lens --sweep --colours red,blue --objects circle --seeds 0
    python -m experiments.lens --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --block 17
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
CRITERION = f"reference colour present: CIEDE2000(output's dominant colour, reference colour) <= {tables.THRESHOLD:g}"
MEANS = ("colour_de", "colour_match", "mad", "ssim")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("T2I Lens")
    cli.add_block_arguments(g, "default: the last double block, the study's style cell")
    g.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS),
                   help="which text positions are replaced (default: all padding content)")
    g.add_argument("--source-steps", type=int, default=1, help="steps of the source edit (default 1, as the study)")


def settings(args, config) -> dict:
    if args.source_steps < 1:
        raise ValueError("--source-steps must be at least 1")
    out = {"blocks": cli.blocks_from_args(args, config.num_blocks, config.depth - 1),
           "positions": list(dict.fromkeys(args.positions)), "source_steps": args.source_steps}
    validate(out, config)
    return out


def validate(s: Mapping, config) -> None:
    if not s["blocks"] or any(not 0 <= b < config.num_blocks for b in s["blocks"]):
        raise ValueError(f"lens blocks {s['blocks']}: this model has blocks 0..{config.num_blocks - 1}")
    unknown = set(s["positions"]) - set(POSITIONS)
    if unknown or not s["positions"]:
        raise ValueError(f"lens positions {s['positions']}: choose among {list(POSITIONS)}")


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    from fluxjax.interventions import BLOCK0_INPUT, Capture, Interventions, substitution

    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    blocks = tuple(s["blocks"])
    source = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    source_options = dataclasses.replace(ctx.options, num_steps=s["source_steps"])
    pixels, captures = ctx.sample(source, capture=Capture(text=blocks), options=source_options)
    cell.write_image("source.png", pixels[0])
    kept = captures.text[-1]  # [n_blocks, 1, T, D] at the last source step
    target = ctx.edit("", None, task.seed + 1, task.height, task.width)

    cells, labels = [], []
    for pos in s["positions"]:
        mask = source.text_mask(pos)
        for j, k in enumerate(blocks):
            cells.append(Interventions(substitutions=(substitution(BLOCK0_INPUT, kept[j], mask),)))
            labels.append((pos, k))
    images = ctx.sweep(target, cells)

    rows = [tables.colour_row(base["edit"], ref_lab, base["edit"], task=task.task_id, setting="baseline edit",
                              positions=None, block=None),
            tables.colour_row(base["t2i-next-seed"], ref_lab, base["edit"], task=task.task_id, setting="t2i_clean",
                              positions=None, block=None)]
    for (pos, k), image in zip(labels, images):
        cell.write_image(f"{pos}-b{k}.png", image)
        rows.append(tables.colour_row(image, ref_lab, base["edit"], task=task.task_id, setting=f"{pos} b{k}",
                                      positions=pos, block=k))
    return {"rows": rows}


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    """Every task's lens cell, then the tables, plots, grids and report sections."""
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    rates, means = tables.write_tables(ctx.run, prefix, rows, pass_key="colour_match", criterion=CRITERION,
                                       threshold=tables.THRESHOLD, columns=MEANS)
    items: list = [report.Text(
        f"Source: the edit run for {s['source_steps']} step(s), text stream kept at the output of block k. Target: "
        f"empty prompt, no reference, seed + 1, {ctx.options.num_steps} steps, the text stream fed to block 0 "
        f"replaced at the {', '.join(s['positions'])} positions. Controls: the baseline edit and t2i_clean (the "
        f"instruction, no reference, seed + 1). mad / ssim: against the baseline edit."),
        tables.rate_table("Pass rates", rates), tables.means_table("Means per setting", means, MEANS)]
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
        rate = tables.series_by_block(swept, blocks, "positions", "block", "colour_match")
        items.append(tables.plot(ctx.run, f"{prefix}-pass-rate", blocks, rate, ylabel="share with the reference colour",
                                 caption="Pass rate by source block", ylim=(-0.05, 1.05),
                                 num_double_blocks=ctx.model.config.depth, title=TITLE))
    return [report.Section(f"{TITLE}: all, padding-only and content-only positions", items),
            tables.task_grids(ctx.run, f"{TITLE}: per-task grids", prefix, tasks, rows,
                              functools.partial(_grid, ctx, s, prefix))]


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    top = [grids.Panel("reference", base["reference"]),
           grids.Panel("baseline edit", base["edit"], tables.de_caption(mine["baseline edit"])),
           grids.Panel("t2i_clean (seed + 1)", base["t2i-next-seed"], tables.de_caption(mine["t2i_clean"])),
           grids.Panel(f"source edit ({s['source_steps']} step)", cell.load_image("source.png"))]
    return tables.write_sweep_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png",
                                   f"{TITLE}: {task.task_id} ({task.instruction!r})", top, cell, s["positions"],
                                   s["blocks"], mine, tables.de_caption, "lens")


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
