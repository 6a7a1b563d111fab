"""GPU command B: the knockout experiment's cells at klein-9B size, fluxjax's sweeps against the
study's way (one diffusers pipeline call per cell), with random weights held in memory.

    python -m benchmarks.gpu_rehearsal --out DIR          # on one H100 / H200: klein-9B sizes, bfloat16
    python -m benchmarks.gpu_rehearsal --tiny --out DIR   # anywhere (CPU): the same steps on a tiny model

The task: the colour bucket's red ball (a flat red 1024 x 1024 reference, "draw a ball in this
color"), seed 0, 4 steps. The cells: `experiments.knockout`'s four main edges (ref->text,
ref->image, ref->text[padding], ref->text[content]) cut in every block, and cut from block k on for
k = 7 and 17 (the study's blocks; `run_all --blocks 7,17` sweeps these k): 12 cells.

Two phases, each its own process, so that torch's and JAX's memory never share the device (JAX's
allocator does not give memory back to the device while its process lives):

  fluxjax    a random Qwen3-8B-shaped text encoder (torch) encodes the prompt and is deleted, torch's
             cache emptied; then a random klein-9B transformer and FLUX.2 VAE (JAX) and
             `experiments.knockout.run` on the task through `experiments.context.Context`: the task's
             baselines (edit, text-to-image, next-seed text-to-image: one sampler call each) and the
             cells as vmapped sweeps of --chunk cells per call (fixed: one compiled program)
  diffusers  a `Flux2KleinPipeline` of random parts (the same sizes), the knockout mask installed in
             every block's attention processor, one pipeline call per cell (prompt encoding,
             reference encoding, 4 steps, decoding), as the study's code runs it

Every step is a row of DIR/gpu_rehearsal.jsonl written when it ends (`benchmarks.common.RowLog`):
per sampler call and per sweep call of fluxjax (seconds, XLA compile seconds within it, device
memory), per pipeline call of diffusers, each phase's totals, and `done` with the comparison:
fluxjax's cells (the sweep calls, compile included) against the study's way for the same cells
(diffusers' median seconds per call times the cells). The experiment's files go to --work
(default DIR/run: PNG files of 1024 x 1024, a few MB each); no model is written anywhere.
--budget-s (default 270 s) bounds the command: a phase stops taking cells when its time is up and
says so (cells it did not run get black images in the run folder), and the comparison uses what ran.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX takes device memory as it needs it

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import common, gpu_models  # noqa: E402

STEPS = 4  # the sampling steps of every GPU figure ([klein] distilled)
BUDGET_S = 270.0
STUDY_BLOCKS = (7, 17)  # run_all --blocks 7,17: the k of the knockout sweep besides 0 and n
TASK = ("red", "ball", 0)  # colour, object, seed of the colour bucket's task
# Seconds each phase needs at klein-9B on one H100 before its cells, estimated from the measured
# figures (benchmarks/results/gpu_check.log: weights 17 s, the sampler's compile 10 s, 1.1 s per
# edit; diffusers 1.4 s per edit); a phase stops taking cells when less than one call is left.
NEEDS_S = {"fluxjax": 120, "diffusers": 60}


def knockout_settings(num_blocks: int) -> dict:
    """`experiments.knockout` settings of the cells: the main edges in every block and from k on."""
    from experiments import knockout

    return {"settings": list(knockout.MAIN_SETTINGS), "layers": ["all"], "sweep": list(knockout.MAIN_SETTINGS),
            "sweep_from": list(STUDY_BLOCKS) if num_blocks > max(STUDY_BLOCKS) else [1, num_blocks - 1],
            "sweep_mode": "suffix", "window": 3}


def cell_specs(settings: dict, num_blocks: int) -> list[tuple[str, list[int]]]:
    """(edges, blocks cut) of every cell, in the order `experiments.knockout` runs them."""
    from experiments import cli, knockout

    cells = [(s, list(cli.parse_blocks(layers, num_blocks))) for s in settings["settings"]
             for layers in settings["layers"]]
    for s in settings["sweep"]:
        for k in settings["sweep_from"]:
            cells.append((s, list(knockout.sweep_cell(settings, s, k, num_blocks)[0])))
    return cells


def cell_label(edges: str, blocks: list[int]) -> str:
    return f"{edges} @ {blocks[0]}:{blocks[-1] + 1}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else \
        f"{edges} @ {blocks}"


def task(folder: Path, size: int):
    from experiments import tasks as tasklib

    colour, obj, seed = TASK
    path = tasklib.write_colour_bucket(folder, [colour], [obj], [seed], size=size)
    return tasklib.read_tasks(path)


# --- the fluxjax phase ---------------------------------------------------------------------------


class _Compiles:
    """Seconds XLA spent compiling (jax.monitoring's backend-compile events), summed."""

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += duration


def fluxjax_phase(args, log: common.RowLog, budget: common.Budget) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from experiments import knockout, runs, sweep
    from experiments.context import Context

    shapes = gpu_models.TINY if args.tiny else gpu_models.KLEIN_9B
    dtype = "float32" if args.tiny else "bfloat16"
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    work = Path(args.work or Path(args.out) / "run")
    found = task(work / "tasks", shapes.size)
    compiles = _Compiles()

    t0 = time.perf_counter()
    encoder = gpu_models.qwen3_encoder(shapes, device, getattr(torch, dtype))
    built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = gpu_models.EncodedPrompts({t.instruction: encoder.encode(t.instruction) for t in found})
    log.row("text encoder", seconds_to_build=built_s, seconds_to_encode=time.perf_counter() - t0,
            prompts=len(text.encodings), **common.device_memory())
    del encoder
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    log.row("released", what="the text encoder", **common.device_memory())

    t0 = time.perf_counter()
    model = gpu_models.fluxjax_model(shapes, jnp.dtype(dtype), text)
    log.row("weights", seconds=time.perf_counter() - t0, transformer_bytes=gpu_models.param_bytes(model.params),
            vae_bytes=gpu_models.param_bytes(model.vae_params), **common.device_memory())

    class TimedContext(Context):
        """The experiment's context with a row per sampler call and per sweep call of `chunk` cells
        (the last call padded to `chunk`, so every call runs the one compiled program)."""

        def sample(self, edit, interventions=None, capture=None, options=None):
            c0, t0 = compiles.seconds, time.perf_counter()
            out = super().sample(edit, interventions, capture, options)
            log.row("sample", seconds=time.perf_counter() - t0, compile_s=compiles.seconds - c0,
                    references=0 if edit.refs is None else 1, **common.device_memory())
            return out

        def sweep(self, edit, cells, options=None):
            images, last_s = [], 0.0
            for start in range(0, len(cells), self.chunk):
                part = list(cells[start:start + self.chunk])
                if not budget.allows(last_s):  # the next call takes about as long as the last
                    log.row("sweep call", skipped=f"{budget.left():.0f} s left of --budget-s",
                            cells_left=len(cells) - start)
                    break
                c0, t0 = compiles.seconds, time.perf_counter()
                padded = part + [part[-1]] * (self.chunk - len(part))
                out = sweep.sweep(self.model, edit, options or self.options, padded, chunk=self.chunk,
                                  runtime=self.runtime)[:len(part)]
                last_s = time.perf_counter() - t0
                log.row("sweep call", seconds=last_s, compile_s=compiles.seconds - c0, cells=len(part),
                        chunk=self.chunk, **common.device_memory())
                images.append(out)
            done = np.concatenate(images) if images else np.zeros((0, edit.height, edit.width, 3), np.uint8)
            # cells that did not run (budget) are black images, marked by the rows above
            missing = np.zeros((len(cells) - len(done), edit.height, edit.width, 3), np.uint8)
            return np.concatenate([done, missing])

    settings = knockout_settings(shapes.transformer.num_blocks)
    config = {"experiment": knockout.NAME, "settings": settings, "model": {"name": model.name, "dtype": dtype},
              "chunk": args.chunk}
    run = runs.open_run(work, "knockout", config)
    ctx = TimedContext(model=model, run=run, options=model.options, chunk=args.chunk, runtime=None,
                       show_progress=False)
    c0, t0 = compiles.seconds, time.perf_counter()
    try:
        knockout.run(ctx, found, settings)
    finally:
        run.close()
    calls = [r for r in log.rows if r["step"] == "sweep call" and "seconds" in r]
    planned = len(cell_specs(settings, shapes.transformer.num_blocks))
    log.row("fluxjax", seconds=time.perf_counter() - t0, compile_s=compiles.seconds - c0,
            cells=sum(r["cells"] for r in calls), cells_planned=planned, sweep_calls=len(calls),
            sweep_seconds=sum(r["seconds"] for r in calls), **common.device_memory())


# --- the diffusers phase -------------------------------------------------------------------------


def diffusers_phase(args, log: common.RowLog, budget: common.Budget) -> None:
    import torch
    from diffusers.models.transformers import transformer_flux2 as tf
    from PIL import Image

    import fluxjax

    shapes = gpu_models.TINY if args.tiny else gpu_models.KLEIN_9B
    dtype = getattr(torch, "float32" if args.tiny else "bfloat16")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    found = task(Path(args.work or Path(args.out) / "run") / "tasks", shapes.size)
    t0 = time.perf_counter()
    pipe, text = gpu_models.diffusers_pipeline(shapes, device, dtype)
    log.row("pipeline", seconds=time.perf_counter() - t0,
            bytes=sum(p.numel() * p.element_size() for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
                      for p in m.parameters()), **common.device_memory())

    t = found[0]
    ids, attention_mask = text.tokenize(t.instruction)
    content = text.content_mask(t.instruction, ids, attention_mask)[None]
    layout = shapes.layout
    state = {"masks": None}  # per block: the knockout mask [1, 1, L, L] of the current cell, or None

    class Double(tf.Flux2AttnProcessor):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            mask = state["masks"][self.index]
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)

    class Single(tf.Flux2ParallelSelfAttnProcessor):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            return super().__call__(attn, hidden_states, state["masks"][self.index], image_rotary_emb)

    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    for i, b in enumerate(blocks):
        b.attn.set_processor(Double(i) if i < len(pipe.transformer.transformer_blocks) else Single(i))
    reference = Image.open(t.reference).convert("RGB")

    def masks_of(edges, cut_blocks):
        """The cell's per-block masks, from the token groups (the study's processors take [L, L] masks)."""
        table = fluxjax.knockout(shapes.transformer, layout, content, edges.split("+"), cut_blocks)
        groups = np.asarray(table.groups)[0]
        out = []
        for allowed in np.asarray(table.allowed):
            out.append(None if allowed.all() else
                       torch.as_tensor(allowed[groups][:, groups][None, None], device=device))
        return out

    def call():
        images = pipe(image=reference, prompt=t.instruction, height=shapes.size, width=shapes.size,
                      num_inference_steps=STEPS, generator=torch.Generator(device=device).manual_seed(t.seed),
                      max_sequence_length=shapes.n_txt, output_type="np").images
        if device == "cuda":
            torch.cuda.synchronize()
        return images

    settings = knockout_settings(shapes.transformer.num_blocks)
    cells = cell_specs(settings, shapes.transformer.num_blocks)
    state["masks"] = [None] * len(blocks)
    seconds, _ = common.timed(call)
    log.row("pipeline call", cell="warm-up (no knockout)", seconds=seconds, **common.device_memory())
    times = []
    for i, (edges, cut) in enumerate(cells[:args.diffusers_cells or len(cells)]):
        if times and not budget.allows(max(times)):
            log.row("pipeline call", skipped=f"{budget.left():.0f} s left of --budget-s", cells_left=len(cells) - i)
            break
        state["masks"] = masks_of(edges, cut)
        seconds, _ = common.timed(call)
        times.append(seconds)
        log.row("pipeline call", cell=cell_label(edges, cut), seconds=seconds, **common.device_memory())
    log.row("diffusers", cells=len(times), cells_planned=len(cells),
            per_cell_median_s=statistics.median(times) if times else None, seconds=sum(times))


# --- the command -------------------------------------------------------------------------------


PHASES = {"fluxjax": fluxjax_phase, "diffusers": diffusers_phase}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, float32")
    ap.add_argument("--out", default="benchmarks/results/gpu-b", help="folder of gpu_rehearsal.jsonl and .md")
    ap.add_argument("--work", default=None, help="folder of the experiment's run folder and task (default OUT/run)")
    ap.add_argument("--chunk", type=int, default=4, help="cells per vmapped sweep call (fixed: one program)")
    ap.add_argument("--diffusers-cells", type=int, default=0, help="pipeline calls of the study's way (0: every cell)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds the whole command may take")
    ap.add_argument("--phase", choices=tuple(PHASES), default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    out = Path(args.out)
    path = out / "gpu_rehearsal.jsonl"
    if args.phase is not None:  # one phase in this process, its rows appended to the parent's file
        log = common.RowLog(path, f"B/{args.phase}", append=True)
        budget = common.Budget(args.budget_s, scale=0.0 if args.tiny else 1.0)
        PHASES[args.phase](args, log, budget)
        return log.rows
    log = common.RowLog(path, "B")
    shapes = gpu_models.TINY if args.tiny else gpu_models.KLEIN_9B
    settings = knockout_settings(shapes.transformer.num_blocks)
    log.row("setup", shapes=shapes.name, size=shapes.size, text_tokens=shapes.n_txt, task=list(TASK),
            chunk=args.chunk, cells=[cell_label(*c) for c in cell_specs(settings, shapes.transformer.num_blocks)],
            budget_s=args.budget_s, environment=common.environment())
    budget = common.Budget(args.budget_s, scale=0.0 if args.tiny else 1.0)
    for phase in PHASES:
        if not budget.allows(NEEDS_S[phase]):
            log.row(phase, skipped=f"{budget.left():.0f} s left of --budget-s {args.budget_s:g}, "
                                   f"{NEEDS_S[phase]} s needed")
            continue
        # the fluxjax phase leaves the diffusers phase its seconds
        leave = NEEDS_S["diffusers"] * budget.scale if phase == "fluxjax" else 0
        child = [sys.executable, "-m", "benchmarks.gpu_rehearsal", "--phase", phase, "--out", str(out),
                 "--chunk", str(args.chunk), "--diffusers-cells", str(args.diffusers_cells),
                 "--budget-s", f"{budget.left() - leave:.0f}"]
        child += (["--work", args.work] if args.work else []) + (["--tiny"] if args.tiny else [])
        t0 = time.perf_counter()
        status = subprocess.run(child, env=_child_env()).returncode
        log.reload()
        log.row("process", phase=phase, exit_status=status, seconds=time.perf_counter() - t0)
    return finish(log, out)


def _child_env() -> dict:
    """The children import this checkout's packages however the parent did."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def comparison(rows: list[dict]) -> dict:
    """fluxjax's cells (sweep calls, compiles included) against diffusers' per-call median x cells."""
    fj = next((r for r in rows if r["step"] == "fluxjax" and "cells" in r), None)
    df = next((r for r in rows if r["step"] == "diffusers" and r.get("per_cell_median_s")), None)
    if fj is None or df is None or not fj["cells"]:
        return {}
    study = df["per_cell_median_s"] * fj["cells"]
    return {"cells": fj["cells"], "fluxjax_sweep_s": fj["sweep_seconds"], "study_way_s": study,
            "ratio": fj["sweep_seconds"] / study, "fluxjax_experiment_s": fj["seconds"]}


def finish(log: common.RowLog, out: Path):
    log.row("done", seconds=log.elapsed(), **comparison(log.rows))
    (out / "gpu_rehearsal.md").write_text(summary(log.rows) + "\n")
    print()
    print(summary(log.rows))
    return log.rows


def summary(rows: list[dict]) -> str:
    """Markdown of the rows a run wrote (any prefix of them: a killed run's file too)."""
    gib = 2 ** 30
    parts = []
    setup = next((r for r in rows if r["step"] == "setup"), None)
    if setup:
        parts.append(f"{setup['shapes']} sizes ({setup['size']} px, {setup['text_tokens']} text tokens), task "
                     f"{setup['task']}, {len(setup['cells'])} knockout cells, chunk {setup['chunk']}")
    calls = [r for r in rows if r["step"] in ("sample", "sweep call", "pipeline call") and "seconds" in r]
    if calls:
        def peak(r):
            b = r.get("jax_peak_bytes_in_use", r.get("torch_peak_allocated"))
            return "-" if b is None else f"{b / gib:.1f}"

        parts.append(common.markdown_table(
            ["process", "call", "seconds", "compile (s)", "device peak so far (GiB)"],
            [[r["command"], r["step"] + (f" ({r['cells']} cells)" if "cells" in r else f": {r['cell']}" if "cell" in r
                                          else ""), f"{r['seconds']:.2f}",
              "-" if "compile_s" not in r else f"{r['compile_s']:.1f}", peak(r)] for r in calls]))
    done = next((r for r in rows if r["step"] == "done"), None)
    if done and "ratio" in done:
        parts.append(f"{done['cells']} cells: fluxjax sweeps {done['fluxjax_sweep_s']:.1f} s (compile included); the "
                     f"study's way {done['study_way_s']:.1f} s (diffusers' median call x cells); ratio "
                     f"{done['ratio']:.2f}. The whole fluxjax experiment (baselines, compiles, metrics, files): "
                     f"{done['fluxjax_experiment_s']:.1f} s")
    skipped = [f"{r['command']} {r['step']} ({r['skipped']})" for r in rows if "skipped" in r]
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    failed = [f"{r['phase']} exited {r['exit_status']}" for r in rows if r["step"] == "process" and r["exit_status"]]
    if failed:
        parts.append("failed: " + "; ".join(failed))
    parts.append(f"total {done['seconds']:.1f} s" if done else "(no `done` row: the command did not finish)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
