"""Peak resident memory of `python -m experiments.collect` against the number of tasks collected.

    python -m benchmarks.collect_memory                       # 16, 80 and 240 tasks, chunks of 8
    python -m benchmarks.collect_memory --tasks 8 16 --chunk-tasks 4 --out /tmp/collect_memory.json

The model is a random organism-sized FLUX.2 transformer with klein-9B's 32 blocks (8 double + 24
single, hidden 128, 32 text tokens, 8 steps), saved as an organism folder; every block's text
output is collected at every step (a 32-block grid: 4 MiB a task in float32). Each count runs in
its own child process, which reports its own peak resident set size (`getrusage`, ru_maxrss); the
store grows with the tasks while the peak should stay at the model, the compiled program and one
chunk. Memory does not depend on the machine's load. Everything it writes goes to a temporary
folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
from experiments import collect
code = collect.main(sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def grid_organism(folder: Path) -> Path:
    """A random organism with klein-9B's block count (8 double + 24 single) saved at `folder`."""
    from organisms.checkpoint import save_organism
    from organisms.model import TRANSFORMER, Organism, init_organism

    organism = Organism("grid32", transformer=dataclasses.replace(TRANSFORMER, depth=8, depth_single_blocks=24))
    return save_organism(folder, organism, init_organism(organism, seed=0, adaln_zero=False))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model: Path, tasks: int, chunk: int, work: Path) -> dict:
    out = work / f"run-{tasks}"
    args = ["--model", str(model), "--limit", str(tasks), "--chunk-tasks", str(chunk), "--blocks", "all",
            "--kinds", "text.output", "--keep-steps", "all", "--no-progress", "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"collect of {tasks} tasks failed:\n{done.stderr[-3000:]}")
    peak = int(done.stdout.split("MAXRSS_KIB")[1].split()[0])
    store = out / "collect.zarr"
    attrs = json.loads((store / ".zattrs").read_text())
    per_task = len(attrs["sites"]) * len(attrs["steps"]) * attrs["tokens"]["text"] * 128 * 4
    return {"tasks": tasks, "chunk_tasks": chunk, "peak_rss_mib": round(peak / 1024, 1),
            "store_mib_on_disk": round(folder_bytes(store) / 2**20, 1),
            "captures_mib": round(tasks * per_task / 2**20, 1), "chunk_mib": round(chunk * per_task / 2**20, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collect_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 80, 240],
                        help="task counts, each collected by its own process (at most 240: the organisms' bucket)")
    parser.add_argument("--chunk-tasks", type=int, default=8, help="tasks per chunk (default 8)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (and a .md beside it)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = grid_organism(work / "grid32")
        for n in args.tasks:
            rows.append(measure(model, n, args.chunk_tasks, work))
            print(json.dumps(rows[-1]), flush=True)
    command = "python -m benchmarks.collect_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "model": "random organism-sized transformer, 8 double + 24 single blocks, "
              "hidden 128, 32 text tokens, 8 steps, float32", "sites": "every block's text output, every step",
              "rows": rows}
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"Peak resident memory of `experiments.collect` (`{result['command']}`): {result['model']}; "
                 f"{result['sites']}.", "", "| tasks | chunk (tasks) | captures (MiB) | store on disk (MiB) | "
                 "one chunk (MiB) | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['tasks']} | {r['chunk_tasks']} | {r['captures_mib']} | {r['store_mib_on_disk']} | "
                  f"{r['chunk_mib']} | {r['peak_rss_mib']} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
