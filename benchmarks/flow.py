"""The cost of measuring attention flow (`fluxjax.flow`): temporary memory and CPU time of a forward
that captures the flow at every block, against the plain forward.

    python -m benchmarks.flow --memory                 # XLA's memory analysis only (no timing, any load)
    python -m benchmarks.flow --speed                  # CPU time too: needs a quiet machine

Memory: both programs are compiled for this backend from shapes alone (`jax.ShapeDtypeStruct`: no
weights are allocated), and XLA's buffer assignment gives their temporary bytes; the flow's own
outputs ([blocks, B, H, G, G] tables, [B, L, H, G] per-token maps) are outputs, not temporaries,
and listed apart. Not load-sensitive, so it is recorded on any machine.

Speed: the plain forward and the forward with the flow at every block (and, apart, with the value-
weighted variant too), compiled first (compile time reported apart) and timed in alternation
within one process (`benchmarks.common.alternate`); medians. Figures are written only from a quiet
machine (`benchmarks.common.LoadGuard`; --allow-busy writes them flagged as not a result).

The model is small (few blocks, narrow) with FLUX.2's head dim and real token counts: by default
512 text, 4,096 image and 4,096 reference tokens (8,704), where attention dominates.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common
from fluxjax import numerics

FLOW_LIMIT = {"temp_ratio": 1.10, "time_ratio": 1.15}  # what the flow may cost against the plain forward


def setup(args):
    head_dim = args.hidden // args.heads
    config = dataclasses.replace(fluxjax.FLUX2_KLEIN_9B, hidden_size=args.hidden, num_heads=args.heads,
                                 depth=args.double, depth_single_blocks=args.single, context_in_dim=args.hidden,
                                 axes_dim=(head_dim // 4,) * 4)
    layout = fluxjax.TokenLayout(n_txt=args.text, img_grid=tuple(args.image), ref_grids=(tuple(args.ref),))
    content = np.zeros((1, layout.n_txt), bool)
    content[0, 10:40] = True
    return config, layout, content


def programs(config, layout, tokens: tuple[int, ...]):
    """name -> Capture: plain, the flow at every block, and the value-weighted flow with per-token maps."""
    every = tuple(range(config.num_blocks))
    return {"plain": None,
            "flow": fluxjax.Capture(flow=fluxjax.Flow(blocks=every)),
            "flow + carried + maps": fluxjax.Capture(flow=fluxjax.Flow(blocks=every, tokens=tokens, carried=True))}


def forward_fn(config, layout, capture):
    def fwd(params, img, txt, t, groups):
        out, caps = fluxjax.forward(params, config, img, txt, t, jnp.asarray(layout.img_ids()),
                                    jnp.asarray(layout.txt_ids()), capture=capture, num_ref_tokens=layout.n_ref,
                                    groups=None if capture is None else groups)
        return out, caps.flow
    return jax.jit(fwd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="XLA's memory analysis of the programs")
    ap.add_argument("--speed", action="store_true", help="time the programs (a quiet machine)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2, help="head dim = hidden / heads (128 as in FLUX.2 by default)")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--image", type=int, nargs=2, default=(64, 64), metavar=("ROWS", "COLS"))
    ap.add_argument("--ref", type=int, nargs=2, default=(64, 64), metavar=("ROWS", "COLS"))
    ap.add_argument("--tokens", type=int, nargs="*", default=[0], help="blocks of the per-token maps")
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds of the timing")
    ap.add_argument("--out", default=None,
                    help="report stem (default benchmarks/results/flow-memory, -speed, or flow for both)")
    ap.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for the load average to fall")
    ap.add_argument("--allow-busy", action="store_true", help="write timings from a busy machine, flagged")
    args = ap.parse_args(argv)
    if not (args.memory or args.speed):
        ap.error("give --memory, --speed or both")

    if args.out is None:
        args.out = "benchmarks/results/flow" + ("" if args.memory and args.speed else
                                                 "-memory" if args.memory else "-speed")
    config, layout, content = setup(args)
    caps = programs(config, layout, tuple(args.tokens))
    sds = jax.ShapeDtypeStruct
    shapes = (fluxjax.param_shapes(config, jnp.float32),
              sds((1, layout.n_image_stream, config.in_channels), jnp.float32),
              sds((1, layout.n_txt, config.context_in_dim), jnp.float32), sds((1,), jnp.float32),
              fluxjax.token_groups(layout, content))
    record = {"config": {"hidden": args.hidden, "heads": args.heads, "double": args.double, "single": args.single,
                         "tokens": {"text": layout.n_txt, "image": layout.n_img, "reference": layout.n_ref,
                                    "total": layout.total}, "per_token_blocks": args.tokens},
              "command": "python -m benchmarks.flow " + " ".join(argv if argv is not None else sys.argv[1:]),
              "limits": FLOW_LIMIT, "environment": common.environment()}
    lines = [f"# Attention flow: cost against the plain forward\n",
             f"`{record['command']}`\n",
             f"Model: {args.double} double + {args.single} single blocks, width {args.hidden}, {args.heads} heads "
             f"(head dim {args.hidden // args.heads}), float32; {layout.n_txt} text + {layout.n_img} image + "
             f"{layout.n_ref} reference tokens = {layout.total}. Backend: {jax.default_backend()}, attention kernel: "
             f"{numerics.default_implementation(jnp.float32)}.\n"]

    compiled = {}
    for name, capture in caps.items():
        t0 = time.perf_counter()
        compiled[name] = forward_fn(config, layout, capture).lower(*shapes).compile()
        record.setdefault("compile_s", {})[name] = time.perf_counter() - t0
    if args.memory:
        memory = {name: common.xla_memory(c) for name, c in compiled.items()}
        base = memory["plain"]["temp"]
        record["memory"] = {name: {**m, "temp_ratio": m["temp"] / base} for name, m in memory.items()}
        rows = [[name, f"{m['temp'] / 2**20:.1f}", f"{m['temp'] / base:.3f}", f"{m['output'] / 2**20:.2f}"]
                for name, m in memory.items()]
        lines += ["## Memory (XLA's memory analysis of the compiled programs)\n",
                  common.markdown_table(["program", "temp MiB", "temp / plain", "output MiB"], rows),
                  f"\nLimit: temp / plain <= {FLOW_LIMIT['temp_ratio']} for the flow at every block.\n"]
    if args.speed:
        guard = common.LoadGuard()
        if guard.wait_quiet(args.wait_quiet) > guard.load_limit and not args.allow_busy:
            raise common.MachineBusy(f"1-minute load average {guard.load_before:.2f} > {guard.load_limit:.2f}: not "
                                     "timing on a busy machine (--allow-busy times and flags the figures)")
        rng = np.random.default_rng(1)
        params = fluxjax.init_params(config, jax.random.key(0))
        values = (params, jnp.asarray(rng.standard_normal(shapes[1].shape), jnp.float32),
                  jnp.asarray(rng.standard_normal(shapes[2].shape), jnp.float32), jnp.full((1,), 0.5, jnp.float32),
                  shapes[4])
        fns = {name: (lambda c=c: jax.block_until_ready(c(*values))) for name, c in compiled.items()}
        for fn in fns.values():
            fn()  # first run apart
        times = common.alternate(fns, args.reps, guard)
        verdict = guard.enforce(args.allow_busy)
        timing = {name: common.stats(t) for name, t in times.items()}
        base = timing["plain"]["median_s"]
        record["speed"] = {name: {**s, "time_ratio": s["median_s"] / base} for name, s in timing.items()}
        record["machine"] = verdict
        rows = [[name, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['median_s'] / base:.3f}",
                 f"{record['compile_s'][name]:.1f}"] for name, s in timing.items()]
        lines += ["## Speed (median of alternating rounds)\n", common.busy_banner(verdict),
                  common.markdown_table(["program", "median s", "min s", "median / plain", "compile s"], rows),
                  f"\nLimit: median / plain <= {FLOW_LIMIT['time_ratio']} for the flow at every block.\n"]
    json_path, md_path = common.write_report(args.out, record, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
