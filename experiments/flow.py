"""Attention flow: where each token group's attention goes, per block and step, in one edit.

Per task, one edit (the task's instruction, reference and seed, as its baseline edit) with the
attention flow captured (`fluxjax.flow`): in every block (--flow-blocks) and step, every head's
attention mass from each query group to each key group (text[content], text[padding], image,
ref[r]), and its value-weighted twin (the norm of what the key group's values contribute, which
sink tokens do not inflate). An edge is written as the knockouts write it: "A->B" is information
flowing from A to B, i.e. B's queries reading A's keys; the flow of an edge between unions of
groups ('ref', 'text') is the mass on A's keys averaged over B's query tokens.

Each task's cell holds `mass.npy` and `carried.npy` ([steps, blocks, heads, G, G], rows the query
groups), `token-mass.npy` ([steps, token blocks, image tokens, heads, G]) and, for every block of
--token-blocks, maps over the image grid of how much each image token reads the reference and the
text padding (mean over heads and steps). The report: a heatmap (edge x block) of the mean flow
over tasks, steps and heads, both variants; the edges' flow beside the knockout of the same edge
in every block, where the run folder has the knockout's cells (`python -m experiments.run_all`):
does cutting an edge that carries much flow change the output?

    python -m experiments.flow --model text-routed
    python -m experiments.flow --model /models/FLUX.2-klein-9B --tasks colour/tasks.jsonl --token-blocks 7,17
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import cli, report, tables
from experiments.context import Context
from fluxjax import metrics

NAME = "flow"
TITLE = "Attention flow"
# the edges of the report's tables: the knockouts' single edges, and the padding's onward edge
EDGES = ("ref->text", "ref->image", "ref->text[padding]", "ref->text[content]", "text[padding]->image",
         "text[content]->image", "text->ref", "image->ref", "image->text", "text->image")
MAPS = (("ref", "the reference"), ("text[padding]", "the text padding"))  # key groups of the per-token maps


def add_arguments(parser) -> None:
    g = parser.add_argument_group("attention flow")
    g.add_argument("--flow-blocks", default="all", help="blocks whose flow is measured: all, a:b, a,b,c (default all)")
    g.add_argument("--token-blocks", default=None,
                   help="blocks whose per-token maps are kept, a,b,c (default: the last double block and the "
                        "first single block)")
    g.add_argument("--no-carried", action="store_true", help="skip the value-weighted variant")


def settings(args, config) -> dict:
    n, nd = config.num_blocks, config.depth
    default = ",".join(str(b) for b in dict.fromkeys(b for b in (nd - 1, nd) if 0 <= b < n))
    return {"blocks": cli.parse_blocks(args.flow_blocks, n, "--flow-blocks"),
            "token_blocks": cli.parse_blocks(args.token_blocks or default, n, "--token-blocks"),
            "carried": not args.no_carried}


def validate(s: Mapping, config) -> None:
    n = config.num_blocks
    if not s["blocks"]:
        raise ValueError("give at least one block of the flow (--flow-blocks)")
    for b in [*s["blocks"], *s["token_blocks"]]:
        if not 0 <= b < n:
            raise ValueError(f"flow block {b} out of range: this model's blocks are 0..{n - 1}")


def capture(s: Mapping):
    import fluxjax

    return fluxjax.Capture(flow=fluxjax.Flow(blocks=tuple(s["blocks"]), tokens=tuple(s["token_blocks"]),
                                             carried=bool(s["carried"])))


def edge_flow(table: np.ndarray, layout, content_mask, edge: str) -> np.ndarray:
    """The flow of edge 'A->B' from tables [..., G, G] (rows: query groups): the mass on A's key groups,
    averaged over B's query tokens (each query group weighted by its tokens)."""
    source, dest = (x.strip() for x in edge.split("->"))
    counts = np.bincount(layout.group_ids(np.asarray(content_mask))[0], minlength=layout.num_groups)
    rows = [g for g in layout.groups_of(dest) if counts[g]]
    if not rows:
        return np.full(table.shape[:-2], np.nan)
    on_source = table[..., :, list(layout.groups_of(source))].sum(axis=-1)  # [..., G]
    return (on_source[..., rows] * counts[rows]).sum(axis=-1) / counts[rows].sum()


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    edit = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    layout, content = edit.layout, edit.content_mask
    image, caps = ctx.sample(edit, capture=capture(s))
    flow = caps.flow
    cell.write_image("edit.png", image[0])
    mass = np.asarray(flow.mass)[:, :, 0]  # [S, n, H, G, G]
    cell.write_array("mass.npy", mass)
    carried = None
    if s["carried"]:
        carried = np.asarray(flow.carried)[:, :, 0]
        cell.write_array("carried.npy", carried)
    images = slice(layout.image.start, layout.image.stop)
    tokens = np.asarray(flow.token_mass)[:, :, 0, images]  # [S, m, N_img, H, G]
    cell.write_array("token-mass.npy", tokens)
    for j, b in enumerate(s["token_blocks"]):
        for key, words in MAPS:
            grid = tokens[:, j][..., list(layout.groups_of(key))].sum(-1).mean(axis=(0, 2)).reshape(layout.img_grid)
            cell.write_bytes(f"map-b{b}-{cli.slug(key)}.png", report.heatmap_plot(
                list(range(layout.img_grid[1])), [str(r) for r in range(layout.img_grid[0])], grid.tolist(),
                colour_label="attention mass", xlabel="image column", ylabel="image row", vmin=0.0,
                title=f"{task.task_id}: image tokens reading {words}, block {b}"))
    rows = []
    for j, b in enumerate(s["blocks"]):
        for edge in EDGES:
            row = {"experiment": NAME, "task": task.task_id, "block": b, "edge": edge,
                   "mass": _mean(edge_flow(mass[:, j], layout, content, edge)),
                   "carried": None if carried is None else _mean(edge_flow(carried[:, j], layout, content, edge))}
            rows.append(row)
    return {"rows": rows}


def _mean(values: np.ndarray) -> float | None:
    """The mean over steps and heads, None where the edge has no queries."""
    values = np.asarray(values, float)
    return None if np.isnan(values).all() else float(np.nanmean(values))


def _knockout_effects(ctx: Context, tasks: Sequence, prefix: str) -> dict[str, dict]:
    """Per edge, the knockout of that edge in every block (`<edge> @ all`) from the run folder's knockout
    cells, where they are complete: mean colour distance, mean change against the edit, and the share
    of tasks whose colour it takes away (the study's rule)."""
    found: dict[str, list] = {}
    for task in tasks:
        cell = ctx.run.cell(f"{prefix}/{task.task_id}")
        if not cell.done:
            continue
        for row in cell.record().get("rows", ()):
            if row.get("layers") == "all" and row.get("edges") in EDGES:
                found.setdefault(row["edges"], []).append(row)
    out = {}
    for edge, rows in found.items():
        verdicts = [r["pass"] for r in rows if r.get("pass") is not None]
        out[edge] = {"knockout dE": float(np.mean([r["colour_de"] for r in rows])),
                     "knockout change": float(np.mean([r["mad"] for r in rows])),
                     "knockout passes": None if not verdicts else float(np.mean(verdicts)), "tasks": len(rows)}
    return out


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME, knockout_prefix: str = "knockout"
        ) -> list[report.Section]:
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    ctx.run.write_derived(f"{prefix}-edges.csv", metrics.rows_to_csv(rows))
    blocks, cfg = list(s["blocks"]), ctx.model.config
    items: list = [report.Text(
        f"Attention mass per edge 'A->B' (B's queries reading A's keys), mean over {len(tasks)} tasks, every "
        f"denoising step and every head, in blocks {blocks[0]}..{blocks[-1]}. Mass: the share of B's attention on "
        "A's keys; carried: the norm of what A's values contribute to B's attention output (head space). The "
        "model's own routing cuts, where it has any, are applied (their edges have no flow).")]
    variants = ["mass", "carried"] if s["carried"] else ["mass"]
    means = {v: {edge: [_nanmean([r[v] for r in rows if r["edge"] == edge and r["block"] == b]) for b in blocks]
                 for edge in EDGES} for v in variants}
    for v in variants:
        items.append(tables.heatmap(ctx.run, f"{prefix}-{v}", blocks, list(EDGES), [means[v][e] for e in EDGES],
                                    caption=f"Attention flow ({v}) per edge and block, mean over tasks, steps and "
                                            "heads", colour_label=v, ylabel="edge (A->B: B reads A)",
                                    num_double_blocks=cfg.depth, title=f"{TITLE} ({v})", vmin=0.0))
    effects = _knockout_effects(ctx, tasks, knockout_prefix)
    table_rows = []
    for edge in EDGES:
        m = np.asarray([x for x in means["mass"][edge] if x is not None], float)
        row = {"edge": edge, "mean mass": float(m.mean()) if m.size else None,
               "peak mass": float(m.max()) if m.size else None,
               "peak block": blocks[int(np.argmax(m))] if m.size else None}
        if s["carried"]:
            c = [x for x in means["carried"][edge] if x is not None]
            row["mean carried"] = float(np.mean(c)) if c else None
        row.update({k: effects.get(edge, {}).get(k) for k in ("knockout dE", "knockout change", "knockout passes")})
        table_rows.append(row)
    note = ("Knockout columns: the same edge cut in every block (experiment 3's '<edge> @ all' cells in this run "
            "folder): mean CIEDE2000 to the reference colour, mean |pixel change| against the edit, and the share "
            "of tasks where the study's rule calls the colour lost (kept, for ref->image)."
            if effects else "No knockout cells in this run folder: run `python -m experiments.run_all` (or "
            "experiments.knockout with the same --out) to see each edge's knockout beside its flow.")
    items.append(report.Table(title="Flow per edge beside its knockout", columns=list(table_rows[0]),
                              rows=table_rows, note=note, formats={
                                  "mean mass": "{:.3f}", "peak mass": "{:.3f}", "mean carried": "{:.3f}",
                                  "knockout dE": "{:.1f}", "knockout change": "{:.1f}",
                                  "knockout passes": report.percent}))
    maps = []
    for task in tasks[:1]:
        cell = ctx.run.cell(f"{prefix}/{task.task_id}")
        maps = [report.Figure(path=cell.file(f"map-b{b}-{cli.slug(key)}.png"), caption=f"block {b}, {words}")
                for b in s["token_blocks"] for key, words in MAPS]
    if maps:
        items.append(report.FigureRow(maps, caption=f"Per-token maps of the first task ({tasks[0].task_id}): each "
                                                    "image token's attention mass on the reference and on the text "
                                                    "padding, mean over heads and steps"))
    return [report.Section(TITLE, items)]


def _nanmean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
