"""T2I Lens: read what an edit's text stream carries with a text-to-image run.

The study's experiments 1 and 2. Run the edit (instruction + reference, the task's noise seed) for
--source-steps steps (default 1, as the study) and keep the text stream at the output of block k
(at the last source step). Then run text-to-image from the empty prompt "" with no reference and
the noise of seed + 1, with a text stream replaced at every step by the kept activations: at all
text positions, only text[padding], or only text[content] (--positions; content = the
instruction's tokens in the edit's prompt). The other positions keep the empty prompt's values.
Which stream is replaced is the form (--form):

    input      the text stream fed to block 0 (site 'embed.text.output', the output of the text
               input projection); the target runs the model's steps (the study's style, identity,
               add and remove cells: block 7 -> block 0, four steps)
    diagonal   the text stream at the output of the same block k (site 'b<k>.text.output'); the
               target runs --target-steps steps, default 1 (the study's colour cell: block 17, one
               step, against a one-step t2i_clean)

Compared against t2i_clean (the instruction, no reference, seed + 1, the target's step count), the
unconditional baseline (the target unpatched: the empty prompt, no reference) and the baseline
edit. A pass (the study's rule): the reference colour is present in the output and
absent from t2i_clean; the absolute rate (present in the output) is reported beside it.

The per-position lens (--per-position content|padding|all; the study's per_content and
per_position token modes): one cell per text position of that group, the kept activations
replacing that one position alone, as a grid over positions x blocks (--position-range a:b or
a,b,c keeps some of them: the study's --position-range and --text-token-indices). It adds
<prefix>-positions.csv and <prefix>-positions.md (per position and block: n, the pass rates, the
mean colour distance), heatmaps of both over positions x blocks, and per-task image grids
(grids/<prefix>/<task>-positions.png). Positions are named by their index in the text stream
(the study names them by index and token string).

A knockout during the lens (--knockout SETTING --knockout-on source|target|both, --knockout-layers;
the study's --knockout-setting / --knockout-side): the edges of SETTING (as experiments.knockout
--settings) are cut at every step in the source edit (the route into the kept activations), in
the target run (its sweep cells and a control: the unconditional target under the knockout), or
both. The target has no reference: with both, only the setting's edges between groups it has are
cut there; --knockout-on target with reference edges alone is refused (it would cut nothing). Its
text groups are the instruction's positions, as the source's (the study's).

The image-category lens (--categories image; the study's `--categories image`): the source's
image stream (its noisy-image tokens) at the output of block k replaces the target's at the output
of block k, the diagonal form only (the study's input-to-block-0 form is for the text stream);
settings 'image b<k>', beside the text cells when --categories text image.

A sweep (--sweep or --blocks) captures every block in one source run and runs every
(positions, block) cell, single positions included, as vmapped compiled calls of one program; it
ends in plots of colour distance and pass rate against the block.

    python -m experiments.lens --sweep --colours red,blue --objects circle --seeds 0
    python -m experiments.lens --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --form diagonal --block 17
    python -m experiments.lens --blocks 0:4 --per-position all --colours red --objects circle --seeds 0
    python -m experiments.lens --blocks 2 --knockout 'ref->text' --knockout-on source
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import cli, grids, knockout, report, tables
from experiments.context import Context
from experiments.sweep import POSITIONS

NAME = "lens"
TITLE = "T2I Lens"
FORMS = ("input", "diagonal")
CATEGORIES = ("text", "image")  # the stream carried over: the text stream (at --positions) or the noisy image
KNOCKOUT_ON = ("source", "target", "both")
MEANS = ("colour_de", "pass_absolute", "mad", "ssim")
MAX_POSITION_PANELS = 400  # per-task position grids with more panels are not drawn (the images stay in the cell)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("T2I Lens")
    cli.add_block_arguments(g, "default: the last double block, the study's style cell")
    g.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS),
                   help="which text positions are replaced (default: all padding content)")
    g.add_argument("--categories", nargs="+", choices=list(CATEGORIES), default=["text"],
                   help="the streams carried over: text (at --positions) and/or image (the noisy-image tokens, "
                        "--form diagonal only; the study's --categories) (default: text)")
    g.add_argument("--source-steps", type=int, default=1, help="steps of the source edit (default 1, as the study)")
    g.add_argument("--form", choices=FORMS, default="input",
                   help="input: block k's output fed to block 0; diagonal: block k's output replaces the target's "
                        "at block k (default input)")
    g.add_argument("--target-steps", type=int, default=None,
                   help="steps of the target and t2i_clean runs (default: the model's for --form input, 1 for "
                        "--form diagonal, as the study)")
    g.add_argument("--per-position", choices=list(POSITIONS), default=None,
                   help="also a grid over single positions x blocks: every position of this group replaced alone "
                        "(content: each instruction token, the study's per_content; all: every position, its "
                        "per_position)")
    g.add_argument("--position-range", default=None,
                   help="with --per-position, only these text positions: 'a:b' (a..b-1), ':k', 'k:' or 'a,b,c' "
                        "(default: every position of the group)")
    g.add_argument("--knockout", default=None, metavar="SETTING",
                   help="cut these attention edges during the lens ('A->B' joined by '+', as experiments.knockout "
                        "--settings), in the runs of --knockout-on")
    g.add_argument("--knockout-on", choices=KNOCKOUT_ON, default=None,
                   help="source: the edit whose text stream is kept; target: the lens's text-to-image run; both")
    g.add_argument("--knockout-layers", default="all",
                   help="blocks of the knockout, a layer mode of experiments.knockout --layers (default all)")


def settings(args, config) -> dict:
    target_steps = args.target_steps if args.target_steps is not None else (1 if args.form == "diagonal" else None)
    out = {**cli.sweep_settings(args, config), "source_steps": args.source_steps, "form": args.form,
           "target_steps": target_steps}
    if list(args.categories) != ["text"]:  # absent: the text stream alone
        out["categories"] = list(dict.fromkeys(args.categories))
    if args.per_position is not None or args.position_range is not None:
        out.update(per_position=args.per_position, position_range=args.position_range)
    if args.knockout is not None or args.knockout_on is not None:
        out.update(knockout=args.knockout, knockout_on=args.knockout_on, knockout_layers=args.knockout_layers)
    return out


def validate(s: Mapping, config) -> None:
    """Raise for blocks, positions, forms or a knockout this model cannot run. The per-position and
    knockout keys are optional: absent, the lens has neither."""
    cli.check_blocks_and_positions("lens", s, config)
    if s["form"] not in FORMS:
        raise ValueError(f"lens form {s['form']!r}: choose among {list(FORMS)}")
    if s["source_steps"] < 1 or (s["target_steps"] is not None and s["target_steps"] < 1):
        raise ValueError("the lens's source and target runs need at least one step")
    categories = categories_of(s)
    if not categories or set(categories) - set(CATEGORIES):
        raise ValueError(f"lens categories {categories}: choose among {list(CATEGORIES)}")
    if "image" in categories and s["form"] != "diagonal":
        raise ValueError("--categories image: the image stream is carried over in the diagonal form only (block k's "
                         "output to block k's output, as the study's); give --form diagonal")
    if s.get("position_range") is not None and s.get("per_position") is None:
        raise ValueError("--position-range picks positions of --per-position; give --per-position too")
    if s.get("per_position") is not None:
        if s["per_position"] not in POSITIONS:
            raise ValueError(f"--per-position {s['per_position']}: choose among {list(POSITIONS)}")
        if s.get("position_range") is not None:
            parse_positions(s["position_range"], 1 << 16)  # the syntax; the range per task
    if (s.get("knockout") is None) != (s.get("knockout_on") is None):
        raise ValueError("a lens knockout needs both --knockout SETTING and --knockout-on source|target|both")
    if s.get("knockout") is not None:
        _check_knockout(s, config)


def _check_knockout(s: Mapping, config) -> None:
    from fluxjax.interventions import knockout as cut
    from fluxjax.layout import TokenLayout

    if s["knockout_on"] not in KNOCKOUT_ON:
        raise ValueError(f"--knockout-on {s['knockout_on']}: choose among {list(KNOCKOUT_ON)}")
    edges = knockout.edges(s["knockout"])
    if not edges:
        raise ValueError(f"knockout setting {s['knockout']!r} names no edge")
    blocks = cli.parse_blocks(s["knockout_layers"], config.num_blocks)
    content = np.array([True, True, False, False])
    source, target = (TokenLayout(n_txt=4, img_grid=(1, 1), ref_grids=refs) for refs in (((1, 1),), ()))
    if _on(s, "source"):
        cut(config, source, content, edges, blocks)
    if _on(s, "target"):
        present = _edges_in(target, edges)
        if not present and s["knockout_on"] == "target":
            raise ValueError(f"--knockout {s['knockout']} --knockout-on target cuts nothing: the target run has no "
                             "reference; cut it on the source (--knockout-on source or both)")
        if present:
            cut(config, target, content, present, blocks)


def categories_of(s: Mapping) -> list[str]:
    """The streams the lens carries over (settings without the key: the text stream alone)."""
    return list(s.get("categories", ["text"]))


def _edges_in(layout, edges: Sequence[str]) -> list[str]:
    """The edges whose two groups `layout` has (the target of the lens has no reference tokens)."""
    def has(edge):
        src, dst = (part.strip() for part in edge.split("->", 1))
        return bool(layout.groups_of(src)) and bool(layout.groups_of(dst))

    return [e for e in edges if has(e)]


def parse_positions(spec: str, n_txt: int) -> list[int]:
    """'a:b' (positions a..b-1), ':k', 'k:', 'k' or 'a,b,c' -> sorted positions of a text stream of n_txt."""
    spec = spec.strip()
    try:
        if ":" in spec:
            start, stop = (part.strip() for part in spec.split(":"))
            start, stop = int(start or 0), int(stop or n_txt)
            out = list(range(start, stop)) if 0 <= start < stop <= n_txt else []
        else:
            out = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        out = []
    if not out or any(not 0 <= p < n_txt for p in out):
        raise ValueError(f"--position-range {spec!r}: use 'a:b' (a..b-1), ':k', 'k:', 'k' or 'a,b,c' within the "
                         f"text positions 0..{n_txt - 1}")
    return sorted(set(out))


def single_positions(s: Mapping, content_mask: np.ndarray) -> list[int]:
    """The positions of the per-position grid for an edit's content mask (bool [1, T]): every position
    of the --per-position group, within --position-range."""
    group = s.get("per_position")
    if group is None:
        return []
    content = np.asarray(content_mask, bool)[0]
    chosen = {"all": np.ones_like(content), "content": content, "padding": ~content}[group]
    if s.get("position_range") is not None:
        keep = np.zeros_like(content)
        keep[parse_positions(s["position_range"], content.size)] = True
        chosen = chosen & keep
    return [int(p) for p in np.flatnonzero(chosen)]


def _knockout(ctx: Context, s: Mapping, edit):
    """The lens knockout (a fluxjax Knockout) for `edit`'s layout and content mask: the setting's edges
    that the layout has (none of the reference's on the target), None if it has none of them."""
    from fluxjax.interventions import knockout as cut

    edges = _edges_in(edit.layout, knockout.edges(s["knockout"]))
    if not edges:
        return None
    return cut(ctx.model.config, edit.layout, edit.content_mask, edges,
               cli.parse_blocks(s["knockout_layers"], ctx.num_blocks))


def _on(s: Mapping, side: str) -> bool:
    return s.get("knockout_on") in (side, "both")


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    from fluxjax.interventions import Capture, Interventions, substitution
    from fluxjax.sites import site

    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    blocks = tuple(s["blocks"])
    source = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    source_iv = Interventions(knockout=_knockout(ctx, s, source)) if _on(s, "source") else None
    image = "image" in categories_of(s)
    text_sites = [site(k, "text", "output") for k in blocks]
    image_sites = [site(k, "image", "output") for k in blocks] if image else []
    capture = Capture(sites=(*text_sites, *image_sites))
    pixels, captures = ctx.sample(source, source_iv, capture=capture, options=_steps(ctx, s["source_steps"]))
    cell.write_image("source.png", pixels[0])
    target_options = _steps(ctx, s["target_steps"])
    if target_options.num_steps == ctx.options.num_steps:
        clean, clean_file = base["t2i-next-seed"], ctx.baseline_file(task, "t2i-next-seed")
    else:  # t2i_clean with the target's step count
        clean = ctx.sample(ctx.edit(task.instruction, None, task.seed + 1, task.height, task.width),
                           options=target_options)[0][0]
        clean_file = ctx.file(cell, "t2i-clean.png")
        cell.write_image("t2i-clean.png", clean)
    target = ctx.edit("", None, task.seed + 1, task.height, task.width)
    target_cut = None
    if _on(s, "target"):
        # The knockout's text groups are the instruction's positions, as in the source (the study's):
        # the empty prompt has no content positions of its own.
        target = dataclasses.replace(target, content_mask=source.content_mask)
        target_cut = _knockout(ctx, s, target)
    masks = [(pos, source.text_mask(pos), None) for pos in s["positions"]] if "text" in categories_of(s) else []
    content = np.asarray(source.content_mask, bool)[0]
    for p in single_positions(s, source.content_mask):
        one = np.zeros((1, content.size), bool)
        one[0, p] = True
        masks.append((f"pos{p}", one, p))
    values = [captures[at][-1] for at in text_sites]  # [1, T, D] per block, the last source step: shared by its cells
    cells, labels = [], []
    for pos, mask, p in masks:
        for k, value in zip(blocks, values):
            at = site(-1, "text", "output") if s["form"] == "input" else site(k, "text", "output")
            cells.append(Interventions(substitutions=(substitution(at, value, mask),), knockout=target_cut))
            labels.append((pos, k, p))
    images = list(ctx.sweep(target, cells, options=target_options)) if cells else []
    if image:  # the image stream's cells: another intervention structure, so another sweep
        image_cells = [Interventions(substitutions=(substitution(at, captures[at][-1]),), knockout=target_cut)
                       for at in image_sites]  # [1, N_img, D] at the last source step
        images += list(ctx.sweep(target, image_cells, options=target_options))
        labels += [("image", k, None) for k in blocks]
    unconditional = ctx.sample(target, options=target_options)[0][0]  # the target unpatched
    cell.write_image("unconditional.png", unconditional)

    rows = [tables.control_row(NAME, ctx.judged_property, image, ref_lab, base["edit"], task=task.task_id,
                               setting=setting, positions=None, block=None)
            for image, setting in ((base["edit"], "baseline edit"), (clean, "t2i_clean"),
                                   (unconditional, "unconditional (empty prompt)"))]
    if target_cut is not None:  # the study's knockout baseline: the target unpatched, under the knockout
        cut_unconditional = ctx.sample(target, Interventions(knockout=target_cut), options=target_options)[0][0]
        cell.write_image("unconditional-knockout.png", cut_unconditional)
        rows.append(tables.control_row(NAME, ctx.judged_property, cut_unconditional, ref_lab, base["edit"],
                                       task=task.task_id, setting="unconditional, knockout on target",
                                       positions=None, block=None))
    clean_de = rows[1]["colour_de"]
    for (pos, k, p), image in zip(labels, images):
        cell.write_image(f"{pos}-b{k}.png", image)
        bundle = [("reference", ctx.baseline_file(task, "reference")), ("t2i_clean", clean_file),
                  ("output", ctx.file(cell, f"{pos}-b{k}.png"))]
        where = {} if p is None else {"position": p, "position_group": "content" if content[p] else "padding"}
        rows.append(tables.judged_row(NAME, ctx.judged_property, "present", bundle, image, ref_lab, clean_de,
                                      base["edit"], task=task.task_id, setting=f"{pos} b{k}", positions=pos, block=k,
                                      **where))
    return {"rows": rows}


def _steps(ctx: Context, steps: int | None):
    return ctx.options if steps is None else dataclasses.replace(ctx.options, num_steps=steps)


def _describe(ctx: Context, s: Mapping) -> str:
    text = (f"Source: the edit run for {s['source_steps']} step(s), text stream kept at the output of block k. Target: "
            f"empty prompt, no reference, seed + 1, {_steps(ctx, s['target_steps']).num_steps} step(s), the text "
            f"stream {'fed to block 0' if s['form'] == 'input' else 'at the output of block k'} replaced at the "
            f"{', '.join(s['positions'])} positions ({s['form']} form). Controls: the baseline edit and t2i_clean (the "
            f"instruction, no reference, seed + 1, the target's steps). mad / ssim: against the baseline edit.")
    if "text" not in categories_of(s):
        text = text.replace(f" replaced at the {', '.join(s['positions'])} positions", " not replaced")
    if "image" in categories_of(s):
        text += (" Image category (settings 'image b<k>'): the source's noisy-image tokens at the output of block k "
                 "replace the target's at the output of block k.")
    if s.get("per_position") is not None:
        where = f", positions {s['position_range']}" if s.get("position_range") is not None else ""
        text += (f" Per position: every {s['per_position']} position{where} replaced alone (settings 'pos<p> b<k>'), "
                 "in the tables and heatmaps below.")
    if s.get("knockout") is not None:
        sides = {"source": "the source edit", "target": "the target run", "both": "the source edit and the target run"}
        text += (f" Knockout: {s['knockout']} cut in blocks {s['knockout_layers']} at every step of "
                 f"{sides[s['knockout_on']]}.")
        if _on(s, "target"):
            text += (" The target has no reference, so only the setting's other edges are cut there (with none, "
                     "the target runs uncut); its text groups are the instruction's positions. Control: the "
                     "unconditional target under the knockout.")
    return text


def form_title(s: Mapping) -> str:
    """The lens's title with its form: the two forms' report sections must not share a heading."""
    if s["form"] == "input":
        return f"{TITLE}, input form (block k's text fed to block 0)"
    return f"{TITLE}, diagonal form (block k's text replaces block k's)"


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    """Every task's lens cell, then the tables, plots, grids and report sections."""
    validate(s, ctx.model.config)
    if s.get("position_range") is not None:  # within this model's text positions, before any work
        parse_positions(s["position_range"], np.shape(ctx.text("").embeds)[1])
    title = form_title(s)
    ctx.compute_baselines(tasks)
    rows = ctx.cells(title, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    single = [r for r in rows if r.get("position") is not None]
    rows = [r for r in rows if r.get("position") is None]
    items = tables.write_tables(ctx.run, prefix, rows, MEANS, rates_title="Pass rates", text=_describe(ctx, s),
                                 control="t2i_clean")
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
                                 num_double_blocks=ctx.model.config.depth, title=title))
        rate = tables.series_by_block(swept, blocks, "positions", "block", "pass")
        items.append(tables.plot(ctx.run, f"{prefix}-pass-rate", blocks, rate,
                                 ylabel="share passing (the study's rule)",
                                 caption="Pass rate (the study's rule) by source block", ylim=(-0.05, 1.05),
                                 num_double_blocks=ctx.model.config.depth, title=title))
    sections = [report.Section(f"{title}: all, padding-only and content-only positions", items)]
    if single:
        sections.append(report.Section(f"{title}: one text position at a time",
                                       position_items(ctx, prefix, single, blocks)))
    sections.append(tables.task_grids(ctx.run, f"{title}: per-task grids", prefix, tasks, rows + single,
                                      functools.partial(_grid, ctx, s, prefix)))
    return sections


def position_grid(rows: Sequence[Mapping], blocks: Sequence[int]) -> list[dict]:
    """Per (position, block) of the per-position rows: n, passed, the study's rate and the absolute
    rate (each with its 95 % Wilson interval), the mean colour distance, and the position's group
    (content / padding, or how many tasks have it as content when they differ)."""
    out = []
    for p in sorted({int(r["position"]) for r in rows}):
        mine = [r for r in rows if r["position"] == p]
        groups = [r["position_group"] for r in mine if r["block"] == mine[0]["block"]]
        group = groups[0] if len(set(groups)) == 1 else f"content in {groups.count('content')} of {len(groups)}"
        for k in blocks:
            cell = [r for r in mine if r["block"] == k]
            if not cell:
                continue
            judged = [r for r in cell if r["pass"] is not None]
            passed = sum(bool(r["pass"]) for r in judged)
            absolute = [bool(r["pass_absolute"]) for r in cell if r["pass_absolute"] is not None]
            out.append({"position": p, "group": group, "block": k, "n": len(judged), "passed": passed,
                        **tables.interval_columns("rate", passed, len(judged)),
                        **tables.interval_columns("rate_absolute", sum(absolute), len(absolute)),
                        "colour_de": float(np.mean([r["colour_de"] for r in cell]))})
    return out


def position_markdown(grid: Sequence[Mapping], blocks: Sequence[int]) -> str:
    """The per-position grid as a Markdown table: a row per position, a column per block, each cell
    'rate [95 % interval] (mean CIEDE2000)' under the study's rule."""
    by = {(g["position"], g["block"]): g for g in grid}
    group = {g["position"]: g["group"] for g in grid}
    lines = ["| position | group | " + " | ".join(f"b{k}" for k in blocks) + " |",
             "|---|---|" + "---|" * len(blocks)]
    lines += [f"| {p} | {g} | " + " | ".join(_grid_cell(by.get((p, k))) for k in blocks) + " |"
              for p, g in group.items()]
    return "\n".join(lines) + "\n"


def position_items(ctx: Context, prefix: str, rows: Sequence[Mapping], blocks: Sequence[int]) -> list:
    """`<prefix>-positions-metrics.csv` (every per-position row), the grid as `<prefix>-positions.csv`
    and `.md`, and its report items: a note, the heatmaps of pass rate and colour distance, the table."""
    from fluxjax import metrics

    grid = position_grid(rows, blocks)
    ctx.run.write_derived(f"{prefix}-positions-metrics.csv", metrics.rows_to_csv(rows))
    ctx.run.write_derived(f"{prefix}-positions.csv", metrics.rows_to_csv(grid))
    ctx.run.write_derived(f"{prefix}-positions.md", position_markdown(grid, blocks))
    group = {g["position"]: g["group"] for g in grid}
    by = {(g["position"], g["block"]): g for g in grid}

    def values(column):
        return [[None if (p, k) not in by else by[(p, k)][column] for k in blocks] for p in group]

    labels = [f"{p} ({g})" for p, g in group.items()]
    cfg = ctx.model.config
    figures = [tables.heatmap(ctx.run, f"{prefix}-positions-pass-rate", blocks, labels, values("rate"),
                              caption="Share of tasks passing (the study's rule) when one text position is "
                                      "replaced, by position and source block", vmin=0.0, vmax=1.0,
                              cmap="Greens", colour_label="share passing", num_double_blocks=cfg.depth,
                              title=f"{TITLE}: one position at a time"),
               tables.heatmap(ctx.run, f"{prefix}-positions-colour-distance", blocks, labels, values("colour_de"),
                              caption="Mean colour distance of the output to the reference colour (lower: the colour "
                                      "appears)", cmap="viridis_r", colour_label="CIEDE2000",
                              num_double_blocks=cfg.depth, title=f"{TITLE}: one position at a time")]
    table = report.Table(title="One position at a time: rate [95% CI] (mean CIEDE2000) per position and block",
                         columns=["position", "group", *(f"b{k}" for k in blocks)],
                         rows=[{"position": p, "group": g, **{f"b{k}": _grid_cell(by.get((p, k))) for k in blocks}}
                               for p, g in group.items()],
                         note=f"rate: {tables.RULES['present']}. Also in {prefix}-positions.csv / .md; every row in "
                              f"{prefix}-positions-metrics.csv; per-task images in grids/{prefix}/<task>-positions.png.")
    return [report.Text("Each cell replaces one text position alone with the source's activations (the study's "
                        "per-token lens); positions are indices of the text stream, their group the task's."),
            *figures, table]


def _grid_cell(g: Mapping | None) -> str:
    """One (position, block) of the grid: 'rate [low, high] (mean CIEDE2000)'."""
    if g is None:
        return ""
    return f"{tables.rate_text(g['rate'], g['rate_low'], g['rate_high']) or 'n/a'} ({g['colour_de']:.1f})"


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    top = [grids.Panel("reference", base["reference"]),
           grids.Panel("baseline edit", base["edit"], tables.de_caption(mine["baseline edit"])),
           grids.Panel("t2i_clean (seed + 1)", _clean_image(ctx, task, s, cell), tables.de_caption(mine["t2i_clean"])),
           grids.Panel(f"source edit ({s['source_steps']} step)", cell.load_image("source.png")),
           grids.Panel("unconditional (target unpatched)", cell.load_image("unconditional.png"),
                       tables.de_caption(mine["unconditional (empty prompt)"]))]
    if "unconditional, knockout on target" in mine:
        top.append(grids.Panel("unconditional, knockout", cell.load_image("unconditional-knockout.png"),
                               tables.de_caption(mine["unconditional, knockout on target"])))
    title = f"{TITLE}: {task.task_id} ({task.instruction!r})"
    single = [r["positions"] for r in mine.values() if r.get("position") is not None]
    single = list(dict.fromkeys(single))
    if single and len(single) * len(s["blocks"]) <= MAX_POSITION_PANELS:
        tables.write_sweep_grid(ctx.run, f"grids/{prefix}/{task.task_id}-positions.png", f"{title}, one position at "
                                f"a time", top, cell, single, s["blocks"], mine, tables.de_caption, "lens")
    categories = categories_of(s)
    shown = [*(s["positions"] if "text" in categories else []), *(["image"] if "image" in categories else [])]
    return tables.write_sweep_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png", title, top, cell, shown,
                                   s["blocks"], mine, tables.de_caption, "lens")


def _clean_image(ctx: Context, task, s: Mapping, cell):
    if _steps(ctx, s["target_steps"]).num_steps == ctx.options.num_steps:
        return ctx.baselines(task)["t2i-next-seed"]
    return cell.load_image("t2i-clean.png")


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
