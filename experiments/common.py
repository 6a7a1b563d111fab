"""What the experiment commands share: the command line, the model, the tasks, the run folder, the
baseline edits of each task, the metrics rows and the report plumbing.

Every command (`python -m experiments.lens`, `.knockout`, `.drop`, `.patching`, `.run_all`) takes

    --model NAME|PATH  what to run: `direct` or `text-routed`, the committed model organisms
                     (small FLUX.2 editors whose routing is known; see experiments.models;
                     default text-routed, run_all runs both); an organism folder; or a FLUX.2
                     model folder in the diffusers layout (e.g. FLUX.2-klein-9B/)
    --tasks FILE     a tasks.jsonl in the study's format (see experiments.tasks); without it, the
                     colour bucket (or the subset --colours/--objects/--seeds) is generated into the
                     run folder at --size pixels (32 for organisms, whose objects are their shapes;
                     else 1024)
    --out runs/NAME  the run folder (experiments.runs): resumable, never overwritten

A task's baseline edits live in the cell `baselines/<task_id>` and are shared by every experiment
of a run folder:

    reference.png       the reference image as given
    edit.png            the edit: instruction + reference, the task's noise seed
    t2i.png             text-to-image: the instruction, no reference, the task's seed
    t2i-next-seed.png   text-to-image with seed + 1: the T2I Lens's `t2i_clean`

Each experiment records one row of metrics per (task, setting): `colour_de` (CIEDE2000 between the
output's dominant colour and a reference colour), `pass` (the experiment's criterion), `mad` and
`ssim` against the task's baseline edit. Cells are computed by `cells`, the one place a run's
work is skipped on resume or done and marked complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import grids, models, report, runs, tasks as tasklib
from fluxjax import metrics

# Substitution positions: the names of the command line and the token groups they cover.
POSITIONS = {"all": "text", "padding": "text[padding]", "content": "text[content]"}

THRESHOLD = metrics.COLOUR_MATCH_DE00


# ---------------------------------------------------------------------------------------------
# names


def slug(text: str) -> str:
    """A file-name-safe form of a setting or block spec: 'ref->text[padding]' -> 'ref-to-text.padding',
    ':3' -> 'to3' (blocks before 3), '3:' -> '3to' (blocks from 3 on), '0,2' -> '0_2'."""
    out = (text.replace("->", "-to-").replace("[", ".").replace("]", "").replace(":", "to").replace(",", "_")
           .replace(" ", ""))
    out = re.sub(r"[^A-Za-z0-9._=+-]", "-", out)
    if not out or not out[0].isalnum():
        out = "x" + out
    return out


def parse_blocks(spec: str, num_blocks: int) -> list[int]:
    """'all', 'a:b' / ':k' / 'k:', one block 'k', or a list 'a,b,c' -> sorted block indices."""
    from fluxjax.interventions import block_indices

    spec = spec.strip()
    if "," in spec:
        return block_indices([int(s) for s in spec.split(",") if s.strip()], num_blocks)
    if spec == "all" or ":" in spec:
        return block_indices(spec, num_blocks)
    return block_indices(int(spec), num_blocks)


# ---------------------------------------------------------------------------------------------
# command line


def add_block_arguments(group, default_help: str) -> None:
    """--block / --blocks / --sweep: the blocks an experiment intervenes at."""
    group.add_argument("--block", type=int, default=None, help=f"one block k ({default_help})")
    group.add_argument("--blocks", default=None, help="several blocks: 'all', 'a:b', ':k', 'k:' or 'a,b,c'")
    group.add_argument("--sweep", action="store_true", help="every block: a block sweep (same as --blocks all)")


def blocks_from_args(args: argparse.Namespace, num_blocks: int, default: int) -> list[int]:
    if sum([args.block is not None, args.blocks is not None, bool(args.sweep)]) > 1:
        raise ValueError("give one of --block, --blocks and --sweep")
    if args.sweep:
        return list(range(num_blocks))
    if args.blocks is not None:
        return parse_blocks(args.blocks, num_blocks)
    return parse_blocks(str(default if args.block is None else args.block), num_blocks)


def add_arguments(parser: argparse.ArgumentParser, *, out_default: str, model_default: str = models.DEFAULT_MODEL,
                  colour_defaults: Mapping[str, tuple[str, str, str]] | None = None) -> None:
    """The model, task and run-folder options every experiment command takes.

    colour_defaults: per model kind ('organism', 'folder'), the default (colours,
    objects, seeds) of the generated colour bucket, each comma-separated (missing: the whole
    bucket; an organism's objects are its shapes)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=model_default,
                   help=f"'direct' or 'text-routed' (the committed model organisms), an organism folder, "
                        f"or a FLUX.2 model folder in the diffusers layout"
                        f"{'; several, comma-separated, run one after another' if ',' in model_default else ''} "
                        f"(default {model_default})")
    g.add_argument("--cache", default=None,
                   help="conversion and text-encoding cache (default: $FLUXJAX_CACHE or "
                        "~/.cache/fluxjax)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="transformer dtype (default: the checkpoint's)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps of every edit (default: the model's; 4 for [klein] distilled)")
    g.add_argument("--chunk", type=int, default=None,
                   help=f"sweep cells per vmapped compiled call (default {models.TINY_CHUNK} for organisms, "
                        f"{models.FOLDER_CHUNK} for a model folder; 0: a whole sweep at once; lower it if "
                        f"memory runs out)")
    g.add_argument("--attn-impl", choices=("xla", "blocked", "cudnn"), default=None,
                   help="attention implementation (default: 'blocked' on CPU, 'xla' elsewhere; 'blocked' "
                        "bounds memory at 1024x1024 on a GPU)")
    t = parser.add_argument_group("tasks")
    t.add_argument("--tasks", type=Path, default=None,
                   help="a tasks.jsonl in the study's format (default: the generated colour bucket)")
    t.add_argument("--root", type=Path, default=None,
                   help="folder relative reference paths in --tasks start from (default: the file's)")
    t.add_argument("--ids", default=None, help="comma-separated task ids to run (default: all)")
    t.add_argument("--limit", type=int, default=None, help="run at most this many tasks")
    parser.set_defaults(colour_defaults=dict(colour_defaults or {}))
    t.add_argument("--colours", default=None, help=f"colour bucket: comma-separated colours of "
                   f"{','.join(tasklib.COLOURS)} (default: {_default_help(colour_defaults, 0)})")
    t.add_argument("--objects", default=None, help=f"colour bucket: comma-separated objects of "
                   f"{','.join(tasklib.OBJECTS)}, or for organisms their shapes (default: "
                   f"{_default_help(colour_defaults, 1)})")
    t.add_argument("--seeds", default=None, help=f"colour bucket: comma-separated seeds among 0..4 (default: "
                   f"{_default_help(colour_defaults, 2)})")
    t.add_argument("--size", type=int, default=None,
                   help=f"the generated colour bucket's reference and output size (default "
                        f"{models.default_size('organism')} for organisms, {models.REAL_SIZE} for a model folder)")
    r = parser.add_argument_group("run")
    r.add_argument("--out", default=out_default, help=f"run folder (default {out_default}); an existing one "
                   "with the same configuration is resumed, one with another configuration is never reused "
                   "(the run goes to NAME-2, ...)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _default_help(defaults: Mapping[str, tuple] | None, i: int) -> str:
    parts = [f"{v[i]} for {k}" for k, v in (defaults or {}).items()]
    if len(parts) < 2:  # not every kind ('organism', 'folder') has a default
        parts.append("all otherwise" if parts else "all")
    return "; ".join(parts)


def colour_subset(args: argparse.Namespace, model_kind: str) -> dict:
    """The colour bucket subset of --colours/--objects/--seeds, defaults by model kind."""
    known = models.objects(model_kind)
    every = (",".join(tasklib.COLOURS), ",".join(known), ",".join(map(str, tasklib.SEEDS)))
    defaults = args.colour_defaults.get(model_kind, every)
    given = argparse.Namespace(**{name: value if value is not None else default for name, value, default in
                                  zip(("colours", "objects", "seeds"), (args.colours, args.objects, args.seeds),
                                      defaults)})
    subset = tasklib.colour_subset_from_args(given)
    tasklib.colour_bucket(**subset, known_objects=known, size=1)  # refuses unknown names before the model loads
    return {**subset, "known_objects": list(known)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def task_spec(args: argparse.Namespace) -> dict:
    """The run config's record of where the tasks come from."""
    ids = None if args.ids is None else [s.strip() for s in args.ids.split(",") if s.strip()]
    if args.tasks is not None:
        path = Path(args.tasks).resolve()
        if not path.is_file():
            raise ValueError(f"--tasks {args.tasks}: no such file")
        root = None if args.root is None else str(Path(args.root).resolve())
        return {"file": str(path), "sha256": file_sha256(path), "root": root, "ids": ids, "limit": args.limit}
    kind = models.kind(args.model)
    size = args.size if args.size is not None else models.default_size(kind)
    return {"colour_bucket": {**colour_subset(args, kind), "size": size}, "ids": ids, "limit": args.limit}


def load_tasks(spec: Mapping[str, Any], run: runs.RunFolder) -> list[tasklib.Task]:
    """The tasks of `spec` (see `task_spec`); a generated bucket is written to `<run>/tasks/`."""
    if "file" in spec:
        if file_sha256(Path(spec["file"])) != spec["sha256"]:
            raise ValueError(f"{spec['file']} changed since this run folder was made; start a new run (--out)")
        found = tasklib.read_tasks(spec["file"], root=spec["root"])
    else:
        bucket = spec["colour_bucket"]
        path = tasklib.write_colour_bucket(run.path / "tasks", bucket["colours"], bucket["objects"], bucket["seeds"],
                                           size=bucket["size"], known_objects=bucket["known_objects"])
        found = tasklib.read_tasks(path)
    found = tasklib.select(found, spec["ids"], spec["limit"])
    generated = [t.task_id for t in found if t.reference is None]
    if generated:
        raise ValueError(f"tasks {', '.join(generated[:5])}{' ...' if len(generated) > 5 else ''} have no reference "
                         "image (ref_seed + source_caption); these experiments need one: give real_ref_dir + "
                         "real_ref_name or source_image_path")
    return found


def sampler_options(model, steps: int | None):
    if steps is None:
        return model.options
    return dataclasses.replace(model.options, num_steps=int(steps))


# ---------------------------------------------------------------------------------------------
# the context every experiment works in


@dataclasses.dataclass
class Context:
    """The model, the open run folder and the sampling choices of one invocation."""

    model: Any  # fluxjax.pipeline.Flux2Model
    run: runs.RunFolder
    options: Any  # fluxjax.sampler.SamplerOptions of every edit
    chunk: int | None = models.TINY_CHUNK
    attn_impl: str | None = None
    show_progress: bool = True
    _texts: dict = dataclasses.field(default_factory=dict)
    _steps: Any = None

    @property
    def num_blocks(self) -> int:
        return self.model.config.num_blocks

    # text and edits ---------------------------------------------------------------------------
    def text(self, prompt: str):
        """A one-prompt TextConditioning (encoded once; the encoder caches on disk too)."""
        if prompt not in self._texts:
            from experiments.sweep import backend

            self._texts[prompt] = backend(self.model).encode_prompts([prompt])
        return self._texts[prompt]

    def edit(self, prompt: str, reference, seed: int, height: int, width: int):
        """A prepared edit (`experiments.sweep.Edit`): the prompt, an optional reference, the seed's noise."""
        from experiments import sweep

        uncond = self.text("") if self.model.options.guidance == "cfg" else None
        return sweep.prepare(self.model, self.text(prompt), reference=reference, seed=seed % 2**32, height=height,
                             width=width, uncond=uncond)

    # sampling, with the steps progress bar ------------------------------------------------------
    def _advance(self, options, calls: int = 1):
        if self._steps is not None:
            self._steps.update(options.num_steps * calls)

    def sample(self, edit, interventions=None, capture=None, options=None):
        """One sampler call: (pixels uint8 [1, H, W, 3], captures or None)."""
        from experiments import sweep

        options = options or self.options
        out = sweep.run(self.model, edit, options, interventions, capture, attn_impl=self.attn_impl)
        self._advance(options)
        return out

    def sweep(self, edit, cells: Sequence, options=None) -> np.ndarray:
        """Every cell's image from vmapped compiled calls: uint8 [V, H, W, 3]."""
        from experiments import sweep

        options = options or self.options
        out = sweep.sweep(self.model, edit, options, cells, chunk=self.chunk, attn_impl=self.attn_impl)
        size = len(cells) if self.chunk is None else min(self.chunk, len(cells))
        self._advance(options, -(-len(cells) // size))
        return out

    # cells --------------------------------------------------------------------------------------
    def cells(self, desc: str, jobs: Sequence[tuple[str, Callable[[runs.Cell], Mapping]]]) -> list[dict]:
        """Run `jobs` (cell key, compute) in order; complete cells are skipped. Returns every record.

        compute(cell) writes the cell's files and returns its record; the cell is then marked
        complete. Bars: one for the jobs (tasks), one nested for the denoising steps.
        """
        keys = [k for k, _ in jobs]
        pending = set(self.run.pending(keys))
        bar = runs.progress(desc=desc, unit="task", total=len(jobs), initial=len(jobs) - len(pending),
                            enabled=None if self.show_progress else False)
        outer_steps = self._steps
        self._steps = runs.progress(desc="  denoising", unit="step", nested=True,
                                    enabled=None if self.show_progress else False)
        try:
            for key, compute in jobs:
                if key in pending:
                    self.complete(key, compute)
                    bar.update()
            return [self.run.cell(k).record() for k in keys]
        finally:
            self._steps.close()
            self._steps = outer_steps
            bar.close()

    def complete(self, key: str, compute: Callable[[runs.Cell], Mapping]) -> dict:
        """The record of cell `key`, computing and completing the cell unless it is already complete."""
        cell = self.run.cell(key)
        if cell.done:
            return cell.record()
        record = dict(compute(cell))
        cell.finish(record)
        return record

    # baselines ------------------------------------------------------------------------------------
    def baselines(self, task: tasklib.Task) -> dict[str, np.ndarray]:
        """The task's baseline images (uint8 [H, W, 3]): reference, edit, t2i, t2i-next-seed."""
        key = f"baselines/{task.task_id}"

        def compute(cell: runs.Cell) -> dict:
            reference = load_reference(task)
            cell.write_image("reference.png", reference)
            edit = self.edit(task.instruction, task.reference, task.seed, task.height, task.width)
            cell.write_image("edit.png", self.sample(edit)[0][0])
            t2i = self.edit(task.instruction, None, task.seed, task.height, task.width)
            cell.write_image("t2i.png", self.sample(t2i)[0][0])
            t2i_next = self.edit(task.instruction, None, task.seed + 1, task.height, task.width)
            cell.write_image("t2i-next-seed.png", self.sample(t2i_next)[0][0])
            return {"reference_lab": list(metrics.reference_colour(reference))}

        self.complete(key, compute)
        cell = self.run.cell(key)
        return {name: np.asarray(cell.load_image(f"{name}.png"))
                for name in ("reference", "edit", "t2i", "t2i-next-seed")}

    def reference_lab(self, task: tasklib.Task) -> tuple[float, float, float]:
        self.baselines(task)
        return tuple(self.run.cell(f"baselines/{task.task_id}").record()["reference_lab"])


def load_reference(task: tasklib.Task) -> np.ndarray:
    from PIL import Image

    with Image.open(task.reference) as im:
        return np.asarray(im.convert("RGB"))


def chunk_size(args: argparse.Namespace) -> int | None:
    if args.chunk is None:
        return models.default_chunk(models.kind(args.model))
    if args.chunk < 0:
        raise ValueError(f"--chunk {args.chunk}: give a positive number of cells, or 0 for a whole sweep at once")
    return args.chunk or None


def open_context(args: argparse.Namespace, model, run: runs.RunFolder) -> Context:
    return Context(model=model, run=run, options=sampler_options(model, args.steps), chunk=chunk_size(args),
                   attn_impl=args.attn_impl, show_progress=not args.no_progress)


def base_config(args: argparse.Namespace, model, model_record: Mapping) -> dict:
    """The parts of a run config every experiment shares (what changes the outputs)."""
    options = sampler_options(model, args.steps)
    return {"model": dict(model_record), "tasks": task_spec(args),
            "sampler": {"num_steps": options.num_steps, "guidance": options.guidance,
                        "guidance_scale": options.guidance_scale},
            "chunk": chunk_size(args), "attn_impl": args.attn_impl}


def open_run_folder(out: str, config: Mapping) -> runs.RunFolder:
    path = Path(out)
    return runs.open_run(path.parent if str(path.parent) else Path("."), path.name, config)


# ---------------------------------------------------------------------------------------------
# metrics rows


def change(image: np.ndarray, baseline: np.ndarray) -> dict:
    """Change against a baseline image: mean absolute pixel difference (0-255) and SSIM."""
    return {"mad": metrics.mean_abs_diff(image, baseline), "ssim": metrics.ssim(image, baseline)}


def colour_row(image: np.ndarray, colour_lab: Sequence[float], baseline: np.ndarray, **fields) -> dict:
    """A metrics row: `colour_de` to `colour_lab`, `colour_match` (<= THRESHOLD), and change vs `baseline`."""
    de = metrics.colour_error(image, colour_lab)
    return {**fields, "colour_de": de, "colour_match": bool(de <= THRESHOLD), **change(image, baseline)}


def setting_means(rows: Sequence[Mapping], columns: Sequence[str], key: str = "setting") -> list[dict]:
    """Per-setting means of numeric columns (bools as rates), settings in first-seen order."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    out = []
    for name, rs in groups.items():
        row = {key: name, "n": len(rs)}
        for c in columns:
            vals = [float(r[c]) for r in rs if r.get(c) is not None]
            row[c] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def series_by_block(rows: Sequence[Mapping], blocks: Sequence[int], series_key: str, block_key: str,
                    value: str) -> dict[str, list[float | None]]:
    """{series: [mean of `value` at each block]} for a sweep plot."""
    out: dict[str, list[float | None]] = {}
    for name in dict.fromkeys(str(r[series_key]) for r in rows):
        means = []
        for b in blocks:
            vals = [float(r[value]) for r in rows if str(r[series_key]) == name and r[block_key] == b]
            means.append(float(np.mean(vals)) if vals else None)
        out[name] = means
    return out


# ---------------------------------------------------------------------------------------------
# derived files and report sections


def cell_size(image: np.ndarray) -> int:
    return 192 if max(image.shape[:2]) <= 128 else 256


def write_grid(run: runs.RunFolder, name: str, title: str, rows: Sequence[Sequence[grids.Panel]],
               row_labels: Sequence[str] | None = None) -> Path:
    first = next(p.image for row in rows for p in row if p.image is not None)
    image = grids.grid(rows, title=title, cell=cell_size(np.asarray(first)), row_labels=row_labels)
    return run.write_derived(name, runs.encode_image(image))


def write_tables(run: runs.RunFolder, prefix: str, rows: Sequence[Mapping], *, pass_key: str, criterion: str,
                 threshold: float | None, columns: Sequence[str]) -> tuple[list, list[dict]]:
    """`<prefix>-metrics.csv` (every row) and `<prefix>-pass-rates.csv`; returns (pass rates, means)."""
    run.write_derived(f"{prefix}-metrics.csv", metrics.rows_to_csv(rows))
    rates = metrics.pass_rates(rows, criterion=criterion, threshold=threshold, pass_key=pass_key)
    run.write_derived(f"{prefix}-pass-rates.csv", metrics.pass_rates_csv(rates))
    return rates, setting_means(rows, columns)


MAX_GRIDS = 24  # per-task grids shown in a report (all are written to grids/<prefix>/)


def grids_section(title: str, prefix: str, grid_files: Sequence[tuple[Path, str]]) -> report.Section:
    """A report section of per-task grids, (path, caption) each: the first MAX_GRIDS shown."""
    note = [] if len(grid_files) <= MAX_GRIDS else [
        report.Text(f"The first {MAX_GRIDS} of {len(grid_files)} grids; all are in grids/{prefix}/.")]
    return report.Section(title, note + [report.Figure(path=p, caption=c) for p, c in grid_files[:MAX_GRIDS]])


def block_rows(cell: runs.Cell, positions: Sequence[str], blocks: Sequence[int], rows: Mapping[str, Mapping],
               caption: Callable[[Mapping], str]) -> list[list[grids.Panel]]:
    """Grid rows of a (positions x blocks) sweep: a row per position set, a panel per block, from the
    cell's `{pos}-b{k}.png` and the metrics row of setting `{pos} b{k}`."""
    return [[panel(f"block {k}", cell.load_image(f"{pos}-b{k}.png"), caption(rows[f"{pos} b{k}"])) for k in blocks]
            for pos in positions]


def rate_table(title: str, rates: Sequence, note: str = "") -> report.Table:
    rows = [{"setting": p.setting, "n": p.n, "passed": p.passed, "rate": p.rate} for p in rates]
    criterion = rates[0].criterion if rates else ""
    return report.Table(title=title, columns=["setting", "n", "passed", "rate"], rows=rows,
                        formats={"rate": "{:.0%}"}, note=(f"A pass: {criterion}. " + note).strip())


def means_table(title: str, means: Sequence[Mapping], columns: Sequence[str], note: str = "") -> report.Table:
    formats = {c: "{:.0%}" if c in ("colour_match", "transferred") else "{:.2f}" for c in columns}
    return report.Table(title=title, columns=["setting", "n", *columns], rows=list(means), formats=formats, note=note)


def plot(run: runs.RunFolder, name: str, blocks: Sequence[int], series: Mapping, caption: str,
         **kwargs) -> report.Figure:
    """A sweep plot saved as `plots/<name>.png`, as a report figure."""
    path = run.write_derived(f"plots/{name}.png", report.sweep_plot(blocks, series, **kwargs))
    return report.Figure(path=path, caption=caption)


def panel(label: str, image: np.ndarray | None, caption: str = "") -> grids.Panel:
    return grids.Panel(label=label, image=image, caption=caption)


def de_caption(row: Mapping) -> str:
    return f"dE {row['colour_de']:.1f}"


@dataclasses.dataclass(frozen=True)
class Timer:
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def describe_model(ctx: Context) -> str:
    cfg = ctx.model.config
    return (f"Model: {ctx.run.config['model']['name']} ({cfg.depth} double + {cfg.depth_single_blocks} single "
            f"blocks = {cfg.num_blocks}, hidden {cfg.hidden_size}, {ctx.run.config['model']['dtype']}); "
            f"{ctx.options.num_steps} denoising steps, guidance {ctx.options.guidance}. Blocks are numbered "
            f"globally, double blocks first (0..{cfg.depth - 1}).")


def run_command(module, argv: Sequence[str] | None = None) -> int:
    """main() of an experiment module: parse, load the model, open the run folder, run, report.

    module provides NAME, TITLE, __doc__, add_arguments(parser), settings(args, config) -> dict
    (the run config's settings; raises ValueError for bad ones) and
    run(ctx, tasks, settings, prefix) -> list of report sections.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{module.NAME}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    add_arguments(parser, out_default=f"runs/{module.NAME}")
    args = parser.parse_args(argv)
    try:
        spec = task_spec(args)
        model, model_record = models.load(args)
        config = {**base_config(args, model, model_record), "experiment": module.NAME,
                  "settings": module.settings(args, model.config)}
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    timer = Timer()
    with open_run_folder(args.out, config) as run:
        ctx = open_context(args, model, run)
        try:
            found = load_tasks(spec, run)
        except (ValueError, KeyError) as e:
            parser.error(str(e))
        sections = [report.Section("Setup", [report.Text(describe_model(ctx) + f"\n\n{len(found)} tasks.")])]
        sections += module.run(ctx, found, config["settings"], module.NAME)
        path = report.write_run_report(run, f"{module.TITLE}: {model_record['name']}", sections)
        run.write_summary({"experiment": module.NAME, "tasks": len(found), "seconds": timer.seconds(),
                           "resumed": run.resumed})
    print(f"report: {path}")
    return 0
