"""Where the CPU forward's time goes: each component of a block, fluxjax (XLA:CPU) against torch.

    python -m benchmarks.components [--hidden 768 --heads 6 --text 512 --image 720 --ref 720]

A forward is dense layers, attention, elementwise work (norms, modulation, SwiGLU, RoPE) and, in
fluxjax, the `lax.scan` over stacked block weights. Each is timed here on its own at one shape,
the two sides alternated in one process (`benchmarks.common.alternate`), fp32 and batch 1:

  dense        every dot of one double block (both streams) and one single block, as the forward
               runs them (fluxjax: `numerics.linear`; torch: `F.linear`, MKL)
  attention    one block's attention over all tokens (fluxjax: the default implementation and
               the blocked kernel with one query block per head; torch: fused SDPA)
  elementwise  LayerNorm + modulation, RMSNorm of q and k, RoPE, SwiGLU at one block's sizes
  stacked      the single blocks' two dots under `lax.scan` over the stacked weights (each layer's
               weights are sliced out of the stack, a copy) / the same dots unrolled over
               per-layer arrays (no copy): the cost of scanning over a stack
  bf16 dense   the dense row in bfloat16, and whether XLA:CPU keeps the dots in bfloat16 (read from
               the optimised HLO) or converts them to float32; with --xla-flags also under each
               XLA:CPU flag that could route dots elsewhere (oneDNN, XNNPACK, YNNPACK, the old
               runtime), each in a fresh process

Writes <out>.json and <out>.md. Only from a quiet machine (`benchmarks.common.LoadGuard`).
"""

from __future__ import annotations

import argparse
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fluxjax import numerics


def dense_shapes(D: int, M: int, n_txt: int, n_stream: int) -> list[tuple[str, int, int, int]]:
    """(name, tokens, in, out) of every dot in one double block and one single block."""
    L = n_txt + n_stream
    rows = []
    for stream, n in (("txt", n_txt), ("img", n_stream)):
        rows += [(f"double {stream} qkv", n, D, 3 * D), (f"double {stream} out", n, D, D),
                 (f"double {stream} mlp in", n, D, 2 * M), (f"double {stream} mlp out", n, M, D)]
    return rows + [("single linear1", L, D, 3 * D + 2 * M), ("single linear2", L, D + M, D)]


def _jax_dots(xs, ws):
    return [numerics.linear(x, w) for x, w in zip(xs, ws)]


def _elementwise_jax(x, shift, scale, q, k, qw, kw, cos, sin, u):
    y = numerics.modulate(x, shift, scale)
    q = numerics.apply_rope(numerics.rms_norm(q, qw), cos, sin)
    k = numerics.apply_rope(numerics.rms_norm(k, kw), cos, sin)
    return y, q, k, numerics.swiglu(u)


def _stacked_scan(x, w1, w2):
    def layer(h, ws):
        a, b = ws
        f = numerics.linear(h, a)
        return numerics.linear(f[..., : b.shape[0]], b), None

    return jax.lax.scan(layer, x, (w1, w2))[0]


def _unrolled(x, w1s, w2s):
    for a, b in zip(w1s, w2s):
        x = numerics.linear(numerics.linear(x, a)[..., : b.shape[0]], b)
    return x


def bf16_dot_types(compiled_text: str) -> dict:
    """The element types XLA:CPU's optimised program computes its dots in."""
    kinds = re.findall(r"= (\w+)\[[^\]]*\][^ ]* dot\(", compiled_text)
    kinds += re.findall(r"= (\w+)\[[^\]]*\][^ ]* custom-call\([^)]*\), custom_call_target=\"__onednn\$matmul", compiled_text)
    return {k: kinds.count(k) for k in sorted(set(kinds))}


BF16_FLAG_SETS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
                  "--xla_cpu_use_xnnpack=true", "--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_thunk_runtime=false")

_BF16_PROBE = """
import json, re, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
n, d, o = (int(a) for a in sys.argv[1:4])
x = jnp.asarray(np.random.default_rng(0).standard_normal((n, d)), jnp.bfloat16)
w = jnp.asarray(np.random.default_rng(1).standard_normal((d, o)) * 0.02, jnp.bfloat16)
c = jax.jit(lambda x, w: x @ w).lower(x, w).compile()
for _ in range(3):
    c(x, w).block_until_ready()
ts = []
for _ in range(10):
    t = time.perf_counter(); c(x, w).block_until_ready(); ts.append(time.perf_counter() - t)
kinds = re.findall(r"= (\\w+)\\[[^\\]]*\\][^ ]* dot\\(", c.as_text())
print(json.dumps({"dot_types": sorted(set(kinds)), "median_s": statistics.median(ts)}))
"""


def bf16_flag_sweep(n: int, d: int, o: int) -> list[dict]:
    """One bf16 dot [n, d] x [d, o] under each XLA flag set, each in a fresh process (flags are read
    once per process): the element type of XLA's dot and the time."""
    import json
    import os
    import subprocess
    import sys

    rows = []
    for flags in BF16_FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=flags)
        out = subprocess.run([sys.executable, "-c", _BF16_PROBE, str(n), str(d), str(o)], env=env,
                             capture_output=True, text=True, check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"XLA_FLAGS": flags or "(none)", **probe, "gflops": 2.0 * n * d * o / probe["median_s"] / 1e9})
    return rows


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    D, H, K = args.hidden, args.heads, args.hidden // args.heads
    M = int(D * 3.0)
    n_txt, n_stream = args.text, args.image + args.ref
    L = n_txt + n_stream
    rng = np.random.default_rng(0)
    normal = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)
    guard = common.LoadGuard()
    guard.wait_quiet(args.wait_quiet)
    rows, notes = [], {}

    def compare(name, flops, sides, reps=args.reps):
        for fn in sides.values():  # compile / warm up outside the timing
            fn()
        times = common.alternate(sides, reps, guard)
        med = {s: statistics.median(t) for s, t in times.items()}
        names = list(sides)
        torch_side = names[-1]
        for s in names:
            rows.append({"component": name, "side": s, "median_s": med[s], "min_s": min(times[s]),
                         "ratio_to_torch": med[s] / med[torch_side],
                         "gflops": None if flops is None else flops / med[s] / 1e9})
        print(f"  {name}: " + ", ".join(f"{s} {1e3 * med[s]:.1f} ms" for s in names), flush=True)

    def block(x):
        return jax.block_until_ready(x)

    # dense
    shapes = dense_shapes(D, M, n_txt, n_stream)
    for dtype, tdtype, label in ((jnp.float32, torch.float32, "dense fp32"), (jnp.bfloat16, torch.bfloat16, "dense bf16")):
        xs = [jnp.asarray(normal(1, n, i), dtype) for _, n, i, _ in shapes]
        ws = [jnp.asarray(normal(i, o), dtype) for _, _, i, o in shapes]
        txs = [torch.from_numpy(np.array(x.astype(jnp.float32))).to(tdtype) for x in xs]
        tws = [torch.from_numpy(np.asarray(w.astype(jnp.float32)).T.copy()).to(tdtype) for w in ws]
        jitted = jax.jit(_jax_dots)
        compiled = jitted.lower(xs, ws).compile()
        if dtype == jnp.bfloat16:
            notes["bf16 dot element types in XLA:CPU's optimised program"] = bf16_dot_types(compiled.as_text())
        flops = sum(2.0 * n * i * o for _, n, i, o in shapes)

        def torch_dots(txs=txs, tws=tws):
            with torch.no_grad():
                return [F.linear(x, w) for x, w in zip(txs, tws)]

        compare(label, flops, {"fluxjax": lambda c=compiled, a=xs, b=ws: block(c(a, b)), "torch": torch_dots})

    # attention
    q, k, v = (jnp.asarray(normal(1, L, H, K) * 50) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous() for a in (q, k, v))
    default = jax.jit(lambda q, k, v: numerics.attention(q, k, v))
    one_block = jax.jit(lambda q, k, v: numerics._blocked_attention(q, k, v, None, block=L))
    att_flops = 4.0 * L * L * D

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv)

    compare("attention", att_flops, {"fluxjax default (blocked, 256 queries)": lambda: block(default(q, k, v)),
                                     "fluxjax blocked, one query block per head": lambda: block(one_block(q, k, v)),
                                     "torch": sdpa})

    # elementwise
    x, u = jnp.asarray(normal(1, L, D) * 50), jnp.asarray(normal(1, L, 2 * M) * 50)
    shift, scale = jnp.asarray(normal(1, 1, D)), jnp.asarray(normal(1, 1, D))
    qw, kw = jnp.ones((K,)), jnp.ones((K,))
    ids = jnp.asarray(np.stack([np.zeros(L), np.zeros(L), np.arange(L) // 32, np.arange(L) % 32], -1)[None], jnp.int32)
    cos, sin = numerics.rope_tables(ids, (32, 32, 32, 32) if K == 128 else (K // 4,) * 4, 2000.0)
    ew = jax.jit(_elementwise_jax)
    t = {n: torch.from_numpy(np.array(a)) for n, a in dict(x=x, u=u, shift=shift, scale=scale).items()}
    tq4, tk4 = (torch.from_numpy(np.array(a)) for a in (q, k))
    tcos, tsin = (torch.from_numpy(np.array(a)) for a in (cos, sin))

    def torch_rope(a):  # the pairwise rotation of diffusers' apply_rotary_emb on [B, L, H, K]
        a2 = a.reshape(*a.shape[:-1], -1, 2)
        re_, im = a2.unbind(-1)
        rot = torch.stack([-im, re_], -1).flatten(-2)
        c, s_ = tcos.reshape(1, L, 1, K), tsin.reshape(1, L, 1, K)
        return a * c + rot * s_

    def torch_ew():
        with torch.no_grad():
            y = (1 + t["scale"]) * F.layer_norm(t["x"], (D,), eps=1e-6) + t["shift"]
            qn = torch_rope(F.rms_norm(tq4, (K,), eps=1e-6))
            kn = torch_rope(F.rms_norm(tk4, (K,), eps=1e-6))
            g, val = t["u"].chunk(2, -1)
            return y, qn, kn, F.silu(g) * val

    if cos.size == L * K:
        compare("elementwise", None, {"fluxjax": lambda: block(ew(x, shift, scale, q, k, qw, kw, cos, sin, u)),
                                      "torch": torch_ew})

    # stacked weights under scan vs per-layer arrays
    n_layers = args.layers
    w1 = jnp.asarray(normal(n_layers, D, 3 * D + 2 * M))
    w2 = jnp.asarray(normal(n_layers, D + M, D))
    w1s, w2s = [jnp.array(a) for a in w1], [jnp.array(a) for a in w2]
    xs_ = jnp.asarray(normal(1, L, D))
    scanned, unrolled = jax.jit(_stacked_scan), jax.jit(_unrolled)
    st_flops = n_layers * 2.0 * L * (D * (3 * D + 2 * M) + (D + M) * D)
    tw1 = [torch.from_numpy(np.asarray(a).T.copy()) for a in w1s]
    tw2 = [torch.from_numpy(np.asarray(a).T.copy()) for a in w2s]
    tx = torch.from_numpy(np.array(xs_))

    def torch_layers():
        with torch.no_grad():
            h = tx
            for a, b in zip(tw1, tw2):
                h = F.linear(F.linear(h, a)[..., : b.shape[1]], b)
            return h

    compare(f"{n_layers} single-block dot pairs", st_flops,
            {"fluxjax lax.scan over stacked weights": lambda: block(scanned(xs_, w1, w2)),
             "fluxjax unrolled, per-layer arrays": lambda: block(unrolled(xs_, w1s, w2s)),
             "torch": torch_layers})

    if args.xla_flags:
        n, d, o = L, D, 3 * D + 2 * M
        sweep = bf16_flag_sweep(n, d, o)
        notes[f"one bf16 dot [{n}, {d}] x [{d}, {o}] under XLA:CPU flags (fresh process each)"] = "; ".join(
            f"{r['XLA_FLAGS']}: dot in {'/'.join(r['dot_types'])}, {1e3 * r['median_s']:.0f} ms ({r['gflops']:.0f} GFLOP/s)"
            for r in sweep)

    verdict = guard.enforce(args.allow_busy)
    return {"shape": {"hidden": D, "heads": H, "head_dim": K, "mlp_hidden": M, "text": n_txt, "image": args.image,
                      "ref": args.ref, "stacked_layers": n_layers},
            "environment": common.environment(), "load": verdict, "rows": rows, "notes": notes}


def markdown(record: dict) -> str:
    s = record["shape"]
    env = record["environment"]
    lines = ["# Forward components: fluxjax (XLA:CPU) vs torch",
             "", common.busy_banner(record["load"]),
             f"{env.get('cpu', '')}, {env.get('cpu_count', '')} CPUs, load average before "
             f"{record['load']['load_before']:.2f}; jax {env.get('jax', '')}, torch {env.get('torch', '')}. "
             f"Hidden {s['hidden']} ({s['heads']} heads of {s['head_dim']}), SwiGLU {s['mlp_hidden']}, "
             f"{s['text']} + {s['image']} + {s['ref']} tokens, fp32 unless named, batch 1; medians of alternating rounds.",
             ""]
    table = [[r["component"], r["side"], f"{1e3 * r['median_s']:.1f}", f"{1e3 * r['min_s']:.1f}",
              f"{r['ratio_to_torch']:.2f}", "-" if r["gflops"] is None else f"{r['gflops']:.0f}"] for r in record["rows"]]
    lines.append(common.markdown_table(["component", "side", "median (ms)", "min (ms)", "time / torch", "GFLOP/s"], table))
    for k, v in record["notes"].items():
        lines += ["", f"- {k}: {v}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.components", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--image", type=int, default=720)
    ap.add_argument("--ref", type=int, default=720)
    ap.add_argument("--layers", type=int, default=6, help="stacked single blocks in the scan row")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--xla-flags", action="store_true", help="also probe a bf16 dot under each XLA:CPU flag set")
    ap.add_argument("--out", default=str(common.RESULTS_DIR / "components"))
    ap.add_argument("--wait-quiet", type=float, default=120.0)
    ap.add_argument("--allow-busy", action="store_true")
    args = ap.parse_args(argv)
    record = run(args)
    paths = common.write_report(args.out, record, markdown(record))
    print(markdown(record))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
