"""An experiment command run by one process and by N local processes of JAX's distributed runtime
on the same cores: the wall time of each, and whether the two run folders hold the same outputs.

    python -m benchmarks.processes --processes 2 -- knockout --model direct --colours red,blue,green \\
        --objects circle,triangle --seeds 0 --settings ref->image ref->text --layers all :2 --steps 1 --chunk 1

The N processes run on this host with a localhost coordinator (`--coordinator 127.0.0.1:PORT
--num-processes N --process-id I`, CPU collectives over gloo), each with one CPU device, the cells
split among them (experiments.hosts). On one machine they share its cores, so no speed-up is
expected: what the figure shows is the cost of the processes' separate start-up and compilation
(each process compiles every program) and of the barriers. The load average is recorded with the
times, since other work on the machine adds to both.

`launch` starts the processes; the tests of experiments.hosts use it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on this host now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], n: int, *, env: dict | None = None, logs: Path | None = None,
           heartbeat_timeout: int | None = None, python: Sequence[str] | None = None) -> list[subprocess.Popen]:
    """Start `python -m experiments.<argv[0]> <argv[1:]>` as N processes of one distributed run on
    this host (a localhost coordinator on a free port); each process's output goes to
    `logs/process-I.log` (default: discarded). python: the interpreter and script to start instead
    of `python -m experiments.<argv[0]>` (argv[0] is then passed on as the first argument)."""
    port = free_port()
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [*python, *argv] if python else [sys.executable, "-m", f"experiments.{argv[0]}", *argv[1:]]
    procs = []
    for i in range(n):
        extra = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
        if heartbeat_timeout is not None:
            extra += ["--heartbeat-timeout", str(heartbeat_timeout)]
        out = subprocess.DEVNULL
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            out = open(logs / f"process-{i}.log", "w")
        procs.append(subprocess.Popen([*command, *extra], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
        if logs is not None:
            out.close()
    return procs


def wait(procs: Sequence[subprocess.Popen], timeout: float) -> list[int]:
    """The exit codes of every process, killing all that run past `timeout` seconds (code -9)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(p.wait())
    return codes


def outputs(folder: Path) -> dict[str, bytes]:
    """The files of a run folder that its cells and tables determine: outputs/, grids/, plots/ and
    the CSVs (not the report, summary and invocation records, which hold times and hosts)."""
    keep = [p for p in folder.rglob("*") if p.is_file() and (
        p.relative_to(folder).parts[0] in ("outputs", "grids", "plots", "tasks") or p.suffix == ".csv")]
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in keep}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.processes", description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2, help="processes of the distributed run (default 2)")
    ap.add_argument("--work", type=Path, default=Path("runs/benchmark-processes"),
                    help="folder of the two run folders (emptied first)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each run may take")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "processes.json")
    ap.add_argument("command", nargs="+", help="the experiment and its options, after --")
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    one, many = args.work / "one", args.work / f"{args.processes}-processes"
    command = [*args.command, "--no-progress"]
    rows = {}
    for name, folder, n in (("1 process", one, 1), (f"{args.processes} processes", many, args.processes)):
        load = os.getloadavg()
        start = time.perf_counter()
        if n == 1:
            proc = subprocess.run([sys.executable, "-m", f"experiments.{command[0]}", *command[1:], "--out",
                                   str(folder)], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                                  timeout=args.timeout)
            codes = [proc.returncode]
        else:
            codes = wait(launch([*command, "--out", str(folder)], n, env=env, logs=folder.with_suffix(".logs")),
                         args.timeout)
        seconds = time.perf_counter() - start
        rows[name] = {"seconds": round(seconds, 1), "exit_codes": codes, "load_average_before": load,
                      "load_average_after": os.getloadavg()}
        print(f"{name}: {seconds:.1f} s (exit {codes}; load average before {load[0]:.1f}, after "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    same = outputs(one) == outputs(many)
    print(f"outputs identical: {same} ({len(outputs(one))} files)")
    record = {"command": " ".join(command), "processes": args.processes, "cpus": os.cpu_count(), "runs": rows,
              "outputs_identical": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if same and all(c == 0 for r in rows.values() for c in r["exit_codes"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
