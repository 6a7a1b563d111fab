"""Dropping the reference after the binding block: can the text tokens carry the reference alone?

The study's experiment 4, at a binding block k: in blocks < k the ref->image edge is knocked out,
so the text tokens are the reference's only outlet; from block k on the reference is gone. k = 0
is a plain text-to-image run (the reference never seen); k = n keeps the reference to the end with
ref->image cut everywhere.

"Gone" has two forms that give the same image: the mask form (every edge into and out of the
reference cut, `cut_reference`; the study's) and the removal form (the reference tokens leave the
sequence, `drop_reference`; saves their compute). The removal form changes shapes with k (one
compiled program per k), so the sweep over k runs the mask form as vmapped compiled calls over the
knockout tables, and the removal form is checked against it at a few k (--check-removal): the
report gives the largest pixel difference between the two.

Compared against the baseline edit, and (k = 0) against the text-to-image run with the task's
seed. A pass: the colour is kept (dominant colour within CIEDE2000 15 of the reference colour).

    python -m experiments.drop --sweep --check-removal 2 4
    python -m experiments.drop --model FLUX.2-klein-9B --tasks colour/tasks.jsonl --blocks 0,8,17,32
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import cli, grids, report, tables
from fluxjax import metrics
from experiments.context import Context

NAME = "drop"
TITLE = "Dropping the reference after block k"
MEANS = ("colour_de", "pass_absolute", "mad", "ssim", "mad_t2i")


def add_arguments(parser) -> None:
    g = parser.add_argument_group("reference drop")
    g.add_argument("--block", type=int, default=None,
                   help="the binding block k, 0..n (default: the first single block, after the double blocks)")
    g.add_argument("--blocks", default=None, help="several k: 'all' (0..n), 'a:b', 'a,b,c'")
    g.add_argument("--sweep", action="store_true", help="every k = 0..n (same as --blocks all)")
    g.add_argument("--check-removal", nargs="*", type=int, default=None, metavar="K",
                   help="k at which the removal form is run and compared with the mask form (default: the "
                        "middle k of the sweep; no value: none)")


def settings(args, config) -> dict:
    n = config.num_blocks
    ks = cli.blocks_from_args(args, n + 1, config.depth)
    check = [ks[len(ks) // 2]] if args.check_removal is None else sorted(set(args.check_removal))
    out = {"blocks": ks, "check_removal": check}
    return out


def validate(s: Mapping, config) -> None:
    n = config.num_blocks
    bad = [k for k in [*s["blocks"], *s["check_removal"]] if not 0 <= k <= n]
    if bad or not s["blocks"]:
        raise ValueError(f"binding blocks {bad or s['blocks']}: use k in 0..{n} (k = {n}: never dropped)")


def mask_form(config, layout, content_mask, k: int):
    """ref->image cut in blocks < k, every edge of the reference cut from block k on (the study's form)."""
    from fluxjax.interventions import Interventions, cut_reference, knockout

    # k = 0 cuts nothing before, k = n nothing after: the sweep's ends, so both allow an empty range
    before = knockout(config, layout, content_mask, "ref->image", range(k), allow_empty=True)
    return Interventions(knockout=before & cut_reference(config, layout, content_mask, k, allow_empty=True))


def removal_form(config, layout, content_mask, k: int):
    """ref->image cut in blocks < k, the reference tokens removed from the sequence from block k on."""
    from fluxjax.interventions import Interventions, drop_reference, knockout

    before = knockout(config, layout, content_mask, "ref->image", range(k)) if k > 0 else None
    return Interventions(knockout=before, drop_reference=drop_reference(layout, k))


def _task(ctx: Context, task, s: Mapping, cell) -> dict:
    base = ctx.baselines(task)
    ref_lab = ctx.reference_lab(task)
    edit = ctx.edit(task.instruction, task.reference, task.seed, task.height, task.width)
    config = ctx.model.config
    ks = sorted(set(s["blocks"]) | set(s["check_removal"]))
    images = dict(zip(ks, ctx.sweep(edit, [mask_form(config, edit.layout, edit.content_mask, k) for k in ks])))
    rows = [tables.control_row(NAME, ctx.judged_property, base["edit"], ref_lab, base["edit"], task=task.task_id,
                               setting="reference kept (edit)", block=None,
                               mad_t2i=metrics.mean_abs_diff(base["edit"], base["t2i"])),
            tables.control_row(NAME, ctx.judged_property, base["t2i"], ref_lab, base["edit"], task=task.task_id,
                               setting="t2i (no reference)", block=None, mad_t2i=0.0)]
    for k in s["blocks"]:
        cell.write_image(f"mask-k{k}.png", images[k])
        rows.append(tables.judged_row(NAME, ctx.judged_property, "kept", ctx.against_edit(task, cell, f"mask-k{k}.png"),
                                      images[k], ref_lab, rows[0]["colour_de"], base["edit"],
                                      task=task.task_id, setting=f"drop after {k}", block=k,
                                      mad_t2i=metrics.mean_abs_diff(images[k], base["t2i"])))
    checks = []
    for k in s["check_removal"]:
        removed = ctx.sample(edit, removal_form(config, edit.layout, edit.content_mask, k))[0][0]
        cell.write_image(f"removal-k{k}.png", removed)
        diff = np.abs(removed.astype(np.int16) - images[k].astype(np.int16))
        checks.append({"task": task.task_id, "block": k, "max_abs_diff": int(diff.max()),
                       "mean_abs_diff": float(diff.mean())})
    return {"rows": rows, "removal_checks": checks}


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    validate(s, ctx.model.config)
    rows = ctx.cells(TITLE, prefix, {t.task_id: functools.partial(_task, ctx, t, s) for t in tasks})
    checks = [c for t in tasks for c in ctx.run.cell(f"{prefix}/{t.task_id}").record()["removal_checks"]]
    cfg = ctx.model.config
    items = tables.write_tables(ctx.run, prefix, rows, MEANS, rates_title="Colour kept per binding block", text=(
        f"Blocks < k: ref->image cut; blocks >= k: the reference cut off (mask form). k = 0: never seen (a plain "
        f"text-to-image run); k = {cfg.num_blocks}: kept to the end with ref->image cut everywhere. mad / ssim: "
        "against the baseline edit; mad_t2i: against the text-to-image run with the task's seed."),
        control="reference kept (edit)")
    if checks:
        ctx.run.write_derived(f"{prefix}-removal-checks.csv", metrics.rows_to_csv(checks))
        worst = max(c["max_abs_diff"] for c in checks)
        items.append(report.Table(
            title="Removal form vs mask form", columns=["task", "block", "max_abs_diff", "mean_abs_diff"], rows=checks,
            formats={"mean_abs_diff": "{:.4f}"},
            note=f"Largest pixel difference (0-255) between removing the reference tokens and masking them: {worst}. "
                 "The two differ only in float rounding: softmax over the kept keys with the masked ones at "
                 "-inf versus over a shorter sequence."))
    ks = list(s["blocks"])
    if len(ks) > 1:
        swept = [r for r in rows if r["block"] is not None]
        series = {"mask form": [float(np.mean([r["colour_de"] for r in swept if r["block"] == k])) for k in ks]}
        items.append(tables.plot(ctx.run, f"{prefix}-colour-distance", ks, series,
                                 ylabel="CIEDE2000 to reference colour", threshold=tables.THRESHOLD,
                                 xlabel=f"binding block k (reference dropped from k on; k = {cfg.num_blocks}: never)",
                                 num_double_blocks=cfg.depth, title=TITLE,
                                 caption="Mean colour distance to the reference colour by binding block"))
        change = {"vs baseline edit": [float(np.mean([r["mad"] for r in swept if r["block"] == k])) for k in ks],
                  "vs text-to-image": [float(np.mean([r["mad_t2i"] for r in swept if r["block"] == k])) for k in ks]}
        items.append(tables.plot(ctx.run, f"{prefix}-change", ks, change, ylabel="mean |pixel diff|",
                                 xlabel=f"binding block k (k = {cfg.num_blocks}: never dropped)",
                                 num_double_blocks=cfg.depth, title=TITLE,
                                 caption="Change against the edit and against text-to-image by binding block"))
    return [report.Section(TITLE, items), tables.task_grids(ctx.run, f"{TITLE}: per-task grids", prefix, tasks, rows,
                                                             functools.partial(_grid, ctx, s, prefix))]


def _grid(ctx: Context, s: Mapping, prefix: str, task, cell, mine: Mapping[str, Mapping]):
    base = ctx.baselines(task)
    grid_rows = [tables.baseline_panels(base, mine["reference kept (edit)"], mine["t2i (no reference)"]),
                 [grids.Panel(f"k = {k}", cell.load_image(f"mask-k{k}.png"),
                               tables.de_caption(mine[f"drop after {k}"])) for k in s["blocks"]]]
    labels = ["", "mask form"]
    if s["check_removal"]:
        grid_rows.append([grids.Panel(f"k = {k}", cell.load_image(f"removal-k{k}.png")) for k in s["check_removal"]])
        labels.append("removal form")
    return tables.write_grid(ctx.run, f"grids/{prefix}/{task.task_id}.png",
                             f"{TITLE}: {task.task_id} ({task.instruction!r})", grid_rows, labels)


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
