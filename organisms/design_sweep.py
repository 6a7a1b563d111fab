"""Compare organism designs by short trainings: how fast each learns to draw the asked shape.

    python -m organisms.design_sweep --variant tr-j2 --out sweep.jsonl [--deadline-s 300]

One variant per process (run several side by side on one accelerator). Each trains with the
training step of `organisms.train` (no checkpoints: this is a design probe, not a run to keep) and
at each evaluation step appends one JSON line to --out: the variant, step, seconds, the mean loss
of the last 100 steps and `organisms.evaluate.quality` of the EMA parameters on held-out seeds,
each measure as {n, passed, rate, low, high} (low, high: the rate's 95 % Wilson interval).

A variant sets the scene design (`organisms.data.SceneDesign`), the RoPE base and
the training length and batch; everything else is `TrainSettings`' default. The organisms' design
(centred shapes, base 10) is `tr-j0-t10`'s, chosen from two rounds of these on one H100 (the
figures are in docs/organisms.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from fluxjax.metrics import PassRate, interval_fields
from organisms.data import SceneDesign
from organisms.evaluate import quality
from organisms.model import ORGANISMS
from organisms.train import TrainSettings, init_state, make_batch, train_step

VARIANTS = {  # name: (organism, centre jitter, size range, batch, steps, evaluation steps, RoPE base)
    "tr-base": ("text-routed", None, (7.0, 11.0), 32, 3000, (1000, 2000, 3000), 2000),
    "tr-j4": ("text-routed", 4.0, (7.0, 11.0), 32, 3000, (1000, 2000, 3000), 2000),
    "tr-j2": ("text-routed", 2.0, (8.0, 11.0), 32, 3000, (1000, 2000, 3000), 2000),
    "d-j2": ("direct", 2.0, (8.0, 11.0), 32, 3000, (1000, 2000, 3000), 2000),
    "tr-base-long": ("text-routed", None, (7.0, 11.0), 32, 6000, (2000, 4000, 6000), 2000),
    "tr-j4-b16": ("text-routed", 4.0, (7.0, 11.0), 16, 6000, (2000, 4000, 6000), 2000),
    "tr-j2-b16": ("text-routed", 2.0, (8.0, 11.0), 16, 4000, (1000, 2000, 3000, 4000), 2000),
    # RoPE base 10 instead of FLUX.2's 2000: with 8 dimensions per axis and 8 x 8 positions, 2000
    # turns two of the four frequencies by under 0.16 rad across the grid
    "tr-base-t10": ("text-routed", None, (7.0, 11.0), 32, 3000, (1000, 2000, 3000), 10),
    "tr-j2-t10": ("text-routed", 2.0, (8.0, 11.0), 32, 3000, (1000, 2000, 3000), 10),
    "d-j2-t10": ("direct", 2.0, (8.0, 11.0), 32, 3000, (1000, 2000, 3000), 10),
    "tr-j0-t10": ("text-routed", 0.0, (8.0, 11.0), 32, 3000, (1000, 2000, 3000), 10),
}


def rate_fields(rates: list[PassRate]) -> dict:
    """{measure: {n, passed, rate, low, high}}: each pass rate with its 95 % Wilson interval."""
    return {r.setting: interval_fields(r.passed, r.n) for r in rates}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline-s", type=float, default=None, help="stop training and evaluate after this")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="override the variant's length (a smoke test)")
    args = parser.parse_args(argv)
    name, jitter, size_range, batch, steps, evals, theta = VARIANTS[args.variant]
    if args.steps is not None:
        steps, evals = args.steps, (args.steps,)
    design = SceneDesign(size_range=size_range, centre_jitter=jitter)

    organism = ORGANISMS[name]
    organism = dataclasses.replace(organism, transformer=dataclasses.replace(organism.transformer, theta=theta))
    s = TrainSettings(organism=organism, batch_size=batch, steps=steps,
                      warmup_steps=min(200, steps // 2))
    state = init_state(s)
    start = time.perf_counter()
    deadline = None if args.deadline_s is None else start + args.deadline_s
    losses = []

    def report(step, last):
        t0 = time.perf_counter()
        rates, _ = quality((s.organism, state.ema), n=args.n, design=design)
        row = {"variant": args.variant, "step": step, "of": steps, "seconds": round(t0 - start, 1),
               "loss_last100": float(np.mean(losses[-100:])), "eval_seconds": round(time.perf_counter() - t0, 1),
               "last": last, "device": jax.devices()[0].device_kind,
               **rate_fields(rates)}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    batch_arrays, iv = make_batch(s, 0, design)
    for step in range(steps):
        state, metrics = train_step(state, batch_arrays, iv, s=s)
        if step + 1 < steps:
            batch_arrays, iv = make_batch(s, step + 1, design)
        losses.append(float(metrics["loss"]))
        out_of_time = deadline is not None and time.perf_counter() > deadline
        if step + 1 in evals or out_of_time:
            report(step + 1, out_of_time or step + 1 == steps)
        if out_of_time:
            break


if __name__ == "__main__":
    main()
