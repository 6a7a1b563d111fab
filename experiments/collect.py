"""Collect activations: run a task set (optionally under an intervention) and keep the captures on disk.

Every task's edit is sampled once with the requested sites captured at every step (the sites of
`fluxjax.sites`: `--blocks` x `--kinds`, and any `--sites` by name); the steps `--keep-steps`
names are written to an activation store (`experiments.store`: a zarr group written with
TensorStore, readable without fluxjax) inside the run folder, `<run>/collect.zarr`:

    one array per site     [task, step, token, width], the model's dtype, bit for bit what the
                           forward returned
    text_content           bool [task, text token], the instruction's tokens (the rest is padding)
    written                bool [task], set once a task's chunk is on disk
    .zattrs                task ids and labels (colour, object, reference RGB and CIELAB), sites,
                           steps, token counts per stream, token groups, model, intervention

The store is chunked by task (`--chunk-tasks` tasks a chunk): a chunk is one cell of the run
folder (`collect/chunk-00000`, ...), computed task by task and written whole, so memory holds one
chunk's captures at a time, and a killed collection resumes at the first unfinished chunk (a
chunk is rewritten whole, to the same bytes). Without a reference (`--no-reference`) each task
runs as text-to-image with its instruction and seed: the baseline of `experiments.probe`.
`--knockout SETTING` cuts the setting's edges (as `experiments.knockout --settings`) in
`--knockout-layers` at every step.

    python -m experiments.collect --model text-routed --seeds 0,1,2,3,4 --out runs/collect/text-routed
    python -m experiments.collect --model text-routed --no-reference --out runs/collect/text-routed-t2i
    python -m experiments.collect --model /models/FLUX.2-klein-9B --blocks 7,17 --keep-steps last --chunk-tasks 1

Read it with TensorStore alone:

    import json, tensorstore as ts
    attrs = json.load(open("runs/collect/text-routed/collect.zarr/.zattrs"))
    x = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                 "path": "runs/collect/text-routed/collect.zarr/b3.text.output"}}).result()[...].read().result()
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import cli, knockout as knockoutlib, models, report
from experiments import store as storelib
from experiments.context import Context, load_reference
from fluxjax import metrics
from fluxjax.sites import STREAMS, as_site

NAME = "collect"
TITLE = "Activations collected"
STORE_SUFFIX = ".zarr"
DEFAULT_CHUNK_TASKS = {"organism": 16, "folder": 1}  # a klein-9B task's 32-block text grid: 0.5 GB in bf16 at 4 steps


def add_arguments(parser) -> None:
    g = parser.add_argument_group("collection")
    g.add_argument("--blocks", default="all",
                   help="blocks whose sites are captured: 'all', 'a:b', 'a,b,c' (default all); 'none' for --sites alone")
    g.add_argument("--kinds", default="text.output",
                   help="comma-separated stream.point of the sites at each block (default text.output; streams "
                        f"{'/'.join(STREAMS)}, points input/attn_out/mlp_out/output)")
    g.add_argument("--sites", nargs="*", default=[],
                   help="more sites by name, e.g. embed.text.output b3.image.attn_out")
    g.add_argument("--keep-steps", default="all",
                   help="the denoising steps kept: 'all', 'last', or 0-based indices 'a,b' (default all)")
    g.add_argument("--chunk-tasks", type=int, default=None,
                   help=f"tasks per chunk of the store and per cell of the run (default "
                        f"{DEFAULT_CHUNK_TASKS['organism']} for organisms, {DEFAULT_CHUNK_TASKS['folder']} for a model "
                        "folder): memory holds one chunk's captures")
    g.add_argument("--no-reference", action="store_true",
                   help="run each task as text-to-image (its instruction and seed, no reference): the probe's baseline")
    g.add_argument("--knockout", default=None, metavar="SETTING",
                   help="cut these edges at every step (a setting of experiments.knockout, e.g. 'ref->text[padding]')")
    g.add_argument("--knockout-layers", default="all", help="blocks of --knockout (default all)")


def settings(args, config) -> dict:
    n = config.num_blocks
    blocks = [] if args.blocks == "none" else cli.parse_blocks(args.blocks, n, "--blocks")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    sites = [as_site(f"b{b}.{kind}").name for b in blocks for kind in kinds]
    sites += [as_site(s).name for s in args.sites if as_site(s).name not in sites]
    chunk = args.chunk_tasks if args.chunk_tasks is not None else DEFAULT_CHUNK_TASKS[models.kind(args.model)]
    return {"sites": sites, "keep_steps": args.keep_steps, "chunk_tasks": chunk, "reference": not args.no_reference,
            "knockout": args.knockout, "knockout_layers": args.knockout_layers}


def validate(s: Mapping, config) -> None:
    if not s["sites"]:
        raise ValueError("no site to collect: give --blocks and --kinds, or --sites")
    for name in s["sites"]:
        site = as_site(name)
        site.check(config.num_blocks)
        if site.stream == "reference" and not s["reference"]:
            raise ValueError(f"site {name}: a run without a reference (--no-reference) has no reference stream")
    if s["chunk_tasks"] < 1:
        raise ValueError(f"--chunk-tasks {s['chunk_tasks']}: give at least one task per chunk")
    if s["keep_steps"] not in ("all", "last"):
        try:
            [int(v) for v in s["keep_steps"].split(",")]
        except ValueError:
            raise ValueError(f"--keep-steps {s['keep_steps']!r}: write 'all', 'last' or indices 'a,b'") from None
    if s["knockout"] is not None:
        knockoutlib.validate({"settings": [s["knockout"]], "layers": [s["knockout_layers"]], "sweep": [],
                              "sweep_from": [], "sweep_mode": "suffix", "window": 1}, config)


def kept_steps(spec: str, num_steps: int) -> list[int]:
    """The 0-based step indices `--keep-steps` names, of a sampler of `num_steps` steps."""
    if spec == "all":
        return list(range(num_steps))
    if spec == "last":
        return [num_steps - 1]
    steps = [int(v) for v in spec.split(",")]
    bad = [v for v in steps if not 0 <= v < num_steps]
    if bad or len(set(steps)) != len(steps):
        raise ValueError(f"--keep-steps {spec}: give distinct steps among 0..{num_steps - 1}")
    return steps


def labels(task) -> dict:
    """What a probe may predict of a task: its colour name, object and reference colour (RGB, CIELAB)."""
    meta = dict(task.metadata)
    out = {k: meta[k] for k in ("colour", "object", "rgb") if k in meta}
    if task.reference is not None:
        out["lab"] = [float(v) for v in metrics.reference_colour(load_reference(task))]
    return out


def interventions(ctx: Context, edit, s: Mapping):
    """The collection's intervention on one edit: the knockout asked for, or none."""
    if s["knockout"] is None:
        return None
    from fluxjax.interventions import Interventions, knockout

    blocks = cli.parse_blocks(s["knockout_layers"], ctx.num_blocks, "--knockout-layers")
    return Interventions(knockout=knockout(ctx.model.config, edit.layout, edit.content_mask,
                                           knockoutlib.edges(s["knockout"]), blocks))


def edit_of(ctx: Context, task, s: Mapping):
    return ctx.edit(task.instruction, task.reference if s["reference"] else None, task.seed, task.height, task.width)


def store_path(ctx: Context, prefix: str):
    return ctx.run.path / f"{prefix}{STORE_SUFFIX}"


def open_store(ctx: Context, tasks: Sequence, s: Mapping, prefix: str) -> storelib.Store:
    """The run's store for `tasks`: created by the process that writes the run's files (or found
    there, when resuming), then opened by every process."""
    steps = kept_steps(s["keep_steps"], ctx.options.num_steps)
    edit = edit_of(ctx, tasks[0], s)
    layout, width = edit.layout, ctx.model.config.hidden_size
    tokens = {"text": layout.n_txt, "image": layout.n_img, "reference": layout.n_ref}
    path = store_path(ctx, prefix)
    if ctx.run.writes_run_files:
        sites = {name: (tokens[as_site(name).stream], width) for name in s["sites"]}
        attrs = {"labels": {t.task_id: labels(t) for t in tasks}, "tokens": tokens,
                 "groups": {"text": ["content", "padding"],
                            "note": "text positions where text_content is true are the instruction's tokens "
                                    "(content); the others are padding"},
                 "model": ctx.run.config["model"], "sampler": ctx.run.config["sampler"],
                 "run": {"reference": s["reference"], "knockout": s["knockout"],
                         "knockout_layers": s["knockout_layers"] if s["knockout"] else None}}
        storelib.create(path, tasks=[t.task_id for t in tasks], sites=sites, steps=steps,
                        dtype=np.dtype(edit.txt.dtype), text_tokens=layout.n_txt, chunk_tasks=s["chunk_tasks"],
                        attrs=attrs)
    ctx.hosts.barrier(f"store {prefix}")
    return storelib.Store(path)


def _chunk(ctx: Context, store: storelib.Store, tasks: Sequence, index: int, s: Mapping, cell) -> dict:
    """Compute chunk `index`: every task's captures, task by task, then the chunk written whole."""
    from fluxjax.interventions import Capture

    rows = store.chunks()[index]
    chunk_tasks = [tasks[i] for i in rows]
    steps = store.steps
    capture = Capture(sites=tuple(s["sites"]))
    values: dict[str, np.ndarray] = {}
    content = np.zeros((len(rows), store.attrs["tokens"]["text"]), bool)
    for j, task in enumerate(chunk_tasks):
        edit = edit_of(ctx, task, s)
        _, caps = ctx.sample(edit, interventions(ctx, edit, s), capture)
        for name in s["sites"]:
            value = np.asarray(caps[name])[steps, 0]  # [step, token, width]: the batch of one dropped
            if name not in values:
                values[name] = np.empty((len(rows), *value.shape), value.dtype)
            values[name][j] = value
        content[j] = np.asarray(edit.content_mask, bool)[0]
        del caps
    store.write_chunk(index, values, content)
    digest = {name: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for name, v in values.items()}
    cell.write_json("chunk.json", {"tasks": [t.task_id for t in chunk_tasks], "rows": [rows.start, rows.stop],
                                   "sha256": digest})
    return {"tasks": [t.task_id for t in chunk_tasks], "sha256": digest}


def collect(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> storelib.Store:
    """Collect `tasks` into the run's store `<run>/<prefix>.zarr`, chunk by chunk (cells
    `<prefix>/chunk-NNNNN`; complete chunks are skipped). Returns the store."""
    validate(s, ctx.model.config)
    if not tasks:
        raise ValueError("no task to collect")
    store = open_store(ctx, tasks, s, prefix)
    jobs = {f"chunk-{i:05d}": functools.partial(_chunk, ctx, store, tasks, i, s) for i in range(len(store.chunks()))}
    ctx.cells(TITLE, prefix, jobs, unit="chunk")
    return store


def run(ctx: Context, tasks: Sequence, s: Mapping, prefix: str = NAME) -> list[report.Section]:
    store = collect(ctx, tasks, s, prefix)
    return [section(ctx, store)]


def section(ctx: Context, store: storelib.Store) -> report.Section:
    """The report's account of a store: where it is, what it holds, how to open it."""
    rows = []
    for name in store.sites:
        array = store.array(name)
        rows.append({"site": name, "shape": " x ".join(map(str, array.shape)), "dtype": str(array.dtype.name),
                     "MB": array.dtype.numpy_dtype.itemsize * int(np.prod(array.shape)) / 2**20})
    run = store.attrs["run"]
    what = "text-to-image (no reference)" if not run["reference"] else "the edit"
    if run["knockout"]:
        what += f", knockout {run['knockout']} in blocks {run['knockout_layers']}"
    rel = store.path.relative_to(ctx.run.path).as_posix()
    return report.Section(f"{TITLE}: {rel}", [
        report.Text(f"{len(store.tasks)} tasks ({what}), {int(store.written().sum())} written, in chunks of "
                    f"{store.chunk_tasks} tasks; steps kept {store.steps}. The store is a zarr group "
                    f"({rel}, written with TensorStore): one array per site [task, step, token, width], "
                    "text_content [task, text token] (the instruction's tokens; the rest is padding), written [task]; "
                    "task ids, labels, sites and steps in its .zattrs."),
        report.Table(title="Arrays", columns=["site", "shape", "dtype", "MB"], rows=rows, formats={"MB": "{:.1f}"})])


def main(argv=None) -> int:
    return cli.run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
