"""What interventions cost: knockout, substitution, reference removal and vmapped sweeps vs plain.

    python -m benchmarks.interventions [--out benchmarks/results/interventions.json] [--reps 3]

Every program is compiled first (compile time reported on its own) and run once, then all of
them run in turn, `--reps` rounds (`--sweep-reps` for the sweeps, 6 forwards each), the order
rotated each round so that no side always runs first or last. Ratios use each program's best
round: on a shared machine other processes only ever add time, so the minimum is the least
disturbed figure; medians are reported next to them. Random weights, fp32, batch 1, one
process. Prints a Markdown table and writes JSON.

Comparisons and goals:
  knockout (ref->text at every block) / plain forward          <= 1.25x
  substitution (padding positions at one block) / plain         <= 1.05x
  references removed after block k / the mask form of it       speed-up within 20 % of the
                                                                FLOP ratio (computed from token counts)
  a sweep of substitution over N blocks in one call (vmap; lax.map) / N separate calls
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
from fluxjax.interventions import stack


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
    rng = np.random.default_rng(seed)

    def draw(path, sds):
        z = rng.standard_normal(sds.shape).astype(np.float32)
        is_norm = any(getattr(k, "name", None) in ("query_norm", "key_norm") for k in path)
        return jnp.asarray(1 + 0.1 * z if is_norm else z / np.sqrt(sds.shape[-2], dtype=np.float32))

    return jax.tree_util.tree_map_with_path(draw, fluxjax.param_shapes(config))


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
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sweep-reps", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/interventions.json")
    args = ap.parse_args(argv)

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
        return fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids, interventions=iv)

    def sweep(params, img, txt, t, ivs):
        return jax.vmap(lambda iv: fwd(params, img, txt, t, iv))(ivs)

    def sweep_map(params, img, txt, t, ivs):  # one call, the cells one after another
        return jax.lax.map(lambda iv: fwd(params, img, txt, t, iv), ivs)

    sub_at = [fluxjax.Interventions(substitutions=(fluxjax.substitution(s, value, padding),)) for s in range(nb)]
    programs = {  # name: (function, interventions argument)
        "plain": (fwd, None),
        "knockout": (fwd, fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content, "ref->text"))),
        "substitution": (fwd, sub_at[min(config.depth + 1, nb - 1)]),
        "mask form": (fwd, fluxjax.Interventions(knockout=fluxjax.cut_reference(config, layout, content, k))),
        "removed": (fwd, fluxjax.Interventions(drop_reference=fluxjax.drop_reference(layout, k))),
        "sweep vmapped": (sweep, stack(sub_at)),
        "sweep lax.map": (sweep_map, stack(sub_at)),
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
        return compiled[name](params, img, txt, t, programs[name][1])

    singles = [n for n in programs if not n.startswith("sweep")]
    sweeps = ["sweep vmapped", "sweep lax.map", "sweep loop"]
    for name in singles:  # warm-up: first executions allocate
        jax.block_until_ready(run(name))
    times = {n: [] for n in singles + sweeps}
    for names, reps in ((singles, args.reps), (sweeps, args.sweep_reps)):
        for rep in range(reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                t0 = time.perf_counter()
                jax.block_until_ready(run(name))
                times[name].append(time.perf_counter() - t0)
            print(f"round {rep + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    names = singles + sweeps
    best = {n: min(v) for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in times.items()}

    def ratio(a, b):
        return best[a] / best[b], med[a] / med[b]

    flop_ratio = forward_flops(config, layout, None) / forward_flops(config, layout, k)
    site = min(config.depth + 1, nb - 1)
    rows = [
        ("knockout ref->text, all blocks / plain", *ratio("knockout", "plain"), "<= 1.25x", lambda r: r <= 1.25),
        (f"substitution at block {site} / plain", *ratio("substitution", "plain"), "<= 1.05x", lambda r: r <= 1.05),
        (f"removal after block {k}: speed-up over the mask form (FLOP ratio {flop_ratio:.3f})",
         *ratio("mask form", "removed"), f"{0.8 * flop_ratio:.3f}..{1.2 * flop_ratio:.3f} (FLOP ratio +-20 %)",
         lambda r: 0.8 * flop_ratio <= r <= 1.2 * flop_ratio),
        (f"sweep over {nb} blocks: one vmapped call / {nb} calls", *ratio("sweep vmapped", "sweep loop"),
         "(report)", None),
        (f"sweep over {nb} blocks: one lax.map call / {nb} calls", *ratio("sweep lax.map", "sweep loop"),
         "(report)", None),
    ]
    rows = [(w, r, m, g, None if ok is None else ok(r)) for w, r, m, g, ok in rows]
    print()
    print(f"config: D={config.hidden_size}, heads={config.num_heads}, {config.depth} double + "
          f"{config.depth_single_blocks} single blocks; tokens: {layout.n_txt} text + {layout.n_img} image + "
          f"{layout.n_ref} reference; fp32, batch 1; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    print()
    print("| program | compile (s) | steady state, best (s) | median (s) | rounds |")
    print("|---|---|---|---|---|")
    for n in names:
        c = compile_s[n]
        c = f"{c['compile_s']:.1f}" if "compile_s" in c else f"(the {c['shared_with']} program)"
        print(f"| {n} | {c} | {best[n]:.3f} | {med[n]:.3f} | {len(times[n])} |")
    print()
    print("| comparison | ratio (best) | ratio (median) | goal | met (best) |")
    print("|---|---|---|---|---|")
    for what, r, m, goal, ok in rows:
        print(f"| {what} | {r:.3f} | {m:.3f} | {goal} | {'-' if ok is None else ('yes' if ok else 'no')} |")

    result = dict(
        config=dataclasses.asdict(config),
        layout=dict(n_txt=layout.n_txt, img_grid=layout.img_grid, ref_grids=layout.ref_grids),
        dtype="float32", batch=1, drop_block=k, reps=args.reps,
        device=str(jax.devices()[0]), cpu_count=os.cpu_count(), platform=platform.platform(),
        versions=dict(jax=jax.__version__, numpy=np.__version__, python=platform.python_version()),
        compile=compile_s, steady_s=times, steady_best_s=best, steady_median_s=med,
        flops=dict(mask_form=forward_flops(config, layout, None), removed=forward_flops(config, layout, k),
                   ratio=flop_ratio),
        ratios=[dict(comparison=w, ratio_best=r, ratio_median=m, goal=g, met=ok) for w, r, m, g, ok in rows],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
