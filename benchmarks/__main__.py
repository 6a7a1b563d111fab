"""`python -m benchmarks [--quick]`: every benchmark against the PyTorch reference, one after another.

Runs, each in this order and each writing its JSON and Markdown under benchmarks/results/:
forward (fluxjax vs diffusers eager and torch.compile, compile time apart, peak memory, klein-9B
compile), components (the forward's parts against torch: dense, attention, elementwise, the scan over
stacked weights, bf16 dots), interventions (knockout / substitution / removal overheads, sweeps), sampler (a 4-step
edit vs Flux2KleinPipeline) and vae (encode/decode at 256 and 512 px). Each side is timed in one
process with the two sides alternated; see each module's docstring for its method.
`--quick` runs small shapes (a check that everything works, not figures to quote).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import components, forward, interventions, sampler, vae


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    ap.add_argument("--only", nargs="+", choices=("forward", "components", "interventions", "sampler", "vae"),
                    help="run only these benchmarks")
    args = ap.parse_args(argv)
    quick = args.quick
    plan = {
        "forward": lambda: forward.main(["--quick", "--out", "benchmarks/results/forward-quick"] if quick else []),
        "components": lambda: components.main(
            ["--hidden", "256", "--heads", "2", "--text", "64", "--image", "64", "--ref", "64", "--layers", "2",
             "--reps", "1", "--allow-busy", "--wait-quiet", "0", "--out", "benchmarks/results/components-quick"]
            if quick else ["--xla-flags"]),
        "interventions": lambda: interventions.main(
            ["--hidden", "128", "--heads", "1", "--image", "8", "8", "--ref", "8", "8", "--text", "64", "--reps", "1",
             "--attention-reps", "1", "--attention-calls", "1",
             "--out", "benchmarks/results/interventions-quick.json", "--allow-busy", "--wait-quiet", "0"] if quick else []),
        "sampler": lambda: sampler.main(["--repeats", "1", "--allow-busy", "--wait-quiet", "0", "--out",
                                           "benchmarks/results/sampler-quick"] if quick else []),
        "vae": lambda: vae.main(["--sizes", "64", "--reps", "1", "--allow-busy", "--wait-quiet", "0", "--out",
                                 "benchmarks/results/vae-quick"]
                                if quick else []),
    }
    for name, run in plan.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        status = run()
        print(f"=== {name}: {time.perf_counter() - start:.0f} s ===", flush=True)
        if status:
            return int(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
