"""I2I -> I2I patching: move one edit's text stream into another edit and see what follows it.

The study's experiment 5. Two edits share the instruction but have different references (source,
target). The source edit runs with the text stream captured at block k at every step; the target
edit runs with its text stream at block k replaced, at every step s, by the source's step-s
activations: at all text positions, only text[padding], or only text[content] (--positions).

Pairs come from a pair file (--pairs: two task ids a line, source then target, tab-separated, as
the study's), or, for the colour bucket, are generated: same object and seed, the next colour of
the subset (red -> orange, ..., brown -> red), written to tasks/pairs.tsv in the run folder.

A block sweep (--sweep or --blocks) captures every block in one source run and runs every
(positions, block) cell as vmapped compiled calls. A pass: the output's dominant colour is closer
(CIEDE2000) to the source reference's colour than to the target reference's (the property
transferred). Compared against the target's baseline edit.

    python -m experiments.patching --sweep --colours red,blue --objects circle --seeds 0
    python -m experiments.patching --model FLUX.2-klein-9B --tasks colour/tasks.jsonl \
        --pairs colour/pairs.tsv --block 17
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments import cli, grids, report, tables, tasks as tasklib
from fluxjax import metrics
from experiments.context import Context
from experiments.sweep import POSITIONS

NAME = "patching"
TITLE = "I2I -> I2I patching"
MEANS = ("d_source", "d_target", "pass_absolute", "mad", "ssim")
PAIRS_FILE = "tasks/pairs.tsv"


def add_arguments(parser) -> None:
    g = parser.add_argument_group("patching")
    cli.add_block_arguments(g, "default: the last double block, the study's style cell")
    g.add_argument("--positions", nargs="+", choices=list(POSITIONS), default=list(POSITIONS),
                   help="which text positions are patched (default: all padding content)")
    g.add_argument("--pairs", type=Path, default=None,
                   help="pair file: source<TAB>target task ids a line (default: colour-bucket pairs, same object "
                        "and seed, the next colour)")


def pair_file(path: Path | None) -> dict | None:
    """The run config's record of a pair file (None: generated colour-bucket pairs)."""
    if path is None:
        return None
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"--pairs {path}: no such file")
    return {"file": str(path), "sha256": cli.file_sha256(path)}


def settings(args, config) -> dict:
    out = {"blocks": cli.blocks_from_args(args, config.num_blocks, config.depth - 1),
           "positions": list(dict.fromkeys(args.positions)), "pairs": pair_file(args.pairs)}
    validate(out, config)
    return out


def validate(s: Mapping, config) -> None:
    if not s["blocks"] or any(not 0 <= b < config.num_blocks for b in s["blocks"]):
        raise ValueError(f"patching blocks {s['blocks']}: this model has blocks 0..{config.num_blocks - 1}")
    if set(s["positions"]) - set(POSITIONS) or not s["positions"]:
        raise ValueError(f"patching positions {s['positions']}: choose among {list(POSITIONS)}")


def colour_pairs(found: Sequence[tasklib.Task]) -> list[tuple[tasklib.Task, tasklib.Task]]:
    """Colour-bucket pairs: within each (object, seed), each colour's task -> the next colour's (cyclic)."""
    groups: dict[tuple[str, int], list[tasklib.Task]] = {}
    for t in found:
        parsed = tasklib.parse_colour_task_id(t.task_id)
        if parsed is not None:
            groups.setdefault((parsed[1], parsed[2]), []).append(t)
    pairs = []
    for group in groups.values():
        if len(group) >= 2:
            pairs += [(group[i], group[(i + 1) % len(group)]) for i in range(len(group))]
    if not pairs:
        raise ValueError("no colour-bucket pairs among these tasks (a pair needs two colours of one object and seed); "
                         "give --pairs")
    return pairs


def pair_file_text(pairs: Sequence[tuple[tasklib.Task, tasklib.Task]]) -> str:
    return "".join(f"{s.task_id}\t{t.task_id}\n" for s, t in pairs)


def resolve_pairs(ctx: Context, found: Sequence[tasklib.Task], s: Mapping):
    if s["pairs"] is not None:
        if cli.file_sha256(Path(s["pairs"]["file"])) != s["pairs"]["sha256"]:
            raise ValueError(f"{s['pairs']['file']} changed since this run folder was made; start a new run (--out)")
        return tasklib.read_pairs(s["pairs"]["file"], found)
    pairs = colour_pairs(found)
    ctx.run.write_derived(PAIRS_FILE, pair_file_text(pairs))
    return pairs


def pair_key(source, target) -> str:
    return f"{source.task_id}__{target.task_id}"


def _pair(ctx: Context, source, target, s: Mapping, cell) -> dict:
    from fluxjax.interventions import Capture, Interventions, substitution

    if (source.width, source.height) != (target.width, target.height):
        raise ValueError(f"pair {source.task_id} -> {target.task_id}: sizes differ; patched edits share the size")
    base = ctx.baselines(target)
    source_base = ctx.baselines(source)
    src_lab, tgt_lab = ctx.reference_lab(source), ctx.reference_lab(target)
    blocks = tuple(s["blocks"])
    src = ctx.edit(source.instruction, source.reference, source.seed, source.height, source.width)
    _, captures = ctx.sample(src, capture=Capture(text=blocks))  # text [S, n_blocks, 1, T, D]
    tgt = ctx.edit(target.instruction, target.reference, target.seed, target.height, target.width)
    cells, labels = [], []
    for pos in s["positions"]:
        mask = tgt.text_mask(pos)
        for j, k in enumerate(blocks):
            cells.append(Interventions(substitutions=(substitution(k, captures.text[:, j], mask),)))
            labels.append((pos, k))
    images = ctx.sweep(tgt, cells)

    def fields(image, setting, positions, block):
        return {"pair": pair_key(source, target), "source": source.task_id, "target": target.task_id,
                "setting": setting, "positions": positions, "block": block,
                "d_source": metrics.colour_error(image, src_lab), "d_target": metrics.colour_error(image, tgt_lab)}

    rows = [tables.control_row(NAME, image, src_lab, base["edit"], **fields(image, setting, None, None))
            for image, setting in ((base["edit"], "target edit (unpatched)"), (source_base["edit"], "source edit"))]
    for (pos, k), image in zip(labels, images):
        cell.write_image(f"{pos}-b{k}.png", image)
        bundle = [("source reference", ctx.baseline_file(source, "reference")),
                  ("target reference", ctx.baseline_file(target, "reference")),
                  ("target edit (unpatched)", ctx.baseline_file(target, "edit")),
                  ("output", ctx.file(cell, f"{pos}-b{k}.png"))]
        f = fields(image, f"{pos} b{k}", pos, k)
        rows.append(tables.judged_row(NAME, "transferred", bundle, image, src_lab, f["d_target"], base["edit"], **f))
    return {"rows": rows}


def run(ctx: Context, found: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    validate(s, ctx.model.config)
    pairs = resolve_pairs(ctx, found, s)
    rows = ctx.cells(TITLE, prefix, {pair_key(a, b): functools.partial(_pair, ctx, a, b, s) for a, b in pairs})
    rates, means = tables.write_tables(ctx.run, prefix, rows, MEANS)
    cfg = ctx.model.config
    items: list = [report.Text(
        f"{len(pairs)} pairs. The target's text stream at block k replaced at every step by the source's, at the "
        f"{', '.join(s['positions'])} positions. d_source / d_target: CIEDE2000 from the output's dominant colour to "
        "the source's / target's reference colour. mad / ssim: against the target's baseline edit."),
        tables.rate_table("Transfer rates", rates), tables.means_table("Means per setting", means, MEANS)]
    blocks = list(s["blocks"])
    if len(blocks) > 1:
        swept = [r for r in rows if r["block"] is not None]
        rate = tables.series_by_block(swept, blocks, "positions", "block", "pass")
        items.append(tables.plot(ctx.run, f"{prefix}-transfer-rate", blocks, rate, ylabel="share transferred",
                                 ylim=(-0.05, 1.05), num_double_blocks=cfg.depth, title=TITLE,
                                 caption="Share of pairs whose output takes the source's colour, by patched block"))
        for r in swept:
            r["margin"] = r["d_target"] - r["d_source"]
        margin = tables.series_by_block(swept, blocks, "positions", "block", "margin")
        items.append(tables.plot(ctx.run, f"{prefix}-margin", blocks, margin,
                                 ylabel="d_target - d_source (CIEDE2000)", threshold=0.0, num_double_blocks=cfg.depth,
                                 title=TITLE, caption="How much closer the output is to the source colour than to the "
                                                      "target colour (> 0: transferred), by patched block"))
    grid_files = [(_grid(ctx, a, b, s, rows, prefix), pair_key(a, b)) for a, b in pairs]
    return [report.Section(TITLE, items), tables.grids_section(f"{TITLE}: per-pair grids", prefix, grid_files)]


def _grid(ctx: Context, source, target, s: Mapping, rows: Sequence[Mapping], prefix: str):
    src, tgt = ctx.baselines(source), ctx.baselines(target)
    key = pair_key(source, target)
    cell = ctx.run.cell(f"{prefix}/{key}")
    mine = {r["setting"]: r for r in rows if r["pair"] == key}

    def caption(r):
        return f"d_src {r['d_source']:.1f} d_tgt {r['d_target']:.1f}"

    top = [grids.Panel("source reference", src["reference"]), grids.Panel("target reference", tgt["reference"]),
           grids.Panel("source edit", src["edit"], caption(mine["source edit"])),
           grids.Panel("target edit", tgt["edit"], caption(mine["target edit (unpatched)"])),
           grids.Panel("target t2i baseline", tgt["t2i"])]
    return tables.write_sweep_grid(ctx.run, f"grids/{prefix}/{key}.png", f"{TITLE}: {source.task_id} -> "
                                   f"{target.task_id} ({target.instruction!r})", top, cell, s["positions"], s["blocks"],
                                   mine, caption, "patched")


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
