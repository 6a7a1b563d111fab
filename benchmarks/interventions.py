"""What interventions cost: knockout, substitution, reference removal and vmapped sweeps vs plain.

    python -m benchmarks.interventions [--out benchmarks/results/interventions.json] [--reps 3]

Every program is compiled first (compile time reported on its own) and run once. Then each
comparison runs its two sides in alternating pairs (a b, b a, a b, ...; `--reps` pairs,
`--sweep-reps` for the sweeps, `--attention-reps` for one block's attention, where each timed run is
`--attention-calls` calls: one call takes a tenth of a second, short enough for a scheduler's hiccup
to move a single pair by +-30 %), and its ratio is the median over pairs of a / b: the two runs of
a pair are adjacent in time, so on a shared machine they see about the same load. Both the
wall-time and the process-CPU-time ratios are reported; the goals are judged on CPU time, the
work the program itself did, because on a machine shared with other jobs the wall time of one
side swings by +-20 % from pair to pair while its CPU time stays within a few per cent. Random
weights, fp32, batch 1, one process. Prints a Markdown table and writes JSON.

Comparisons and goals:
  knockout (ref->text at every block) / plain forward          <= 1.25x
  substitution (padding positions at one block) / plain         <= 1.05x
  references removed after block k / the mask form of it       speed-up within 20 % of the
                                                                FLOP ratio (computed from token counts)
  a sweep of substitution over N blocks in one call (vmap; lax.map) / N separate calls
  one block's attention with that knockout: key groups (per-segment blocked kernel, LSE merge) /
  the dense [B, L, L] mask with the blocked kernel (the path before key groups)  <= 1.00x

The machine must be quiet: the 1-minute load average is checked before the run (waiting up to
`--wait-quiet` seconds) and other processes' CPU time during every timed call; on a busy machine
nothing is written (`--allow-busy` writes the figures flagged as not a result). See
`benchmarks.common.LoadGuard`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common
from fluxjax import numerics
from fluxjax.interventions import stack
from fluxjax.layout import key_segments


def block_flops(config: fluxjax.Flux2Config, n_txt: int, n_stream: int) -> float:
    """Multiply-adds x 2 of one block over L = n_txt + n_stream tokens (double and single blocks
    cost the same: per token 26 D^2 in Linears with M = 3D, plus 4 L^2 D in attention)."""
    D, M, L = config.hidden_size, config.mlp_hidden, n_txt + n_stream
    per_token = 2 * (4 * D * D + 3 * D * M)  # qkv + proj, SwiGLU in (2M) and out (M)
    return L * per_token + 4 * L * L * D


def forward_flops(config: fluxjax.Flux2Config, layout: fluxjax.TokenLayout, drop_from: int | None) -> float:
    """Token-proportional FLOPs of a forward: input projections, blocks, final Linear. With
    `drop_from`, blocks from that one on (and the final layer) run without the reference tokens."""
    D = config.hidden_size
    total = 2 * layout.n_image_stream * config.in_channels * D + 2 * layout.n_txt * config.context_in_dim * D
    for b in range(config.num_blocks):
        n = layout.n_image_stream - (layout.n_ref if drop_from is not None and b >= drop_from else 0)
        total += block_flops(config, layout.n_txt, n)
    n_out = layout.n_img if drop_from is not None else layout.n_image_stream
    return total + 2 * n_out * D * config.output_channels


def random_params(config, seed=0):
    return fluxjax.init_params(config, jax.random.key(seed))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4, help="head dim = hidden / heads (128 as in FLUX.2 by default)")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--image", type=int, nargs=2, default=(32, 32), metavar=("ROWS", "COLS"))
    ap.add_argument("--ref", type=int, nargs=2, default=(32, 32), metavar=("ROWS", "COLS"))
    ap.add_argument("--drop-block", type=int, default=None, help="k of the reference removal (default: the join)")
    ap.add_argument("--reps", type=int, default=5, help="alternating pairs per comparison")
    ap.add_argument("--sweep-reps", type=int, default=1, help="alternating pairs per sweep comparison")
    ap.add_argument("--attention-reps", type=int, default=15,
                    help="alternating pairs for the one-block attention comparison")
    ap.add_argument("--attention-calls", type=int, default=10, help="attention calls per timed run")
    ap.add_argument("--out", default="benchmarks/results/interventions.json")
    ap.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for the load average to fall")
    ap.add_argument("--allow-busy", action="store_true", help="write figures from a busy machine, flagged")
    args = ap.parse_args(argv)
    guard = common.LoadGuard()
    if guard.wait_quiet(args.wait_quiet) > guard.load_limit and not args.allow_busy:
        raise common.MachineBusy(f"1-minute load average {guard.load_before:.2f} > {guard.load_limit:.2f}: not "
                                 "measuring on a busy machine (--allow-busy measures and flags the figures)")

    head_dim = args.hidden // args.heads
    config = dataclasses.replace(fluxjax.FLUX2_KLEIN_9B, hidden_size=args.hidden, num_heads=args.heads,
                                 depth=args.double, depth_single_blocks=args.single, context_in_dim=args.hidden,
                                 axes_dim=(head_dim // 4,) * 4)
    layout = fluxjax.TokenLayout(n_txt=args.text, img_grid=tuple(args.image), ref_grids=(tuple(args.ref),))
    k = config.depth if args.drop_block is None else args.drop_block
    nb = config.num_blocks

    rng = np.random.default_rng(1)
    params = random_params(config)
    img = jnp.asarray(rng.standard_normal((1, layout.n_image_stream, config.in_channels), np.float32))
    txt = jnp.asarray(rng.standard_normal((1, layout.n_txt, config.context_in_dim), np.float32))
    t = jnp.full((1,), 0.5, jnp.float32)
    img_ids, txt_ids = jnp.asarray(layout.img_ids()), jnp.asarray(layout.txt_ids())
    content = np.zeros((1, layout.n_txt), bool)
    content[0, 10:40] = True
    padding = layout.text_mask("text[padding]", content)
    value = jnp.asarray(rng.standard_normal((1, layout.n_txt, config.hidden_size), np.float32))

    def fwd(params, img, txt, t, iv):
        return fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids, interventions=iv)[0]

    def sweep(params, img, txt, t, ivs):
        return jax.vmap(lambda iv: fwd(params, img, txt, t, iv))(ivs)

    def sweep_map(params, img, txt, t, ivs):  # one call, the cells one after another
        return jax.lax.map(lambda iv: fwd(params, img, txt, t, iv), ivs)

    # one block's attention at this shape, the knockout's table applied two ways
    qkv_shape = (1, layout.total, config.num_heads, head_dim)
    knock = fluxjax.knockout(config, layout, content, "ref->text")
    segments = key_segments(layout.n_txt, layout.total, layout.num_groups, (layout.n_img, *layout.ref_counts))
    attn_args = (*(jnp.asarray(rng.standard_normal(qkv_shape), jnp.float32) for _ in range(3)), knock.allowed[0],
                 knock.groups)

    def attn_groups(params, img, txt, t, a):  # arguments in the interventions slot, so both share `run`
        q, k, v, allowed, groups = a
        return numerics.attention(q, k, v, numerics.KeyGroups(allowed, groups, segments), "blocked")

    def attn_masked(params, img, txt, t, a):
        q, k, v, allowed, groups = a
        return numerics.attention(q, k, v, numerics.KeyGroups(allowed, groups, segments).dense_mask(), "blocked")

    sub_at = [fluxjax.Interventions(substitutions=(fluxjax.substitution(fluxjax.site(b, "text", "output"), value,
                                                                        padding),)) for b in range(nb)]
    programs = {  # name: (function, interventions argument)
        "plain": (fwd, None),
        "knockout": (fwd, fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content, "ref->text"))),
        "substitution": (fwd, sub_at[min(config.depth + 1, nb - 1)]),
        "mask form": (fwd, fluxjax.Interventions(knockout=fluxjax.cut_reference(config, layout, content, k))),
        "removed": (fwd, fluxjax.Interventions(drop_reference=fluxjax.drop_reference(layout, k))),
        "sweep vmapped": (sweep, stack(sub_at)),
        "sweep lax.map": (sweep_map, stack(sub_at)),
        "attention, key groups": (attn_groups, attn_args),
        "attention, dense mask": (attn_masked, attn_args),
    }
    compiled, compile_s, first = {}, {}, {}
    for name, (fn, iv) in programs.items():
        key = (fn, jax.tree_util.tree_structure(iv))  # same structure: the same program, compiled once
        if key in first:
            compiled[name], compile_s[name] = compiled[first[key]], dict(shared_with=first[key])
            continue
        first[key] = name
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(params, img, txt, t, iv)
        t1 = time.perf_counter()
        compiled[name] = lowered.compile()
        compile_s[name] = dict(trace_s=t1 - t0, compile_s=time.perf_counter() - t1)
        print(f"compiled {name}: {compile_s[name]['compile_s']:.1f} s", flush=True)
    compile_s["sweep loop"] = dict(shared_with="substitution")

    def run(name):
        if name == "sweep loop":  # N calls of the substitution program, one per block
            return [compiled["substitution"](params, img, txt, t, iv) for iv in sub_at]
        if name.startswith("attention"):
            return [compiled[name](params, img, txt, t, programs[name][1]) for _ in range(args.attention_calls)]
        return compiled[name](params, img, txt, t, programs[name][1])

    def timed(name):
        c0 = time.process_time()
        wall, _ = guard.measure(name, lambda: jax.block_until_ready(run(name)))
        return wall, time.process_time() - c0

    times = {n: [] for n in [*programs, "sweep loop"]}  # (wall s, process CPU s) per run
    for name in programs:  # warm-up: first executions allocate
        if not name.startswith("sweep"):
            timed(name)

    def pairs(a, b, reps):
        """Alternate the two sides (a b, b a, a b, ...); per pair, the ratio a / b of wall and CPU time."""
        out = []
        for rep in range(reps):
            order = (a, b) if rep % 2 == 0 else (b, a)
            got = {n: timed(n) for n in order}
            for n in order:
                times[n].append(got[n])
            out.append((got[a][0] / got[b][0], got[a][1] / got[b][1]))
            print(f"  {a} {got[a][0]:.2f}s / {b} {got[b][0]:.2f}s = {out[-1][0]:.3f} (CPU {out[-1][1]:.3f})",
                  flush=True)
        return out

    flop_ratio = forward_flops(config, layout, None) / forward_flops(config, layout, k)
    site = min(config.depth + 1, nb - 1)
    comparisons = [  # (what, a, b, reps, goal text, goal test on the median CPU-time ratio)
        ("knockout ref->text, all blocks / plain", "knockout", "plain", args.reps, "<= 1.25x",
         lambda r: r <= 1.25),
        (f"substitution at block {site} / plain", "substitution", "plain", args.reps, "<= 1.05x",
         lambda r: r <= 1.05),
        (f"removal after block {k}: speed-up over the mask form (FLOP ratio {flop_ratio:.3f})", "mask form",
         "removed", args.reps, f"{0.8 * flop_ratio:.3f}..{1.2 * flop_ratio:.3f} (FLOP ratio +-20 %)",
         lambda r: 0.8 * flop_ratio <= r <= 1.2 * flop_ratio),
        (f"sweep over {nb} blocks: one vmapped call / {nb} calls", "sweep vmapped", "sweep loop", args.sweep_reps,
         "(reported)", None),
        (f"sweep over {nb} blocks: one lax.map call / {nb} calls", "sweep lax.map", "sweep loop", args.sweep_reps,
         "(reported)", None),
        ("one block's attention with a knockout: key groups / dense mask (blocked)", "attention, key groups",
         "attention, dense mask", args.attention_reps, "<= 1.00x", lambda r: r <= 1.00),
    ]
    rows = []
    for what, a, b, reps, goal, ok in comparisons:
        print(what, flush=True)
        r = pairs(a, b, reps)
        wall, cpu = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        rows.append(dict(comparison=what, ratio_wall=wall, ratio_cpu=cpu, pairs=r, goal=goal,
                         met=None if ok is None else ok(cpu)))
    machine = guard.enforce(args.allow_busy)
    names = list(times)
    best = {n: min(w for w, _ in v) for n, v in times.items()}
    med = {n: statistics.median(w for w, _ in v) for n, v in times.items()}

    print()
    if not machine["quiet"]:
        print(common.busy_banner(machine))
    print(f"config: D={config.hidden_size}, heads={config.num_heads}, {config.depth} double + "
          f"{config.depth_single_blocks} single blocks; tokens: {layout.n_txt} text + {layout.n_img} image + "
          f"{layout.n_ref} reference; fp32, batch 1; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    print()
    print("| program | compile (s) | steady state, best (s) | median (s) | runs |")
    print("|---|---|---|---|---|")
    for n in names:
        c = compile_s[n]
        c = f"{c['compile_s']:.1f}" if "compile_s" in c else f"(the {c['shared_with']} program)"
        label = f"{n} ({args.attention_calls} calls)" if n.startswith("attention") else n
        print(f"| {label} | {c} | {best[n]:.3f} | {med[n]:.3f} | {len(times[n])} |")
    print()
    print("Ratios: median over alternating pairs of the two sides' wall time (and process CPU time).")
    print()
    print("| comparison | ratio, wall | ratio, CPU | goal | met (CPU) |")
    print("|---|---|---|---|---|")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['comparison']} | {r['ratio_wall']:.3f} | {r['ratio_cpu']:.3f} | {r['goal']} | {met} |")

    result = dict(
        config=dataclasses.asdict(config),
        layout=dict(n_txt=layout.n_txt, img_grid=layout.img_grid, ref_grids=layout.ref_grids),
        dtype="float32", batch=1, drop_block=k, reps=args.reps, sweep_reps=args.sweep_reps,
        attention_reps=args.attention_reps, attention_calls=args.attention_calls,
        device=str(jax.devices()[0]), cpu_count=os.cpu_count(), platform=platform.platform(),
        versions=dict(jax=jax.__version__, numpy=np.__version__, python=platform.python_version()),
        compile=compile_s, runs_wall_cpu_s=times, steady_best_s=best, steady_median_s=med,
        flops=dict(mask_form=forward_flops(config, layout, None), removed=forward_flops(config, layout, k),
                   ratio=flop_ratio),
        ratios=rows, machine=machine,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
