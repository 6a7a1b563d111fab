"""The rehearsal of `benchmarks.gpu_check`: the study's cells through `experiments.run_all` on a
klein-9B-sized model folder, per experiment wall time, compile time and device memory, against the
study's way (one diffusers `Flux2KleinPipeline` call per cell, the knockout mask in attention
processors) on the same device.
"""

from __future__ import annotations

import time

import jax

from benchmarks import common

STEPS = 4  # the sampling steps of every GPU figure ([klein] distilled)

class _Instrumented:
    """Wraps each experiment's `run` to record its wall time, XLA compile time (jax.monitoring's
    backend-compile events) and the device's peak memory after it."""

    def __init__(self):
        self.rows, self._compile = {}, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self._compile += duration

    def wrap(self, module):
        run = module.run

        def timed_run(ctx, found, settings, name, *a, **kw):
            c0, t0 = self._compile, time.perf_counter()
            with common.PeakRSS() as rss:
                out = run(ctx, found, settings, name, *a, **kw)
            stats = jax.devices()[0].memory_stats() or {}
            self.rows[name] = {"wall_s": time.perf_counter() - t0, "compile_s": self._compile - c0,
                               "device_peak_bytes_so_far": stats.get("peak_bytes_in_use"),
                               "host_rss_increase_bytes": rss.bytes}
            return out

        module.run = timed_run
        return run


def count_cells(run_path, name) -> int:
    """Images the experiment wrote (one per cell) under outputs/<name>/ of the run folder."""
    from pathlib import Path

    return sum(1 for _ in (Path(run_path) / "outputs" / name).rglob("*.png"))


def diffusers_cell_cost(folder, size: int, device, tdtype, say) -> dict:
    """One study-style cell: a `Flux2KleinPipeline` call (4 steps, the reference image, a ref->text
    knockout through attention processors that add the mask in every block). Timed warm."""
    import torch
    from diffusers import Flux2KleinPipeline
    from diffusers.models.transformers import transformer_flux2 as tf
    from PIL import Image

    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=tdtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    masks, state = {}, {}

    def mask_for(n_txt, n_stream):  # [text | image | reference], reference as large as the image
        key = (n_txt, n_stream)
        if key not in masks:
            L, n_img = n_txt + n_stream, n_stream // 2
            m = torch.ones((1, 1, L, L), dtype=torch.bool, device=device)
            m[:, :, :n_txt, n_txt + n_img:] = False
            masks[key] = m
        return masks[key]

    class Double(tf.Flux2AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            state["n_txt"] = encoder_hidden_states.shape[1]
            mask = mask_for(state["n_txt"], hidden_states.shape[1])
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)

    class Single(tf.Flux2ParallelSelfAttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            mask = mask_for(state["n_txt"], hidden_states.shape[1] - state["n_txt"])
            return super().__call__(attn, hidden_states, mask, image_rotary_emb)

    for b in pipe.transformer.transformer_blocks:
        b.attn.set_processor(Double())
    for b in pipe.transformer.single_transformer_blocks:
        b.attn.set_processor(Single())
    reference = Image.new("RGB", (size, size), (200, 30, 30))

    def call():
        out = pipe(image=reference, prompt="draw a ball in this color", height=size, width=size,
                   num_inference_steps=STEPS, generator=torch.Generator(device=device).manual_seed(0),
                   output_type="np").images
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    first, _ = common.timed(call)
    warm, _ = common.timed(call)
    say(f"diffusers, one cell (Flux2KleinPipeline, {STEPS} steps, {size}px, knockout mask): first {first:.2f} s, "
        f"warm {warm:.2f} s")
    del pipe
    return {"first_call_s": first, "per_cell_s": warm}


def rehearsal(folder, out_dir, size: int, device, tdtype, dtype_name: str, blocks: str, say) -> dict:
    """`experiments.run_all --blocks <blocks>` for one colour task, per experiment wall / compile /
    memory, and the same number of cells at the study's one-diffusers-call-per-cell cost."""
    from experiments import drop, knockout, lens, patching, run_all

    inst = _Instrumented()
    originals = {m: inst.wrap(m) for m in (lens, knockout, drop, patching)}
    t0 = time.perf_counter()
    try:
        run_all.main(["--model", str(folder), "--out", str(out_dir), "--blocks", blocks, "--colours", "red,green",
                      "--objects", "ball", "--seeds", "0", "--size", str(size), "--dtype", dtype_name,
                      "--no-progress"])
    finally:
        for m, run in originals.items():
            m.run = run
    total = time.perf_counter() - t0
    for name, row in inst.rows.items():
        row["cells"] = count_cells(out_dir, name)
    cells = sum(r["cells"] for r in inst.rows.values())
    say("rehearsal: " + "; ".join(f"{n} {r['wall_s']:.1f} s (compile {r['compile_s']:.1f} s, {r['cells']} cells)"
                                  for n, r in inst.rows.items()) + f"; total {total:.1f} s")
    cost = diffusers_cell_cost(str(folder), size, device, tdtype, say)
    study_way = cells * cost["per_cell_s"]
    return {"experiments": inst.rows, "total_s": total, "cells": cells, "diffusers": cost,
            "study_way_s": study_way, "ratio_to_study_way": total / study_way if study_way else None,
            "ratio_goal": "<= 0.5x"}
