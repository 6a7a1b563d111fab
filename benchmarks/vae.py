"""Speed and peak memory of the FLUX.2 autoencoder: fluxjax (jit) against diffusers' `AutoencoderKLFlux2`.

    .venv/bin/python -m benchmarks.vae [--sizes 256 512] [--reps 3] [--out benchmarks/results/vae]

The real architecture (FLUX2_VAE, 84M parameters) with random fp32 weights, batch 1, on the CPU.
Both sides get the same weights (diffusers randomised, converted by fluxjax's converter).

- encode: image [1, 3, S, S] -> posterior mean latents [1, 32, S/8, S/8] (diffusers
  `encode(x).latent_dist.mode()`); decode: latents -> image (`decode(z).sample`).
- Time: one process, the two sides alternated rep by rep (the order flips every rep), each call
  synchronised (`block_until_ready`); the median is reported. fluxjax's compile time (lower +
  compile) is measured apart and excluded from the run time.
- Peak memory: every (side, operation, size) in a fresh subprocess that loads the weights, compiles
  (fluxjax) and then runs the call once while a thread samples the resident set size
  (/proc/self/statm) every millisecond; reported is the peak during the call minus the resident
  size just before it, i.e. the activations and workspace the call needs on top of the weights.
  For fluxjax, XLA's own compiled memory analysis (temporaries + output) is reported next to it.

Prints a Markdown table and writes `<out>.json` and `<out>.md`. Only from a quiet machine
(`benchmarks.common.LoadGuard`: the load average before, others' CPU time during every timed call);
`--allow-busy` writes the figures flagged as not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

OPS = ("encode", "decode")


def _randomized_diffusers_state(seed: int = 0):
    import torch
    from diffusers import AutoencoderKLFlux2

    from flux2ref.models import randomize_

    torch.manual_seed(seed)
    return randomize_(AutoencoderKLFlux2().eval(), seed)


def _inputs(op: str, size: int):
    rng = np.random.default_rng(size)
    if op == "encode":
        return rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)  # NHWC
    return rng.standard_normal((1, size // 8, size // 8, 32)).astype(np.float32)


class _Side:
    """One implementation: `prepare(op, size)` compiles / warms nothing but fluxjax's jit; `call` runs once."""

    def __init__(self, name: str, weights: str):
        self.name = name
        self.compile_s: dict[tuple[str, int], float] = {}
        self.memory_analysis: dict[tuple[str, int], dict] = {}
        if name == "diffusers":
            import torch
            from diffusers import AutoencoderKLFlux2
            from safetensors.torch import load_file

            self.torch = torch
            self.model = AutoencoderKLFlux2().eval()
            self.model.load_state_dict(load_file(weights), strict=True)
        else:
            import jax

            from fluxjax.conversion.safetensors_io import SafetensorsFile
            from fluxjax.conversion.vae import vae_params_from_state
            from fluxjax import vae

            self.jax, self.vae = jax, vae
            self.params = jax.device_put(vae_params_from_state(SafetensorsFile(weights), vae.FLUX2_VAE, "diffusers"))
            self.compiled = {}

    def prepare(self, op: str, size: int):
        x = _inputs(op, size)
        if self.name == "diffusers":
            return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        if (op, size) not in self.compiled:
            fn = self.vae.encode if op == "encode" else self.vae.decode
            t0 = time.perf_counter()
            compiled = self.jax.jit(fn, static_argnums=1).lower(self.params, self.vae.FLUX2_VAE, x).compile()
            self.compile_s[(op, size)] = time.perf_counter() - t0
            self.compiled[(op, size)] = compiled
            m = compiled.memory_analysis()
            if m is not None:
                self.memory_analysis[(op, size)] = dict(
                    temp_bytes=int(m.temp_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                    argument_bytes=int(m.argument_size_in_bytes))
        return self.jax.device_put(x)

    def call(self, op: str, size: int, x):
        if self.name == "diffusers":
            with self.torch.no_grad():
                if op == "encode":
                    return self.model.encode(x).latent_dist.mode()
                return self.model.decode(x).sample
        return self.compiled[(op, size)](self.params, x).block_until_ready()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_during(fn) -> tuple[int, int]:
    """(resident bytes just before fn, peak resident bytes while fn ran), sampled every 1 ms."""
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return before, max(peak[0], _rss_bytes())


def _worker(side: str, op: str, size: int, weights: str) -> dict:
    s = _Side(side, weights)
    x = s.prepare(op, size)
    before, peak = _peak_during(lambda: s.call(op, size, x))
    out = dict(side=side, op=op, size=size, rss_before_bytes=before, peak_extra_bytes=peak - before)
    if (op, size) in s.memory_analysis:
        out["xla_memory_analysis"] = s.memory_analysis[(op, size)]
    return out


def _memory(side: str, op: str, size: int, weights: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vae", "--worker", side, op, str(size), weights]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {side} {op} {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def run(sizes: list[int], reps: int, out: str, allow_busy: bool = False, wait_quiet: float = 120.0) -> dict:
    import jax
    import torch

    import diffusers

    from benchmarks import common

    guard = common.LoadGuard()
    if guard.wait_quiet(wait_quiet) > guard.load_limit and not allow_busy:
        raise common.MachineBusy(f"1-minute load average {guard.load_before:.2f} above {guard.load_limit:.2f}: not "
                                 "measuring on a busy machine (--allow-busy measures and flags the figures)")

    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        weights = os.path.join(tmp, "vae.safetensors")
        save_file({k: v.contiguous() for k, v in _randomized_diffusers_state().state_dict().items()}, weights)
        sides = {name: _Side(name, weights) for name in ("fluxjax", "diffusers")}
        rows = []
        for size in sizes:
            for op in OPS:
                xs = {name: s.prepare(op, size) for name, s in sides.items()}
                ref = sides["diffusers"].call(op, size, xs["diffusers"]).numpy().transpose(0, 2, 3, 1)
                ours = np.asarray(sides["fluxjax"].call(op, size, xs["fluxjax"]))
                rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
                times = {name: [] for name in sides}
                for r in range(reps):
                    order = ("fluxjax", "diffusers") if r % 2 == 0 else ("diffusers", "fluxjax")
                    for name in order:
                        times[name].append(guard.measure(name, lambda: sides[name].call(op, size, xs[name]))[0])
                mem = {name: _memory(name, op, size, weights) for name in sides}
                row = dict(op=op, size=size, rel_l2_vs_diffusers=rel,
                           fluxjax_s=statistics.median(times["fluxjax"]),
                           diffusers_s=statistics.median(times["diffusers"]),
                           fluxjax_times_s=times["fluxjax"], diffusers_times_s=times["diffusers"],
                           fluxjax_compile_s=sides["fluxjax"].compile_s[(op, size)],
                           fluxjax_peak_extra_bytes=mem["fluxjax"]["peak_extra_bytes"],
                           diffusers_peak_extra_bytes=mem["diffusers"]["peak_extra_bytes"],
                           fluxjax_xla_memory_analysis=mem["fluxjax"].get("xla_memory_analysis"))
                row["time_ratio"] = row["fluxjax_s"] / row["diffusers_s"]
                row["memory_ratio"] = row["fluxjax_peak_extra_bytes"] / max(row["diffusers_peak_extra_bytes"], 1)
                rows.append(row)
                print(f"{op} {size}: fluxjax {row['fluxjax_s']:.2f}s, diffusers {row['diffusers_s']:.2f}s", flush=True)

    machine = guard.enforce(allow_busy)
    result = dict(
        machine=machine,
        benchmark="FLUX.2 autoencoder (FLUX2_VAE, random fp32 weights, batch 1)",
        device=f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} logical cores",
        load_average_at_end=os.getloadavg(),
        versions=dict(jax=jax.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
                      python=platform.python_version()),
        torch_threads=torch.get_num_threads(), reps=reps, dtype="float32", rows=rows,
        method=("time: median of reps in one process, sides alternated; fluxjax compile timed apart. "
                "memory: fresh subprocess per (side, op, size), RSS sampled every 1 ms during one call "
                "(after compile), peak minus RSS before the call."),
    )
    table = markdown(result)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table + "\n")
    return result


def markdown(result: dict) -> str:
    from benchmarks import common

    banner = common.busy_banner(result.get("machine"))
    load = result.get("machine", {}).get("load_before")
    lines = ([banner, ""] if banner else []) + [
        f"{result['benchmark']}; {result['device']}; load average before {load if load is None else round(load, 2)}; torch threads {result['torch_threads']}; "
        f"jax {result['versions']['jax']}, torch {result['versions']['torch']}, "
        f"diffusers {result['versions']['diffusers']}; median of {result['reps']} alternated reps.",
        "",
        "| op | size | fluxjax s | diffusers s | time ratio | fluxjax compile s | fluxjax peak MiB | "
        "diffusers peak MiB | memory ratio | XLA temp MiB | rel. L2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        xla = r["fluxjax_xla_memory_analysis"]
        lines.append(
            f"| {r['op']} | {r['size']}x{r['size']} | {r['fluxjax_s']:.2f} | {r['diffusers_s']:.2f} | "
            f"{r['time_ratio']:.2f} | {r['fluxjax_compile_s']:.1f} | {_mib(r['fluxjax_peak_extra_bytes'])} | "
            f"{_mib(r['diffusers_peak_extra_bytes'])} | {r['memory_ratio']:.2f} | "
            f"{_mib(xla['temp_bytes']) if xla else 'n/a'} | {r['rel_l2_vs_diffusers']:.1e} |")
    lines += ["", "Ratios are fluxjax / diffusers (below 1: fluxjax faster or smaller). Peak MiB: resident memory "
              "above the loaded weights during one call, in a fresh process."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vae"))
    parser.add_argument("--allow-busy", action="store_true", help="write figures from a busy machine, flagged")
    parser.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait for the load average to fall")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "OP", "SIZE", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        side, op, size, weights = args.worker
        print(json.dumps(_worker(side, op, int(size), weights)))
        return
    run(args.sizes, args.reps, args.out, args.allow_busy, args.wait_quiet)


if __name__ == "__main__":
    main()
