"""Attention knockout: which attention edges carry the reference into the edit.

The study's experiment 3. "A->B" means information flows from A to B: the queries of group B may
not attend to the keys of group A. Settings (--settings) are edges among text, text[content],
text[padding], image and ref, e.g. ref->text, ref->image, ref->text[padding], ref->text[content],
text->ref, image->ref, image->text, text->image, and combinations joined by '+'
(ref->text+ref->image). Layer modes (--layers): 'all' blocks, a prefix ':k' (blocks 0..k-1), a
suffix 'k:' (blocks k..n-1), one block 'k', a range 'a:b', or a list 'a,b,c'. The knockout holds at
every denoising step. A setting that leaves some query with no key to attend to is refused.

Every (setting, layers) cell of a task, and every cell of the block sweep (--sweep: knockout from
block k on, k = 0..n, where k = n cuts nothing and equals the plain edit), runs as vmapped compiled
calls over the knockout tables. Compared against the baseline edit. A pass: the colour is kept (the
output's dominant colour within CIEDE2000 15 of the reference colour); "lost" is the complement.

    python -m experiments.knockout --settings ref->text ref->image --layers all :4 4: --sweep
    python -m experiments.knockout --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --chunk 2
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

from experiments import cli, grids, report, tables
from fluxjax import metrics
from experiments.context import Context

NAME = "knockout"
TITLE = "Attention knockout"
MAIN_SETTINGS = ("ref->text", "ref->image", "ref->text[padding]", "ref->text[content]")
OTHER_SETTINGS = ("text->ref", "image->ref", "image->text", "text->image")
MEANS = ("colour_de", "pass_absolute", "mad", "ssim")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("knockout")
    g.add_argument("--settings", nargs="+", default=list(MAIN_SETTINGS + OTHER_SETTINGS),
                   help="edges to cut, 'A->B' joined by '+' for combinations (default: the eight single edges)")
    g.add_argument("--layers", nargs="+", default=["all"],
                   help="layer modes: all, :k, k:, k, a:b, a,b,c (default: all)")
    g.add_argument("--sweep", nargs="*", default=None, metavar="SETTING",
                   help="block sweep, knockout from block k on for k = 0..n, of these settings (no value: "
                        "every --settings entry)")
    g.add_argument("--sweep-from", default=None,
                   help="the k of the sweep: 'a,b,c' or 'a:b' (default: every k = 0..n)")


def edges(setting: str) -> list[str]:
    return [e.strip() for e in setting.split("+") if e.strip()]


def question(setting: str) -> str:
    """The study's question of a setting: is the colour kept (ref->image alone) or lost (any other cut)?"""
    return "kept" if edges(setting) == ["ref->image"] else "lost"


def settings(args, config) -> dict:
    sweep = None if args.sweep is None else (list(args.sweep) or list(args.settings))
    n = config.num_blocks
    sweep_from = list(range(n + 1)) if args.sweep_from is None else cli.parse_blocks(args.sweep_from, n + 1)
    out = {"settings": list(dict.fromkeys(args.settings)), "layers": list(dict.fromkeys(args.layers)),
           "sweep": list(dict.fromkeys(sweep or [])), "sweep_from": sweep_from if sweep else []}
    validate(out, config)
    return out


def validate(s: Mapping, config) -> None:
    """Raise for an unknown edge, a bad layer mode, or a knockout that would empty some query."""
    import numpy as np

    from fluxjax.interventions import knockout
    from fluxjax.layout import TokenLayout

    # A stand-in layout with every token group present (content, padding, image, one reference).
    layout = TokenLayout(n_txt=4, img_grid=(1, 1), ref_grids=((1, 1),))
    content = np.array([True, True, False, False])
    if not s["settings"] and not s["sweep"]:
        raise ValueError("give at least one knockout setting")
    for setting in dict.fromkeys([*s["settings"], *s["sweep"]]):
        if not edges(setting):
            raise ValueError(f"knockout setting {setting!r} names no edge")
        for layers in s["layers"]:
            knockout(config, layout, content, edges(setting), cli.parse_blocks(layers, config.num_blocks))
    for k in s["sweep_from"]:
        if not 0 <= k <= config.num_blocks:
            raise ValueError(f"sweep start {k}: use 0..{config.num_blocks}")


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    from fluxjax.interventions import Interventions, knockout

    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    edit = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    n = ctx.num_blocks

    def cut(setting, blocks):
        table = knockout(ctx.model.config, edit.layout, edit.content_mask, edges(setting), blocks)
        return Interventions(knockout=table)

    cells, meta = [], []
    for setting in s["settings"]:
        for layers in s["layers"]:
            cells.append(cut(setting, cli.parse_blocks(layers, n)))
            meta.append(dict(setting=f"{setting} @ {layers}", edges=setting, layers=layers, from_block=None,
                             file=f"{cli.slug(setting)}--{cli.slug(layers)}.png"))
    for setting in s["sweep"]:
        for k in s["sweep_from"]:
            cells.append(cut(setting, range(k, n)))
            meta.append(dict(setting=f"{setting} from {k}", edges=setting, layers=f"{k}:", from_block=k,
                             file=f"sweep--{cli.slug(setting)}--from{k}.png"))
    images = ctx.sweep(edit, cells)

    rows = [tables.control_row(NAME, base["edit"], ref_lab, base["edit"], task=task.task_id,
                               setting="no knockout (edit)", edges=None, layers=None, from_block=None),
            tables.control_row(NAME, base["t2i"], ref_lab, base["edit"], task=task.task_id,
                               setting="t2i (no reference)", edges=None, layers=None, from_block=None)]
    edit_de = rows[0]["colour_de"]
    for m, image in zip(meta, images):
        file = m.pop("file")
        cell.write_image(file, image)
        bundle = [("reference", ctx.baseline_file(task, "reference")), ("baseline edit", ctx.baseline_file(task, "edit")),
                  ("output", ctx.file(cell, file))]
        rows.append(tables.judged_row(NAME, question(m["edges"]), bundle, image, ref_lab, edit_de, base["edit"],
                                      task=task.task_id, **m))
    return {"rows": rows}


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    main = [r for r in rows if r["from_block"] is None]
    swept = [r for r in rows if r["from_block"] is not None]
    rates, means = tables.write_tables(ctx.run, prefix, main, MEANS)
    items: list = [report.Text(
        f"Edges cut at every step in the blocks of each layer mode ({', '.join(s['layers'])}). mad / ssim: against "
        "the baseline edit. Controls: the edit itself and text-to-image without the reference (same seed)."),
        tables.rate_table("Colour lost (or, for ref->image, kept) per setting", rates),
        tables.means_table("Means per setting", means, MEANS)]
    if swept:
        ctx.run.write_derived(f"{prefix}-sweep-metrics.csv", metrics.rows_to_csv(swept))
        ks = list(s["sweep_from"])
        cfg = ctx.model.config
        de = tables.series_by_block(swept, ks, "edges", "from_block", "colour_de")
        items.append(tables.plot(ctx.run, f"{prefix}-sweep-colour-distance", ks, de,
                                 ylabel="CIEDE2000 to reference colour", threshold=tables.THRESHOLD,
                                 xlabel=f"knockout from block k on (k = {cfg.num_blocks}: none)",
                                 num_double_blocks=cfg.depth, title=f"{TITLE}: block sweep",
                                 caption="Mean colour distance to the reference colour when the edges are cut from "
                                         "block k on (higher: the colour is lost)"))
        mad = tables.series_by_block(swept, ks, "edges", "from_block", "mad")
        items.append(tables.plot(ctx.run, f"{prefix}-sweep-change", ks, mad, ylabel="mean |pixel diff| vs edit",
                                 xlabel=f"knockout from block k on (k = {cfg.num_blocks}: none)",
                                 num_double_blocks=cfg.depth, title=f"{TITLE}: block sweep",
                                 caption="Change against the baseline edit (0 at k = n: nothing cut)"))
    return [report.Section(TITLE, items), tables.task_grids(ctx.run, f"{TITLE}: per-task grids", prefix, tasks, rows,
                                                             functools.partial(_grid, ctx, s, prefix))]


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    grid_rows = [tables.baseline_panels(base, mine["no knockout (edit)"], mine["t2i (no reference)"])]
    for setting in s["settings"]:
        grid_rows.append([grids.Panel(f"{setting}, blocks {layers}",
                                       cell.load_image(f"{cli.slug(setting)}--{cli.slug(layers)}.png"),
                                       tables.de_caption(mine[f"{setting} @ {layers}"])) for layers in s["layers"]])
    for setting in s["sweep"]:
        grid_rows.append([grids.Panel(f"{setting}, from block {k}",
                                       cell.load_image(f"sweep--{cli.slug(setting)}--from{k}.png"),
                                       tables.de_caption(mine[f"{setting} from {k}"])) for k in s["sweep_from"]])
    return tables.write_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png",
                             f"{TITLE}: {task.task_id} ({task.instruction!r})", grid_rows)


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
