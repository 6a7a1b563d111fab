"""Attention knockout: which attention edges carry the reference into the edit.

The study's experiment 3. "A->B" means information flows from A to B: the queries of group B may
not attend to the keys of group A. Settings (--settings) are edges among text, text[content],
text[padding], image and ref, e.g. ref->text, ref->image, ref->text[padding], ref->text[content],
text->ref, image->ref, image->text, text->image, and combinations joined by '+'
(ref->text+ref->image), and the study's own names of its group and composite settings:
'image+text->ref' (sources joined before one arrow: image->ref and text->ref), 'image+ref->text',
'image<->ref' (both directions) and 'text[padding]+ref->image' (text[padding]->image and
ref->image). Layer modes (--layers): 'all' blocks, a prefix ':k' (blocks 0..k-1), a suffix 'k:'
(blocks k..n-1), one block 'k', a range 'a:b', or a list 'a,b,c'. The knockout holds at every
denoising step. A setting that leaves some query with no key to attend to is refused.

Every (setting, layers) cell of a task, and every cell of the block sweep (--sweep), runs as
vmapped compiled calls over the knockout tables. The sweep's index is the study's by default
(--sweep-index study: L = 0..n-1; prefix mode cuts blocks 0..L, suffix L..n-1, individual L, window
L..L+W-1) and it runs one denoising step on a model folder, as the study's sweeps (--sweep-steps;
an organism keeps its own steps: one Euler step of its schedule draws nothing), against a plain
edit of the same steps. --sweep-index project is this project's: k = 0..n, prefix cutting blocks
0..k-1 and suffix k..n-1 (k = n cuts nothing and gives the plain edit back). A pass follows the
study's rule, relative to the baseline edit (experiments.tables.RULES): `ref->image` alone asks
whether the colour is kept, every other setting whether it is lost; the colour is there when the
output's dominant colour is within CIEDE2000 15 of the reference colour. The absolute rate asks the
output alone. Rows say where the rate is no finding: a setting whose edges the model was trained
without (an organism's routing cuts: it cuts nothing), and outputs destroyed rather than recoloured
(no object drawn, or a change over twice the text-to-image baseline's).

    python -m experiments.knockout --settings ref->text ref->image --layers all :4 4: --sweep
    python -m experiments.knockout --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --chunk 2
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

from experiments import cli, grids, models, report, tables
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
                   help="block sweep of these settings (no value: every --settings entry), over k in the layer "
                        "mode of --sweep-mode")
    g.add_argument("--sweep-mode", choices=tuple(SWEEP_MODES), default="suffix",
                   help="suffix: blocks k..n-1 (k = 0..n); prefix: blocks 0..k-1 (k = 0..n); individual: block k "
                        "alone; window: blocks k..k+W-1 (default suffix)")
    g.add_argument("--window", type=int, default=3, help="the window mode's width W (default 3)")
    g.add_argument("--sweep-from", default=None,
                   help="the k of the sweep: 'a,b,c' or 'a:b' (default: every k of the mode)")
    g.add_argument("--sweep-index", choices=SWEEP_INDICES, default="study",
                   help="study: L = 0..n-1, prefix cutting blocks 0..L (the study's layer sweep); project: k = 0..n, "
                        "prefix cutting blocks 0..k-1, suffix k = n cutting nothing (default study)")
    g.add_argument("--sweep-steps", type=int, default=None,
                   help="denoising steps of the sweep's cells and of the plain edit they are compared with (default: "
                        "1 on a model folder, as the study's sweeps; an organism's own steps; 0: the model's steps)")


# Layer modes of a block sweep: the blocks cut at sweep value k (n blocks, window w), the k a full
# sweep takes, and the label and file-name part of each.
SWEEP_MODES = {
    "suffix": (lambda k, n, w: range(k, n), lambda n, w: range(n + 1), "from {k}", "from{k}"),
    "prefix": (lambda k, n, w: range(0, k), lambda n, w: range(n + 1), "before {k}", "to{k}"),
    "individual": (lambda k, n, w: range(k, k + 1), lambda n, w: range(n), "at {k}", "at{k}"),
    "window": (lambda k, n, w: range(k, k + w), lambda n, w: range(n - w + 1), "in {k}..{end}", "win{k}"),
}


# The study's index of its layer sweep (its experiments/attention_knockout): L = 0..n-1 in every mode
# but the window's, its prefix cutting blocks 0..L (inclusive), so L = n-1 cuts every block.
STUDY_SWEEP_MODES = {
    "suffix": (lambda k, n, w: range(k, n), lambda n, w: range(n), "from {k}", "from{k}"),
    "prefix": (lambda k, n, w: range(0, k + 1), lambda n, w: range(n), "through {k}", "thru{k}"),
    "individual": SWEEP_MODES["individual"],
    "window": SWEEP_MODES["window"],
}
SWEEP_INDICES = ("study", "project")


def _modes(s: Mapping) -> Mapping:
    """The sweep modes of the settings' index (settings written before the index was a choice: the project's)."""
    return STUDY_SWEEP_MODES if s.get("sweep_index", "project") == "study" else SWEEP_MODES


def sweep_cell(s: Mapping, setting: str, k: int, n: int) -> tuple[range, str, str]:
    """The blocks cut at sweep value k of the settings' mode, the row's setting label and its image's file."""
    cut, _, label, file = _modes(s)[s["sweep_mode"]]
    w = s["window"]
    return (cut(k, n, w), f"{setting} {label.format(k=k, end=k + w - 1)}",
            f"sweep--{cli.slug(setting)}--{file.format(k=k)}.png")


def sweep_axis_label(s: Mapping) -> str:
    """The x axis of a sweep plot: what k cuts, in the settings' index."""
    cut = {"suffix": "blocks k..n-1", "prefix": "blocks 0..k" if s.get("sweep_index", "project") == "study" else
           "blocks 0..k-1", "individual": "block k", "window": "blocks k..k+W-1"}[s["sweep_mode"]]
    which = "the study's index" if s.get("sweep_index", "project") == "study" else "this project's index"
    return f"k ({which}): knockout in {cut}"


def edges(setting: str) -> list[str]:
    """The 'A->B' edges of a setting: edges joined by '+' ('ref->text+ref->image'); sources joined by '+'
    before one arrow, the study's group settings ('image+text->ref': image->ref and text->ref); and
    'A<->B', both directions (the study's 'image<->ref'). A source left without an arrow is an error."""
    out, pending = [], []
    for part in (p.strip() for p in setting.split("+")):
        if not part:
            continue
        if "<->" in part:
            a, b = (x.strip() for x in part.split("<->", 1))
            if pending or not a or not b:
                raise ValueError(f"knockout setting {setting!r}: write 'A<->B' alone between '+'")
            out += [f"{a}->{b}", f"{b}->{a}"]
        elif "->" in part:
            source, dest = (x.strip() for x in part.split("->", 1))
            out += [f"{src}->{dest}" for src in [*pending, source]]
            pending = []
        else:
            pending.append(part)
    if pending:
        raise ValueError(f"knockout setting {setting!r}: {' + '.join(pending)} has no '->' destination; "
                         "write edges as 'A->B' (e.g. 'ref->text', 'image+text->ref')")
    return list(dict.fromkeys(out))


def _stand_in():
    """A layout with every token group present (content, padding, image, one reference), and its content mask."""
    import numpy as np

    from fluxjax.layout import TokenLayout

    return TokenLayout(n_txt=4, img_grid=(1, 1), ref_grids=((1, 1),)), np.array([True, True, False, False])


@functools.lru_cache(maxsize=256)
def cut_in_training(setting: str, config, trained_cuts: tuple[str, ...]) -> bool:
    """Whether the model was trained with every edge of `setting` cut (an organism's routing cuts,
    `ModelBackend.trained_cuts`): such a knockout cuts nothing the model ever used, so its output is
    the baseline edit's and its rate no finding about the model's routing."""
    import numpy as np

    from fluxjax.interventions import knockout

    if not trained_cuts:
        return False
    layout, content = _stand_in()
    cut = ~np.asarray(knockout(config, layout, content, edges(setting), "all").allowed)
    open_in_training = np.asarray(knockout(config, layout, content, list(trained_cuts), "all").allowed)
    return not np.any(cut & open_in_training)


def question(setting: str) -> str:
    """The study's question of a setting: is the colour kept (ref->image alone) or lost (any other cut)?"""
    return "kept" if edges(setting) == ["ref->image"] else "lost"


def settings(args, config) -> dict:
    sweep = None if args.sweep is None else (list(args.sweep) or list(args.settings))
    n = config.num_blocks
    if args.sweep_mode not in SWEEP_MODES:
        raise ValueError(f"--sweep-mode {args.sweep_mode}: choose among {list(SWEEP_MODES)}")
    problems = []
    for layers in args.layers:
        try:
            cli.parse_blocks(layers, n, "--layers")
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise cli.InputErrors(problems)
    if args.sweep is not None and not 1 <= args.window <= n:
        raise ValueError(f"--window {args.window}: give a width of 1..{n} blocks")
    modes = STUDY_SWEEP_MODES if args.sweep_index == "study" else SWEEP_MODES
    every = list(modes[args.sweep_mode][1](n, args.window))
    sweep_from = every if args.sweep_from is None else cli.parse_blocks(args.sweep_from, n + 1, "--sweep-from")
    out = {"settings": list(dict.fromkeys(args.settings)), "layers": list(dict.fromkeys(args.layers)),
           "sweep": list(dict.fromkeys(sweep or [])), "sweep_from": sweep_from if sweep else [],
           "sweep_mode": args.sweep_mode, "window": args.window, "sweep_index": args.sweep_index,
           "sweep_steps": sweep_steps(args.sweep_steps, models.kind(args.model))}
    return out


def sweep_steps(given: int | None, model_kind: str) -> int | None:
    """The sweep's steps for --sweep-steps (None: the model's): 1 on a model folder by default, as the
    study's sweeps; an organism's own steps (one Euler step of its schedule draws nothing)."""
    if given is None:
        return 1 if model_kind == "folder" else None
    if given < 0:
        raise ValueError(f"--sweep-steps {given}: give a number of steps, or 0 for the model's")
    return given or None


def validate(s: Mapping, config) -> None:
    """Raise for an unknown edge, a bad layer mode, or a knockout that would empty some query."""
    from fluxjax.interventions import knockout

    layout, content = _stand_in()
    if not s["settings"] and not s["sweep"]:
        raise ValueError("give at least one knockout setting")
    for setting in dict.fromkeys([*s["settings"], *s["sweep"]]):
        if not edges(setting):
            raise ValueError(f"knockout setting {setting!r} names no edge")
        for layers in s["layers"]:
            try:
                knockout(config, layout, content, edges(setting), cli.parse_blocks(layers, config.num_blocks))
            except ValueError as e:
                raise ValueError(f"knockout setting {setting!r}, layers {layers!r}: {e}") from None
    mode, n, w = s["sweep_mode"], config.num_blocks, s["window"]
    if mode not in SWEEP_MODES or not 1 <= w <= n:
        raise ValueError(f"sweep mode {mode!r}, window {w}: choose a mode among {list(SWEEP_MODES)} and 1 <= W <= {n}")
    if s.get("sweep_index", "project") not in SWEEP_INDICES:
        raise ValueError(f"sweep index {s['sweep_index']!r}: choose among {list(SWEEP_INDICES)}")
    if s.get("sweep_steps") is not None and s["sweep_steps"] < 1:
        raise ValueError(f"sweep steps {s['sweep_steps']}: give at least one step")
    valid = list(_modes(s)[mode][1](n, w))
    for k in s["sweep_from"]:
        if k not in valid:
            raise ValueError(f"sweep k {k} of mode {mode}: use {valid[0]}..{valid[-1]}")


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    from experiments.backend import backend
    from fluxjax.interventions import Interventions, knockout

    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    edit = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    n = ctx.num_blocks

    def cut(setting, blocks, allow_empty=False):
        table = knockout(ctx.model.config, edit.layout, edit.content_mask, edges(setting), blocks,
                         allow_empty=allow_empty)
        return Interventions(knockout=table)

    cells, meta = [], []
    for setting in s["settings"]:
        for layers in s["layers"]:
            cells.append(cut(setting, cli.parse_blocks(layers, n)))
            meta.append(dict(setting=f"{setting} @ {layers}", edges=setting, layers=layers, from_block=None,
                             file=f"{cli.slug(setting)}--{cli.slug(layers)}.png"))
    swept, swept_meta = [], []
    for setting in s["sweep"]:
        for k in s["sweep_from"]:
            blocks, label, file = sweep_cell(s, setting, k, n)
            swept.append(cut(setting, blocks, allow_empty=True))  # project index, k = n (suffix) or 0 (prefix): none
            swept_meta.append(dict(setting=label, edges=setting, layers=f"{blocks.start}:{blocks.stop}", from_block=k,
                                   sweep_mode=s["sweep_mode"], sweep_index=s.get("sweep_index", "project"),
                                   file=file))
    options = sweep_options(ctx, s)
    together = swept and options.num_steps == ctx.options.num_steps  # one structure, one compiled sweep
    images = list(ctx.sweep(edit, cells + swept if together else cells)) if cells or together else []
    swept_images = images[len(cells):] if together else None

    rows = [tables.control_row(NAME, ctx.judged_property, base["edit"], ref_lab, base["edit"], task=task.task_id,
                               setting="no knockout (edit)", edges=None, layers=None, from_block=None),
            tables.control_row(NAME, ctx.judged_property, base["t2i"], ref_lab, base["edit"], task=task.task_id,
                               setting="t2i (no reference)", edges=None, layers=None, from_block=None)]
    edit_de, t2i_mad = rows[0]["colour_de"], rows[1]["mad"]
    trained_cuts = backend(ctx.model).trained_cuts
    for m, image in zip(meta, images):
        file = m.pop("file")
        cell.write_image(file, image)
        bundle = ctx.against_edit(task, cell, file)
        row = tables.judged_row(NAME, ctx.judged_property, question(m["edges"]), bundle, image, ref_lab, edit_de,
                                base["edit"], task=task.task_id, **m)
        row["trained_cut"] = cut_in_training(m["edges"], ctx.model.config, trained_cuts)
        row["destroyed"] = tables.destroyed(image, row["mad"], t2i_mad)
        rows.append(row)
    if swept:
        plain, bundle_edit = base["edit"], ctx.baseline_file(task, "edit")
        if options.num_steps != ctx.options.num_steps:  # the sweep's own plain edit, of its steps
            plain = ctx.sample(edit, options=options)[0][0]
            cell.write_image(SWEEP_EDIT, plain)
            bundle_edit = ctx.file(cell, SWEEP_EDIT)
            rows.append(tables.control_row(NAME, ctx.judged_property, plain, ref_lab, plain, task=task.task_id,
                                           setting=f"no knockout (edit, {options.num_steps} step sweep)", edges=None,
                                           layers=None, from_block=None))
        plain_de = metrics.colour_error(plain, ref_lab)
        if swept_images is None:
            swept_images = ctx.sweep(edit, swept, options=options)
        for m, image in zip(swept_meta, swept_images):
            file = m.pop("file")
            cell.write_image(file, image)
            bundle = [("reference", ctx.baseline_file(task, "reference")), ("baseline edit", bundle_edit),
                      ("output", ctx.file(cell, file))]
            row = tables.judged_row(NAME, ctx.judged_property, question(m["edges"]), bundle, image, ref_lab,
                                    plain_de, plain, task=task.task_id, sweep_steps=options.num_steps, **m)
            row["trained_cut"] = cut_in_training(m["edges"], ctx.model.config, trained_cuts)
            if options.num_steps == ctx.options.num_steps:  # the text-to-image baseline's change is of these steps
                row["destroyed"] = tables.destroyed(image, row["mad"], t2i_mad)
            rows.append(row)
    return {"rows": rows}


SWEEP_EDIT = "sweep-edit.png"  # the plain edit of the sweep's steps, where they differ from the model's


def sweep_options(ctx: Context, s: Mapping):
    """The sampler options of the sweep's cells: the model's, with the settings' sweep steps."""
    import dataclasses

    steps = s.get("sweep_steps")
    return ctx.options if steps is None else dataclasses.replace(ctx.options, num_steps=int(steps))


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    main = [r for r in rows if r["from_block"] is None and "step sweep" not in r["setting"]]
    swept = [r for r in rows if r["from_block"] is not None]
    items = tables.write_tables(
        ctx.run, prefix, main, MEANS, rates_title="Colour lost (or, for ref->image, kept) per setting", text=(
            f"Edges cut at every step in the blocks of each layer mode ({', '.join(s['layers'])}). mad / ssim: "
            "against the baseline edit. Controls: the edit itself and text-to-image without the reference (same "
            "seed)."), control="no knockout (edit)")
    if swept:
        ctx.run.write_derived(f"{prefix}-sweep-metrics.csv", metrics.rows_to_csv(swept))
        ks = list(s["sweep_from"])
        cfg = ctx.model.config
        steps = sweep_options(ctx, s).num_steps
        plain = [r for r in rows if "step sweep" in r["setting"]] or \
            [r for r in rows if r["setting"] == "no knockout (edit)"]  # the plain edit of the sweep's steps
        rates = tables.pass_rates([*plain, *swept], control=plain[0]["setting"])
        ctx.run.write_derived(f"{prefix}-sweep-pass-rates.csv", metrics.rows_to_csv(rates))
        items.append(tables.rate_table(f"Block sweep ({s['sweep_mode']}, {steps} step(s))", rates,
                                       note=f"x: {sweep_axis_label(s)}."))
        de = tables.series_by_block(swept, ks, "edges", "from_block", "colour_de")
        items.append(tables.plot(ctx.run, f"{prefix}-sweep-colour-distance", ks, de,
                                 ylabel="CIEDE2000 to reference colour", threshold=tables.THRESHOLD,
                                 xlabel=sweep_axis_label(s), num_double_blocks=cfg.depth,
                                 title=f"{TITLE}: block sweep ({s['sweep_mode']}, {steps} step(s))",
                                 caption="Mean colour distance to the reference colour when the edges are cut in the "
                                         "blocks of k (higher: the colour is lost)"))
        mad = tables.series_by_block(swept, ks, "edges", "from_block", "mad")
        items.append(tables.plot(ctx.run, f"{prefix}-sweep-change", ks, mad, ylabel="mean |pixel diff| vs edit",
                                 xlabel=sweep_axis_label(s), num_double_blocks=cfg.depth,
                                 title=f"{TITLE}: block sweep ({s['sweep_mode']}, {steps} step(s))",
                                 caption=f"Change against the plain edit of the sweep's {steps} step(s)"))
    return [report.Section(TITLE, items), tables.task_grids(ctx.run, f"{TITLE}: per-task grids", prefix, tasks, rows,
                                                             functools.partial(_grid, ctx, s, prefix))]


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    grid_rows = [tables.baseline_panels(base, mine["no knockout (edit)"], mine["t2i (no reference)"])]
    plain = [name for name in mine if "step sweep" in name]
    if plain:  # the sweep's own plain edit, of its steps
        grid_rows[0].append(grids.Panel(plain[0].removeprefix("no knockout "), cell.load_image(SWEEP_EDIT),
                                        tables.de_caption(mine[plain[0]])))
    for setting in s["settings"]:
        grid_rows.append([grids.Panel(f"{setting}, blocks {layers}",
                                       cell.load_image(f"{cli.slug(setting)}--{cli.slug(layers)}.png"),
                                       tables.de_caption(mine[f"{setting} @ {layers}"])) for layers in s["layers"]])
    for setting in s["sweep"]:
        names = [sweep_cell(s, setting, k, ctx.num_blocks)[1:] for k in s["sweep_from"]]
        grid_rows.append([grids.Panel(label, cell.load_image(file), tables.de_caption(mine[label]))
                          for label, file in names])
    return tables.write_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png",
                             f"{TITLE}: {task.task_id} ({task.instruction!r})", grid_rows)


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
