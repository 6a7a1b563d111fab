"""The command line of the experiment commands: the options every command takes, what they mean for
the run config, and the one `run_command` every experiment's `main` is.

Every command (`python -m experiments.lens`, `.knockout`, `.drop`, `.patching`, `.run_all`) takes

    --model NAME|PATH  what to run: `direct` or `text-routed`, the committed model organisms
                     (small FLUX.2 editors whose routing is known; see experiments.models;
                     default text-routed, run_all runs both); an organism folder; or a FLUX.2
                     model folder in the diffusers layout (e.g. FLUX.2-klein-9B/)
    --tasks FILE..   task files in the study's format (see experiments.tasks), read unchanged from a
                     checkout of the study's repository; without them, the
                     colour bucket (or the subset --colours/--objects/--seeds) is generated into the
                     run folder at --size pixels (32 for organisms, whose objects are their shapes;
                     else 1024)
    --pair-tasks FILE..
                     (patching, run_all) task files whose tasks only resolve --pairs: the patching
                     pairs may name them, no other experiment runs them (the study's style -> real
                     pairs take their targets from its `manual` bucket, its identity pairs from
                     `dreambench_humans_shared`)
    --out runs/NAME  the run folder (experiments.runs): resumable, never overwritten
    --devices, --fsdp, --distributed ...
                     the devices of the sweeps and the processes of JAX's distributed runtime
                     sharing the run folder (experiments.hosts)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import hosts as hostlib
from experiments import models, report, runs, tasks as tasklib
from experiments.context import Context
from experiments.hosts import Hosts
from fluxjax.options import ATTENTION_KERNELS, RuntimeOptions

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


def parse_blocks(spec: str, num_blocks: int, option: str = "blocks") -> list[int]:
    """'all', 'a:b' / ':k' / 'k:', one block 'k', or a list 'a,b,c' -> sorted block indices. A spec
    that names a block the model lacks or selects none raises a ValueError naming `option` (e.g.
    '--layers')."""
    from fluxjax.interventions import block_indices

    text = str(spec).strip()
    if "," in text:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"{option} {text!r}: a list of blocks is whole numbers separated by commas, e.g. '0,3,7'")
        return block_indices([int(p) for p in parts], num_blocks, what=option)
    if text == "all" or ":" in text:
        return block_indices(text, num_blocks, what=option)
    if not text.isdigit():
        raise ValueError(f"{option} {text!r}: give 'all', one block k, 'a:b', ':k', 'k:' or 'a,b,c' "
                         f"(this model has blocks 0..{num_blocks - 1})")
    return block_indices(int(text), num_blocks, what=option)


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
        return parse_blocks(args.blocks, num_blocks, "--blocks")
    if args.block is not None:
        return parse_blocks(str(args.block), num_blocks, "--block")
    return parse_blocks(str(default), num_blocks)


def sweep_settings(args: argparse.Namespace, config) -> dict:
    """The blocks (--block/--blocks/--sweep; default the last double block, the study's style cell) and
    text positions (--positions) of a substitution sweep."""
    return {"blocks": blocks_from_args(args, config.num_blocks, config.depth - 1),
            "positions": list(dict.fromkeys(args.positions))}


def check_blocks_and_positions(what: str, s: Mapping, config) -> None:
    """Refuse a sweep's settings whose `blocks` or text `positions` this model does not have."""
    from experiments.sweep import POSITIONS

    if not s["blocks"] or any(not 0 <= b < config.num_blocks for b in s["blocks"]):
        raise ValueError(f"{what} blocks {s['blocks']}: this model has blocks 0..{config.num_blocks - 1}")
    if set(s["positions"]) - set(POSITIONS) or not s["positions"]:
        raise ValueError(f"{what} positions {s['positions']}: choose among {list(POSITIONS)}")


def add_arguments(parser: argparse.ArgumentParser, *, out_default: str, model_default: str = models.DEFAULT_MODEL,
                  colour_defaults: Mapping[str, tuple[str, str, str]] | None = None,
                  pair_tasks: bool = False) -> None:
    """The model, task and run-folder options every experiment command takes.

    colour_defaults: per model kind ('organism', 'folder'), the default (colours,
    objects, seeds) of the generated colour bucket, each comma-separated (missing: the whole
    bucket; an organism's objects are its shapes). pair_tasks: the command patches pairs, so it
    takes --pair-tasks."""
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
    g.add_argument("--text-length", type=int, default=None,
                   help="model folders: the text tokens every prompt is padded to (default 512, the pipelines'; the "
                        "study calls this maximum length an implicit capacity hyperparameter: the padding positions "
                        "are where the reference's content is bound)")
    g.add_argument("--chunk", type=int, default=None,
                   help=f"sweep cells per vmapped compiled call (default {models.TINY_CHUNK} for organisms; for a "
                        f"model folder as many as the accelerator's free memory holds, {models.FOLDER_CHUNK} on "
                        f"CPU; 0: a whole sweep at once)")
    g.add_argument("--attn-impl", choices=ATTENTION_KERNELS, default=None,
                   help="attention implementation (default: measured per backend, see docs/attention.md: "
                        "'blocked' on CPU, 'cudnn' on GPU, 'pallas' on TPU)")
    t = parser.add_argument_group("tasks")
    t.add_argument("--tasks", type=Path, nargs="+", default=None,
                   help="task files (tasks.jsonl) in the study's format, their ids distinct (default: the generated "
                        "colour bucket)")
    if pair_tasks:
        t.add_argument("--pair-tasks", type=Path, nargs="+", default=None,
                       help="task files whose tasks only resolve the --pairs file (patching): no other experiment runs "
                            "them (e.g. the study's manual/tasks.jsonl for its style -> real pairs)")
    t.add_argument("--root", type=Path, default=None,
                   help="folder relative reference paths in --tasks start from (default: the nearest folder, from "
                        "each file's upwards, where they exist: the study's repository root for its files)")
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
                   "with the same configuration is resumed (damaged cells are computed again), anything else "
                   "that exists there is refused")
    r.add_argument("--verify", action="store_true",
                   help="compute nothing: check every finished cell of --out against the sizes and hashes it was "
                        "written with, list what is damaged or unfinished, exit 1 if anything is damaged")
    r.add_argument("--check", action="store_true",
                   help="check every input (model, tasks and references, settings, --out) as a run would before "
                        "its first step, then exit: nothing loads, nothing is written")
    r.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    hostlib.add_arguments(parser)


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
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of tasks")
    pair_files = getattr(args, "pair_tasks", None)
    if pair_files is not None and args.tasks is None:
        raise ValueError("--pair-tasks: give the tasks to run with --tasks too (pair tasks only resolve --pairs)")
    if pair_files is not None and getattr(args, "pairs", None) is None:
        raise ValueError("--pair-tasks: give the --pairs file whose pairs name them")
    if args.tasks is not None:
        def recorded(option, given):
            path = Path(given).resolve()
            if not path.is_file():
                raise ValueError(f"{option} {given}: no such file")
            return {"file": str(path), "sha256": file_sha256(path)}

        files = [recorded("--tasks", given) for given in args.tasks]
        if args.root is not None and not Path(args.root).is_dir():
            raise ValueError(f"--root {args.root}: no such folder")
        root = None if args.root is None else str(Path(args.root).resolve())
        spec = {"files": files, "root": root, "ids": ids, "limit": args.limit}
        if pair_files is not None:
            spec["pair_files"] = [recorded("--pair-tasks", given) for given in pair_files]
        return spec
    kind = models.kind(args.model)
    size = args.size if args.size is not None else models.default_size(kind)
    if args.size is not None:
        from fluxjax.images import MIN_SIDE  # the FLUX.2 pipelines' smallest reference side

        models.check_size(kind, size, size, f"--size {size}")
        if kind == "folder" and size < MIN_SIDE:
            raise ValueError(f"--size {size}: the colour bucket's references would be {size} px; a FLUX.2 model "
                             f"folder needs references of at least {MIN_SIDE} px")
    return {"colour_bucket": {**colour_subset(args, kind), "size": size}, "ids": ids, "limit": args.limit}


def _read(spec: Mapping[str, Any]) -> tuple[list[tasklib.Task], list[tasklib.Task]]:
    """(the tasks of the --tasks files, those of the --pair-tasks files), their ids distinct across both."""
    main = tasklib.read_task_files([f["file"] for f in spec["files"]], root=spec["root"])
    pair = tasklib.read_task_files([f["file"] for f in spec.get("pair_files", ())], root=spec["root"])
    both = sorted({t.task_id for t in main} & {t.task_id for t in pair})
    if both:
        raise tasklib.TaskFileError(f"task id {both[0]!r} is in both a --tasks and a --pair-tasks file; give each "
                                    "task once (--pair-tasks: the tasks only the pairs name)")
    return main, pair


def select_pair_tasks(spec: Mapping[str, Any]) -> list[tasklib.Task]:
    """The tasks of the --pair-tasks files of `spec` (none without them): they resolve pairs only."""
    return _read(spec)[1] if spec.get("pair_files") else []


def select_tasks(spec: Mapping[str, Any]) -> list[tasklib.Task]:
    """The tasks `spec` (see `task_spec`) selects, read from its files or generated in memory; the
    references are not checked here (`check_tasks`)."""
    if "files" in spec:
        found = _read(spec)[0]
    else:
        b = spec["colour_bucket"]
        found = tasklib.colour_bucket(b["colours"], b["objects"], b["seeds"], size=b["size"],
                                      known_objects=b["known_objects"])
    found = tasklib.select(found, spec["ids"], spec["limit"])
    if not found:
        raise ValueError("--ids selects no task")
    generated = [t.task_id for t in found if t.reference is None and "files" in spec]
    if generated:
        raise ValueError(f"tasks {', '.join(generated[:5])}{' ...' if len(generated) > 5 else ''} have no reference "
                         "image (ref_seed + source_caption); these experiments need one: give real_ref_dir + "
                         "real_ref_name or source_image_path")
    return found


def check_tasks(spec: Mapping[str, Any], model: models.Spec) -> tuple[list[tasklib.Task], list[tasklib.Task]]:
    """(the tasks of `spec`, its pair tasks), each checked for `model`: its size, and its reference
    image (readable, of a mode that holds a picture, large enough). Raises `InputErrors`, one line
    per problem."""
    found, pair_found = select_tasks(spec), select_pair_tasks(spec)
    problems = []
    by_size: dict[tuple[int, int], list[str]] = {}
    for task in [*found, *pair_found]:
        by_size.setdefault((task.width, task.height), []).append(task.task_id)
    for (width, height), ids in by_size.items():  # one line per size, not per task
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        try:
            tasks = f"task{'s' if len(ids) > 1 else ''} {', '.join(ids[:3])}{more}"
            models.check_size(model.kind, width, height, tasks)
        except ValueError as e:
            problems.append(str(e))
    if "files" in spec:
        for reference in dict.fromkeys(t.reference for t in [*found, *pair_found]):
            try:
                models.check_reference(model.kind, reference)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise InputErrors(problems)
    return found, pair_found


# ---------------------------------------------------------------------------------------------
# the one validation step of every command


class InputErrors(ValueError):
    """Several input problems at once, one message each."""

    def __init__(self, messages: Sequence[str]):
        super().__init__("; ".join(messages))
        self.messages = list(messages)


@dataclasses.dataclass(frozen=True)
class Checked:
    """One model's inputs, every one checked before anything is loaded or any run folder is made."""

    model: models.Spec
    tasks: dict  # the run config's task record (`task_spec`)
    found: list  # the tasks it selects
    settings: dict  # the run config's settings
    pair_found: list = dataclasses.field(default_factory=list)  # the tasks that only resolve pairs


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace, model_values: Sequence[str],
                 settings: Callable[[argparse.Namespace, models.Spec, list | None], dict]) -> list[Checked]:
    """The one validation step every command runs before its first expensive step (loading a model)
    and before any run folder is made: the general options, each model named (`models.inspect`:
    nothing loads), the tasks and their reference images for that model, and the command's
    `settings(args, model, tasks)` (blocks, edges, pairs...; tasks, the pair tasks included, None
    when they could not be read)
    against the model's architecture. Every problem found is printed as one line on stderr, and the
    command exits with code 2; nothing has been written.
    """
    problems: list[str] = []

    def attempt(check, *check_args):
        try:
            return check(*check_args)
        except InputErrors as e:
            problems.extend(e.messages)
        except (ValueError, KeyError, OSError) as e:
            problems.append(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
        return None

    attempt(check_general, args)
    out = []
    for value in model_values:
        model = attempt(models.inspect, value, args.dtype)
        if model is None:
            continue
        margs = argparse.Namespace(**{**vars(args), "model": value})
        spec = attempt(task_spec, margs)
        both = None if spec is None else attempt(check_tasks, spec, model)
        found, pair_found = (None, None) if both is None else both
        chosen = attempt(settings, margs, model, None if both is None else [*found, *pair_found])
        if spec is not None and found is not None and chosen is not None:
            out.append(Checked(model=model, tasks=spec, found=found, settings=chosen, pair_found=pair_found))
    if problems:
        lines = list(dict.fromkeys(problems))  # one model's task problems repeat for the next
        parser.exit(2, "".join(f"{parser.prog}: error: {line}\n" for line in lines))
    return out


def check_general(args: argparse.Namespace) -> None:
    """The options every command takes that need no model loaded: --steps, --chunk, --text-length."""
    problems = []
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps {args.steps}: give at least one denoising step")
    if args.chunk is not None and args.chunk < 0:
        problems.append(f"--chunk {args.chunk}: give a positive number of cells, or 0 for a whole sweep at once")
    if getattr(args, "text_length", None) is not None:
        if args.text_length < 1:
            problems.append(f"--text-length {args.text_length}: give a positive number of text tokens")
        elif any(models.kind(m.strip()) == "organism" for m in args.model.split(",") if m.strip()):
            problems.append(f"--text-length {args.text_length}: an organism's text length is fixed when it is trained "
                            "(organisms.train --text-length); the option is for model folders")
    if problems:
        raise InputErrors(problems)


def checked_line(checked: Checked) -> str:
    """--check's answer: what a run of the checked inputs would do."""
    return (f"inputs checked: {checked.model.kind} {checked.model.name} ({checked.model.config.num_blocks} blocks), "
            f"{len(checked.found)} tasks, every setting valid; nothing run")


def command_settings(module, args: argparse.Namespace, model: models.Spec, found: list | None) -> dict:
    """An experiment module's settings from the command line, validated against the model's
    architecture, and (`module.check_tasks`, where it has one) against the tasks."""
    chosen = module.settings(args, model.config)
    module.validate(chosen, model.config)
    if found is not None and hasattr(module, "check_tasks"):
        module.check_tasks(chosen, found)
    return chosen


def load_pair_tasks(spec: Mapping[str, Any]) -> list[tasklib.Task]:
    """The tasks of the --pair-tasks files of `spec` (see `load_tasks`), none without them."""
    return _read(spec)[1] if spec.get("pair_files") else []


def load_tasks(spec: Mapping[str, Any], run: runs.RunFolder) -> list[tasklib.Task]:
    """The tasks of `spec` (see `task_spec`); a generated bucket is written to `<run>/tasks/` (by the
    process that writes the run's files; the others read it there)."""
    if "files" in spec:
        for f in [*spec["files"], *spec.get("pair_files", ())]:
            if file_sha256(Path(f["file"])) != f["sha256"]:
                raise ValueError(f"{f['file']} changed since this run folder was made; start a new run (--out)")
        found = _read(spec)[0]
    else:
        bucket = spec["colour_bucket"]
        path = run.path / "tasks" / "tasks.jsonl"
        if run.writes_run_files:
            path = tasklib.write_colour_bucket(run.path / "tasks", bucket["colours"], bucket["objects"],
                                               bucket["seeds"], size=bucket["size"],
                                               known_objects=bucket["known_objects"])
        found = tasklib.read_tasks(path)
    found = tasklib.select(found, spec["ids"], spec["limit"])
    generated = [t.task_id for t in found if t.reference is None]
    if generated:
        raise ValueError(f"tasks {', '.join(generated[:5])}{' ...' if len(generated) > 5 else ''} have no reference "
                         "image (ref_seed + source_caption); these experiments need one: give real_ref_dir + "
                         "real_ref_name or source_image_path")
    return found


def sampler_options(model, steps: int | None):
    """The model's sampler options with --steps applied."""
    return model.options if steps is None else dataclasses.replace(model.options, num_steps=int(steps))


def chunk_size(args: argparse.Namespace):
    """Cells per sweep call: an int, None (a whole sweep) or `experiments.sweep.AutoChunk`."""
    if args.chunk is None:
        return models.default_chunk(models.kind(args.model))
    if args.chunk < 0:
        raise ValueError(f"--chunk {args.chunk}: give a positive number of cells, or 0 for a whole sweep at once")
    return args.chunk or None


def open_context(args: argparse.Namespace, model, run: runs.RunFolder, hosts: Hosts | None = None,
                 placement=None) -> Context:
    """The context of one invocation: the model, the open run folder, the sampling options asked for,
    and the processes and devices it runs on."""
    return Context(model=model, run=run, options=sampler_options(model, args.steps), chunk=chunk_size(args),
                   runtime=RuntimeOptions(attention=args.attn_impl), show_progress=not args.no_progress,
                   hosts=hosts or Hosts(),
                   placement=placement)


def start_hosts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Hosts:
    """Check the device and process options and join JAX's distributed runtime if asked (before
    anything else touches JAX); a problem ends the command in one line per problem."""
    problems = hostlib.check_arguments(args)
    if problems:
        parser.exit(2, "".join(f"{parser.prog}: error: {line}\n" for line in problems))
    try:
        return hostlib.start(args)
    except (ValueError, RuntimeError) as e:  # no cluster detected, or the coordinator unreachable
        fail(parser, f"--distributed: JAX's distributed runtime did not start ({e}); outside a TPU pod, SLURM or "
                     "Open MPI give --coordinator HOST:PORT, --num-processes and --process-id")


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace, hosts: Hosts):
    """(model, its run config record, its placement on the devices): process 0 loads first (a model
    folder converts into the shared cache on first use), then the others."""
    if not hosts.writer:
        hosts.barrier("model loaded")
    try:
        model, record = models.load(args)
        placement = hostlib.placement(model, hosts, args.devices, args.fsdp)
    except (ValueError, KeyError, FileNotFoundError) as e:
        parser.error(str(e))
    if hosts.writer:
        hosts.barrier("model loaded")
    return model, record, placement


def cell_counts(run: runs.RunFolder, hosts: Hosts) -> dict[str, int] | None:
    """`run.counts()` of the whole invocation, every process's summed, on process 0 (None on the others)."""
    every = hosts.gather("cell counts", run.counts())
    return None if every is None else {k: sum(c[k] for c in every) for k in every[0]}


def load_run_tasks(parser: argparse.ArgumentParser, spec: Mapping[str, Any], run: runs.RunFolder,
                   hosts: Hosts) -> tuple[list[tasklib.Task], list[tasklib.Task]]:
    """(`load_tasks`, `load_pair_tasks`) on process 0, then on the others (which read the bucket it
    wrote); a problem discards a folder nothing was done in and ends every process in one line."""
    error = loaded = None
    if hosts.writer:
        try:
            loaded = load_tasks(spec, run), load_pair_tasks(spec)
        except (ValueError, KeyError) as e:
            error = str(e)
    error = hosts.agree("tasks loaded", error)
    if error is None and not hosts.writer:
        loaded = load_tasks(spec, run), load_pair_tasks(spec)
    if error is not None:
        run.discard()
        fail(parser, error)
    return loaded


def command_line(name: str, argv: Sequence[str]) -> str:
    """The command an experiment was invoked as: `python -m experiments.<name> ARGS`, quoted for a shell."""
    import shlex

    return shlex.join(["python", "-m", f"experiments.{name}", *argv])


def announce(ctx: Context, found: Sequence, experiments: Sequence[str]) -> None:
    """The progress line that opens a model's run (stderr; none with --no-progress)."""
    if ctx.show_progress:
        print(f"{ctx.run.path}: {'resuming' if ctx.run.resumed else 'new run folder'}: "
              f"{ctx.run.config['model']['name']}, {len(found)} tasks, {', '.join(experiments)}",
              file=sys.stderr, flush=True)


def base_config(args: argparse.Namespace, model, model_record: Mapping, tasks: Mapping | None = None) -> dict:
    """The parts of a run config every experiment shares (what changes the outputs); tasks: the
    task record (`task_spec`) if already made."""
    options = sampler_options(model, args.steps)
    return {"model": dict(model_record), "tasks": dict(tasks) if tasks is not None else task_spec(args),
            "sampler": {"num_steps": options.num_steps, "guidance": options.guidance,
                        "guidance_scale": options.guidance_scale},
            "chunk": _chunk_record(chunk_size(args)), "attn_impl": args.attn_impl}


def _chunk_record(chunk):
    return chunk if chunk is None or isinstance(chunk, int) else f"auto (fallback {chunk.fallback})"


def open_run_folder(out: str, config: Mapping) -> runs.RunFolder:
    """The run folder --out for `config`: created, or resumed if it holds the same config; anything
    else there is refused (RunError)."""
    path = Path(out)
    return runs.open_run(path.parent if str(path.parent) else Path("."), path.name, config, on_conflict="refuse")


def fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit with status 2 and one line naming the problem (no usage text, no traceback)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def check_out(out: str | Path, experiment: str, hosts: Hosts | None = None) -> None:
    """Refuse, before any model loads, an --out that cannot be this experiment's run folder: a
    file, a folder that is not a run folder (and not empty), a run folder of another command, one
    another process is working in (checked by process 0: the others join its lock), or a place
    this process cannot write (ValueError, one line)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: is a file, not a run folder; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        try:
            config = json.loads((path / runs.CONFIG_FILE).read_text())
        except (OSError, ValueError):
            raise ValueError(f"--out {out}: exists and is not a run folder (no readable {runs.CONFIG_FILE}); "
                             "choose another --out") from None
        other = config.get("experiment") if isinstance(config, dict) else None
        if other != experiment:
            raise ValueError(f"--out {out}: holds a run of `{other}`, not `{experiment}`; choose another --out")
        try:
            if hosts is None or hosts.writer:
                runs.check_not_in_use(path)
        except runs.RunError as e:
            raise ValueError(f"--out {out}: {e}") from None
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable; choose another --out")


def verify_folders(folders: Sequence[Path]) -> int:
    """--verify: check each run folder, print what is damaged or unfinished -> exit status (1: damage)."""
    status = 0
    for folder in folders:
        check = runs.check_run(folder)
        for line in check.lines():
            print(line)
        status = status or (0 if check.ok else 1)
    return status


def run_command(module, argv: Sequence[str] | None = None) -> int:
    """main() of an experiment module: parse, load the model, open the run folder, run, report.

    module provides NAME, TITLE, __doc__, add_arguments(parser), settings(args, config) -> dict
    (the run config's settings), validate(settings, config) (raises ValueError for bad ones) and
    run(ctx, tasks, settings, prefix) -> list of report sections.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{module.NAME}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    add_arguments(parser, out_default=f"runs/{module.NAME}", pair_tasks=getattr(module, "PAIR_TASKS", False))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.verify:
        return verify_folders([Path(args.out)])
    hosts = Hosts() if args.check else start_hosts(parser, args)  # --check starts nothing
    try:
        check_out(args.out, module.NAME, hosts)
    except ValueError as e:
        fail(parser, str(e))
    [checked] = check_inputs(parser, args, [args.model], functools.partial(command_settings, module))
    if args.check:
        print(checked_line(checked))
        return 0
    spec = checked.tasks
    model, model_record, placement = load_model(parser, args, hosts)
    try:
        config = {**base_config(args, model, model_record, spec), "experiment": module.NAME,
                  "settings": checked.settings}
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    start = time.perf_counter()
    with open_run(parser, args.out, config, hosts) as run:
        done = hosts.agree("nothing to do", run.nothing_to_do() if run.resumed and hosts.writer else None)
        if done is not None:
            if hosts.writer:
                print(f"{run.path}: nothing to do: finished by this code, {done} cells intact; report: "
                      f"{run.path / 'report.html'}")
            return 0
        ctx = open_context(args, model, run, hosts, placement)
        found, pair_found = load_run_tasks(parser, spec, run, hosts)
        if hosts.writer:
            announce(ctx, [*found, *pair_found], [module.NAME])
        more = f" and {len(pair_found)} that only resolve pairs" if pair_found else ""
        sections = [report.Section("Setup", [report.Text(ctx.describe() + f"\n\n{len(found)} tasks{more}.")])]
        sections += module.run(ctx, [*found, *pair_found], config["settings"], module.NAME)
        path = run.path / "report.html"
        counts = cell_counts(run, hosts)
        if hosts.writer:  # the run's own files: process 0's, once every process's cells are done
            path = report.write_run_report(run, f"{module.TITLE}: {models.name(args.model)}", sections,
                                           command=command_line(module.NAME, argv))
            run.write_summary({"experiment": module.NAME, "tasks": len(found),
                               "seconds": time.perf_counter() - start, "resumed": run.resumed, "cells": counts})
            run.mark_finished()
            print(run.counts_line(counts))
    hosts.barrier("report written")  # every process ends once process 0 has written the run's files
    if hosts.writer:
        print(f"report: {path}")
    return 0


def open_run(parser: argparse.ArgumentParser, out: str, config: Mapping, hosts: Hosts | None = None
             ) -> runs.RunFolder:
    """`open_run_folder`, a refusal (another config, in use, not writable) ending the command in one line.

    Several processes: process 0 opens the folder (creates or resumes it, takes its lock); then
    the others join it (`runs.join_run`), or end with process 0's refusal."""
    hosts = hosts or Hosts()
    run, error = None, None
    if hosts.writer:
        try:
            run = open_run_folder(out, config)
        except (runs.RunError, OSError) as e:
            error = f"--out {out}: {e}"
    opened = hosts.agree("run folder opened", {"error": error, "path": None if run is None else str(run.path)})
    if opened["error"] is not None:
        fail(parser, opened["error"])
    if not hosts.writer:
        try:
            run = runs.join_run(opened["path"], config, write_cells=not hosts.lockstep)
        except runs.RunError as e:
            fail(parser, f"--out {out}: {e}")
    return run
