"""The transformer forward: fluxjax (jit) against diffusers' Flux2Transformer2DModel (eager, and
torch.compile where it works), on the same random weights and inputs, in one process.

    python -m benchmarks.forward [--quick] [--reps 5] [--out benchmarks/results/forward]

Cases (fp32, batch 1, timestep 0.5, random well-conditioned weights shared by both sides):
  mid    D 1024, 8 heads, 2 double + 4 single blocks, 512 text + 32x32 image + 32x32 reference tokens
  deep   klein-9B depth (8 double + 24 single blocks) at D 256 (2 heads of 128), 512 text + 16x16
         image + 16x16 reference tokens; also with interventions on (a knockout ref->text in every
         block, a substitution of the padding positions at one block, a text and an image capture)
  klein  the real klein-9B shapes (D 4096, 32 heads, 8 + 24 blocks; 512 text + 64x64 image + 64x64
         reference tokens, bfloat16): compile only, from ShapeDtypeStructs (no weights), plain and
         with interventions
--quick shrinks mid to D 512 / 4 heads, every token grid to 8x8 (128 text tokens), skips
torch.compile and the real-size compile.

Measured:
  compile   fluxjax: trace + lower, XLA compile, first execution, each timed (AOT `lower().compile()`);
            diffusers: first call (eager), first call with compilation (torch.compile with its
            on-disk caches in a fresh directory, i.e. cold, under a time budget: a compile that
            fails or runs over is recorded as such).
  steady    the sides in turn, --reps rounds, order rotated each round; medians (and minima).
  memory    peak resident set size above the level before one steady-state call, sampled every
            0.5 ms on a thread, with glibc set to return every freed block >= 64 KiB to the system
            (mallopt), so it follows live buffers: the call's working memory beyond the weights and
            inputs. Measured after all timing (the setting adds page faults to every call). For
            fluxjax also XLA's own buffer assignment (`memory_analysis()`: temporaries + outputs).
Writes <out>.json and <out>.md and prints the table. Only from a quiet machine: the 1-minute load
average before the run and other processes' CPU time during every timed call are checked
(`benchmarks.common.LoadGuard`); on a busy machine nothing is written, unless --allow-busy (or
--quick), which writes the figures flagged as not a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: fluxjax.Flux2Config
    layout: fluxjax.TokenLayout
    interventions: bool = False  # also time the forward with a knockout, a substitution and captures


def cases(quick: bool) -> list[Case]:
    k9 = fluxjax.FLUX2_KLEIN_9B
    grid = (8, 8) if quick else (32, 32)
    mid = dataclasses.replace(k9, hidden_size=512 if quick else 1024, num_heads=4 if quick else 8,
                              context_in_dim=1536 if quick else 3072, depth=2, depth_single_blocks=4)
    deep = dataclasses.replace(k9, hidden_size=256, num_heads=2, context_in_dim=768)
    deep_grid = (8, 8) if quick else (16, 16)
    n_txt = 128 if quick else 512
    out = [Case("mid", mid, fluxjax.TokenLayout(n_txt, grid, (grid,))),
           Case("deep", deep, fluxjax.TokenLayout(n_txt, deep_grid, (deep_grid,)), interventions=True)]
    if not quick:
        # A shape nothing was tuned on: hidden 768 (6 heads), 1,952 tokens (512 + 720 + 720).
        held = dataclasses.replace(k9, hidden_size=768, num_heads=6, context_in_dim=2304, depth=3,
                                   depth_single_blocks=6)
        out.append(Case("held-out", held, fluxjax.TokenLayout(n_txt, (24, 30), ((24, 30),))))
    return out


def example_interventions(config, layout, rng, dtype=jnp.float32):
    """A knockout ref->text in every block, a substitution of the padding positions at the first single
    block, and the capture of the text stream there and of the image stream at the last double block."""
    content = np.zeros((1, layout.n_txt), bool)
    content[0, : layout.n_txt // 8] = True
    padding = layout.text_mask("text[padding]", content)
    value = jnp.asarray(rng.standard_normal((1, layout.n_txt, config.hidden_size)), dtype)
    at = fluxjax.site(config.depth, "text", "output")
    iv = fluxjax.Interventions(substitutions=(fluxjax.substitution(at, value, padding),),
                               knockout=fluxjax.knockout(config, layout, content, "ref->text"))
    capture = fluxjax.Capture(sites=(at, fluxjax.site(config.depth - 1, "image", "output")))
    return iv, capture


def jax_program(config, capture):
    def fwd(params, img, txt, t, img_ids, txt_ids, iv):
        return fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids, interventions=iv, capture=capture)[0]

    return jax.jit(fwd)


def aot(fn, *args) -> tuple[object, dict]:
    """Lower and compile `fn` for `args` (arrays or ShapeDtypeStructs), timing each stage."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    xla_bytes = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    return compiled, {"trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1, "xla_temp_plus_output_bytes": xla_bytes}


class CompileTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CompileTimeout


def torch_compiled_call(model, args, budget_s: int):
    """torch.compile(model) and its first call within `budget_s` -> (callable or None, record)."""
    import torch

    if budget_s <= 0:
        return None, {"status": "skipped"}
    compiled = torch.compile(model)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(budget_s)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            compiled(*args)
        status = "ok"
    except CompileTimeout:
        status = f"did not finish within {budget_s} s"
    except Exception as e:  # inductor needs a working C++ toolchain; record why it failed
        status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    first = time.perf_counter() - t0
    if status != "ok":
        torch._dynamo.reset()
        return None, {"status": status, "elapsed_s": first}
    return compiled, {"status": status, "first_call_s": first}


def run_case(case: Case, reps: int, compile_budget_s: int, ref, guard: common.LoadGuard | None = None) -> tuple[dict, dict]:
    import torch

    config, layout = case.config, case.layout
    print(f"[{case.name}] D={config.hidden_size}, {config.num_heads} heads, {config.depth}+{config.depth_single_blocks} "
          f"blocks; tokens {layout.n_txt} text + {layout.n_img} image + {layout.n_ref} reference", flush=True)
    from fluxjax.conversion.transformer import params_from_state

    model = ref.diffusers_transformer(config, seed=0)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_state(ref.state_dict_numpy(model), config, "diffusers"))
    img, txt = ref.inputs(config, layout, batch=1, seed=0)
    t = np.full(1, 0.5, np.float32)
    img_ids, txt_ids = layout.img_ids(), layout.txt_ids()
    targs = [torch.as_tensor(a) for a in (img, txt, t, img_ids, txt_ids)]
    jargs = (params, jnp.asarray(img), jnp.asarray(txt), jnp.asarray(t), jnp.asarray(img_ids), jnp.asarray(txt_ids))

    def torch_call(m):
        def call():
            with torch.no_grad():
                return m(*targs).sample
        return call

    record = {"config": dataclasses.asdict(config),
              "tokens": {"text": layout.n_txt, "image": layout.n_img, "reference": layout.n_ref},
              "flops": common.forward_flops(config, layout.n_txt, layout.n_image_stream)}

    plain, rec = aot(jax_program(config, None), *jargs, None)
    rec["first_run_s"], out = common.timed(lambda: jax.block_until_ready(plain(*jargs, None)))
    record["fluxjax_compile"] = rec
    print(f"  fluxjax compile {rec['trace_lower_s'] + rec['xla_compile_s']:.1f} s", flush=True)
    eager = torch_call(model)
    first, ref_out = common.timed(eager)
    record["diffusers_eager_first_call_s"] = first
    record["rel_err_vs_diffusers"] = float(np.linalg.norm(np.asarray(out) - ref_out.numpy())
                                           / np.linalg.norm(ref_out.numpy()))

    fns = {"fluxjax": lambda: jax.block_until_ready(plain(*jargs, None)), "diffusers eager": eager}
    if case.interventions:
        iv, capture = example_interventions(config, layout, np.random.default_rng(1))
        with_iv, rec = aot(jax_program(config, capture), *jargs, iv)
        rec["first_run_s"], _ = common.timed(lambda: jax.block_until_ready(with_iv(*jargs, iv)))
        record["fluxjax_interventions_compile"] = rec
        record["interventions"] = "knockout ref->text (all blocks), substitution of padding at block " \
                                  f"{config.depth}, captures text@{config.depth}, image@{config.depth - 1}"
        fns["fluxjax + interventions"] = lambda: jax.block_until_ready(with_iv(*jargs, iv))
    compiled, record["diffusers_torch_compile"] = torch_compiled_call(model, targs, compile_budget_s)
    print(f"  torch.compile: {record['diffusers_torch_compile']}", flush=True)
    if compiled is not None:
        fns["diffusers torch.compile"] = torch_call(compiled)

    times = common.alternate(fns, reps, guard)
    record["steady"] = {k: common.stats(v) for k, v in times.items()}
    base = statistics.median(times["diffusers eager"])
    record["ratio_vs_eager_median"] = {k: statistics.median(v) / base for k, v in times.items()}
    print("  steady (median s): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items()), flush=True)

    return record, fns


def peak_memory(fns) -> dict[str, int]:
    """Peak RSS increase of one call of each side (run after all timing: see `main`)."""
    memory = {}
    for name, fn in fns.items():
        fn()  # a warm call in the new allocator setting first
        with common.PeakRSS() as peak:
            fn()
        memory[name] = peak.bytes
    return memory


def klein_compile(dtype=jnp.bfloat16) -> dict:
    """Compile time of the real klein-9B forward (1024x1024 image + one 1024x1024 reference), from shapes."""
    config = fluxjax.FLUX2_KLEIN_9B
    layout = fluxjax.TokenLayout(512, (64, 64), ((64, 64),))
    print(f"[klein-9B compile] tokens {layout.n_txt} + {layout.n_img} + {layout.n_ref}", flush=True)
    params = fluxjax.param_shapes(config, dtype)
    sds = jax.ShapeDtypeStruct
    args = (params, sds((1, layout.n_image_stream, config.in_channels), dtype),
            sds((1, layout.n_txt, config.context_in_dim), dtype), sds((1,), dtype),
            jnp.asarray(layout.img_ids()), jnp.asarray(layout.txt_ids()))
    iv, capture = example_interventions(config, layout, np.random.default_rng(1), dtype)
    out = {"config": "FLUX2_KLEIN_9B", "dtype": jnp.dtype(dtype).name,
           "tokens": {"text": layout.n_txt, "image": layout.n_img, "reference": layout.n_ref}}
    _, out["plain"] = aot(jax_program(config, None), *args, None)
    _, out["interventions"] = aot(jax_program(config, capture), *args, iv)
    for k in ("plain", "interventions"):
        print(f"  {k}: trace+lower {out[k]['trace_lower_s']:.1f} s, compile {out[k]['xla_compile_s']:.1f} s", flush=True)
    return out


def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def report(record: dict) -> str:
    lines = [f"# Forward: fluxjax vs diffusers ({'quick' if record['quick'] else 'full'} run)", ""]
    if common.busy_banner(record.get("machine")):
        lines += [common.busy_banner(record["machine"]), ""]
    env = record["environment"]
    lines.append(f"{env['cpu']}, {env['cpu_count']} CPUs, load average at start {env['load_average']}; "
                 f"jax {env['jax']}, torch {env.get('torch')} ({env.get('torch_threads')} threads), "
                 f"diffusers {env.get('diffusers')}; fp32, batch 1. Medians of {record['reps']} alternating rounds.")
    lines.append("")
    rows = []
    for name, c in record["cases"].items():
        cfg, tok = c["config"], c["tokens"]
        shape = (f"D {cfg['hidden_size']}, {cfg['num_heads']} heads, {cfg['depth']}+{cfg['depth_single_blocks']} blocks; "
                 f"{tok['text']}+{tok['image']}+{tok['reference']} tokens")
        comp = {"fluxjax": c["fluxjax_compile"], "fluxjax + interventions": c.get("fluxjax_interventions_compile")}
        tc = c["diffusers_torch_compile"]
        for side, st in c["steady"].items():
            if side in comp:
                r = comp[side]
                first = f"{r['trace_lower_s'] + r['xla_compile_s']:.1f} + {r['first_run_s']:.2f} run"
            elif side == "diffusers eager":
                first = f"{c['diffusers_eager_first_call_s']:.2f}"
            else:
                first = f"{tc['first_call_s']:.1f}"
            rows.append([f"{name}: {shape}", side, first, f"{st['median_s']:.3f}", f"{st['min_s']:.3f}",
                         f"{c['ratio_vs_eager_median'][side]:.2f}", f"{c['flops'] / st['median_s'] / 1e9:.0f}",
                         gib(c["peak_rss_increase_bytes"].get(side))])
        if "diffusers torch.compile" not in c["steady"]:
            rows.append([f"{name}: {shape}", "diffusers torch.compile", tc["status"], "-", "-", "-", "-", "-"])
    lines.append(common.markdown_table(
        ["case", "side", "first call (s): compile + run", "steady (s, median)", "steady (s, min)",
         "time / diffusers eager", "GFLOP/s", "peak RSS increase (GiB)"], rows))
    lines.append("")
    for name, c in record["cases"].items():
        lines.append(f"- {name}: fluxjax vs diffusers output, relative L2 error {c['rel_err_vs_diffusers']:.1e}; "
                     f"XLA buffer assignment (temporaries + outputs) {gib(c['fluxjax_compile']['xla_temp_plus_output_bytes'])} GiB.")
    if record.get("klein_compile"):
        k = record["klein_compile"]
        lines.append("")
        lines.append(f"Compile of the real klein-9B forward ({k['dtype']}, {k['tokens']['text']}+{k['tokens']['image']}+"
                     f"{k['tokens']['reference']} tokens, from shapes):")
        lines.append("")
        lines.append(common.markdown_table(
            ["program", "trace + lower (s)", "XLA compile (s)", "total (s)", "XLA temporaries + outputs (GiB)"],
            [[p, f"{k[p]['trace_lower_s']:.1f}", f"{k[p]['xla_compile_s']:.1f}",
              f"{k[p]['trace_lower_s'] + k[p]['xla_compile_s']:.1f}", gib(k[p]["xla_temp_plus_output_bytes"])]
             for p in ("plain", "interventions")]))
        lines.append("")
        lines.append("The temporaries are a CPU artefact of bfloat16: XLA:CPU runs bfloat16 dots in float32 and "
                     "hoists the conversion of the stacked block weights out of the layer loop, a float32 copy of "
                     "the weights (2x their bfloat16 bytes). float32 programs hold no such copy (the cases above).")
    lines.append("")
    lines.append("Memory: peak resident set size above the level before one steady-state call (0.5 ms sampling, "
                 "glibc returning freed blocks >= 64 KiB to the system; measured after the timing).")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, no torch.compile, no real-size compile")
    ap.add_argument("--reps", type=int, default=None, help="alternating rounds (default 5, quick 3)")
    ap.add_argument("--torch-compile-budget", type=int, default=240,
                    help="seconds allowed for torch.compile's first call (0 skips it)")
    ap.add_argument("--torch-compile-deep", action="store_true",
                    help="also torch.compile the 32-block deep case (dynamo unrolls every block: slow)")
    ap.add_argument("--out", default=str(common.RESULTS_DIR / "forward"), help="output stem: writes .json and .md")
    ap.add_argument("--rewrite-report", action="store_true", help="rewrite <out>.md from <out>.json and exit")
    ap.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for the load average to fall")
    ap.add_argument("--allow-busy", action="store_true", help="write figures from a busy machine, flagged")
    args = ap.parse_args(argv)
    allow_busy = args.allow_busy or args.quick
    reps = args.reps or (3 if args.quick else 5)
    if args.rewrite_report:
        record = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(report(record) + "\n")
        return

    # torch.compile's first call is timed cold: inductor's on-disk caches start empty.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))
    import diffusers  # noqa: F401  (recorded in the environment)
    import torch

    ref = common.reference_helpers()
    guard = common.LoadGuard()
    if guard.wait_quiet(args.wait_quiet) > guard.load_limit and not allow_busy:
        raise common.MachineBusy(f"1-minute load average {guard.load_before:.2f} > {guard.load_limit:.2f}: not "
                                 "measuring on a busy machine (--allow-busy measures and flags the figures)")
    t0 = time.perf_counter()
    record = {"quick": args.quick, "reps": reps, "environment": common.environment(), "cases": {},
              "torchinductor_cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"]}
    calls = {}
    for case in cases(args.quick):
        budget = 0 if args.quick or (case.name == "deep" and not args.torch_compile_deep) else args.torch_compile_budget
        record["cases"][case.name], calls[case.name] = run_case(case, reps, budget, ref, guard)
        if budget == 0:
            record["cases"][case.name]["diffusers_torch_compile"]["status"] = (
                "skipped (--quick)" if args.quick else "skipped (32 unrolled blocks; --torch-compile-deep)")
    record["machine"] = guard.enforce(allow_busy)
    record["klein_compile"] = None if args.quick else klein_compile()
    # Memory last: the allocator setting it needs (every freed block back to the system) would
    # add page faults to the timed calls.
    record["memory_method"] = "peak RSS increase" if common.release_freed_memory() else "peak RSS increase (malloc default)"
    for name, fns in calls.items():
        record["cases"][name]["peak_rss_increase_bytes"] = peak_memory(fns)
    del calls
    record["total_s"] = time.perf_counter() - t0
    record["max_rss_bytes"] = common.max_rss_bytes()
    del torch
    md = report(record)
    paths = common.write_report(args.out, record, md)
    print()
    print(md)
    print(f"\nwrote {paths[0]} and {paths[1]} in {record['total_s']:.0f} s")


if __name__ == "__main__":
    main()
