"""Helpers shared by the benchmarks: alternating timing, peak memory, FLOP counts, environment
record and JSON / Markdown reports.

Timing on a shared machine: other processes only ever add time, and they come and go. So the
sides of a comparison run in turn within one process, the order rotated each round, and the
figures are medians (minimum next to them) of each side's rounds.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds one call takes (the callable must block until its result is ready), and its result."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(fns: dict[str, Callable[[], object]], reps: int, guard: "LoadGuard | None" = None) -> dict[str, list[float]]:
    """Run every callable once per round, `reps` rounds, rotating the order each round. With a
    guard, every call is measured through it (its CPU time and others' are recorded)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(guard.measure(n, fns[n])[0] if guard is not None else timed(fns[n])[0])
    return times


def stats(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs_s": seconds}


# --- a quiet machine -------------------------------------------------------------------------------
#
# Alternating the sides cancels load that comes and goes slowly, not load that takes cores away
# from one side more than the other (a recorded ratio of 0.17x turned 1.18x on a quiet machine).
# So a benchmark records figures only from a machine that is quiet before it starts (1-minute load
# average) and stays quiet while it measures: other processes' CPU time during each timed call,
# from /proc/stat's machine-wide busy time minus this process's own CPU time.

LOAD_LIMIT_PER_CPU = 0.25  # 1-minute load average per CPU above which the machine is busy before a run
OTHERS_LIMIT = 0.10  # share of the machine's CPU capacity other processes may use while a side is timed


class MachineBusy(RuntimeError):
    """Raised instead of recording figures measured (or about to be measured) on a busy machine."""


def system_busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds since boot, all CPUs (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def machine_cpu_count() -> int:
    """CPUs the load average and /proc/stat count (the whole machine, not this process's share)."""
    try:
        with open("/proc/stat") as f:
            return sum(1 for line in f if line.startswith("cpu") and line[3:4].isdigit()) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


@dataclasses.dataclass
class LoadGuard:
    """Checks that a benchmark runs on a quiet machine, and records the CPU time each side got.

        guard = LoadGuard()
        guard.wait_quiet(60)                  # the 1-minute load average before the run
        times = alternate(fns, reps, guard)   # every timed call measured: own and others' CPU time
        guard.enforce(allow_busy)             # MachineBusy, or the verdict to store with the figures

    The readers are arguments so that tests can feed fake readings.
    """

    cpu_count: int = dataclasses.field(default_factory=machine_cpu_count)
    load_limit_per_cpu: float = LOAD_LIMIT_PER_CPU
    others_limit: float = OTHERS_LIMIT
    read_load: Callable[[], float] = lambda: os.getloadavg()[0]
    read_system_busy: Callable[[], float] = system_busy_seconds
    read_own: Callable[[], float] = time.process_time
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep
    load_before: float | None = None
    sides: dict = dataclasses.field(default_factory=dict)  # name -> {"wall_s", "own_cpu_s", "others_cpu_s"} lists

    @property
    def load_limit(self) -> float:
        return self.load_limit_per_cpu * self.cpu_count

    def wait_quiet(self, timeout_s: float = 0.0, poll_s: float = 5.0) -> float:
        """Wait up to timeout_s for the 1-minute load average to fall below the limit; record it."""
        start = self.clock()
        self.load_before = self.read_load()
        while self.load_before > self.load_limit and self.clock() - start < timeout_s:
            self.sleep(poll_s)
            self.load_before = self.read_load()
        return self.load_before

    def measure(self, name: str, fn: Callable[[], object]) -> tuple[float, object]:
        """Run fn once (it must block until done); record its wall time, this process's CPU time and
        the CPU time other processes used meanwhile. Returns (wall seconds, result)."""
        busy0, own0, t0 = self.read_system_busy(), self.read_own(), self.clock()
        out = fn()
        wall, own = self.clock() - t0, self.read_own() - own0
        others = max(0.0, self.read_system_busy() - busy0 - own)
        side = self.sides.setdefault(name, {"wall_s": [], "own_cpu_s": [], "others_cpu_s": []})
        side["wall_s"].append(wall)
        side["own_cpu_s"].append(own)
        side["others_cpu_s"].append(others)
        return wall, out

    def verdict(self) -> dict:
        """quiet: no reason below; reasons: what was busy; per side: its CPU time per wall second and
        the share of the machine others took while it ran (the share over all its timed calls)."""
        reasons, per_side = [], {}
        if self.load_before is None:
            reasons.append("the load average was not checked before the run (LoadGuard.wait_quiet)")
        elif self.load_before > self.load_limit:
            reasons.append(f"1-minute load average {self.load_before:.2f} before the run, above "
                           f"{self.load_limit:.2f} ({self.load_limit_per_cpu} per CPU x {self.cpu_count})")
        for name, s in self.sides.items():
            wall = sum(s["wall_s"])
            share = sum(s["others_cpu_s"]) / (wall * self.cpu_count) if wall > 0 else 0.0
            per_side[name] = {"calls": len(s["wall_s"]), "wall_s": wall, "own_cpu_per_wall_s": sum(s["own_cpu_s"]) / wall
                              if wall > 0 else 0.0, "others_share": share}
            if share > self.others_limit:
                reasons.append(f"other processes used {100 * share:.0f} % of the machine's CPU while {name!r} was "
                               f"timed (limit {100 * self.others_limit:.0f} %)")
        return {"quiet": not reasons, "reasons": reasons, "load_before": self.load_before,
                "load_limit": self.load_limit, "others_limit": self.others_limit, "cpu_count": self.cpu_count,
                "sides": per_side}

    def enforce(self, allow_busy: bool = False) -> dict:
        """The verdict; raise MachineBusy if the machine was busy, unless allow_busy (then the caller
        stores the verdict with the figures, which marks them as not a result)."""
        v = self.verdict()
        if not v["quiet"] and not allow_busy:
            raise MachineBusy("not recording figures from a busy machine: " + "; ".join(v["reasons"])
                              + ". Rerun when the machine is quiet, or pass --allow-busy to write them flagged.")
        return v


def busy_banner(verdict: dict | None) -> str:
    """A Markdown line that marks a report measured on a busy machine (empty when quiet)."""
    if verdict is None or verdict["quiet"]:
        return ""
    return "**NOT A RESULT: measured on a busy machine** (" + "; ".join(verdict["reasons"]) + ")"


# --- memory ----------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def release_freed_memory() -> bool:
    """Make glibc serve every allocation >= 64 KiB by mmap and return it on free (mallopt), so the
    resident set size follows live buffers and its peak measures a call's working memory. Both
    torch's CPU allocator and XLA's CPU client allocate through malloc. False where unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 0))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: peak resident set size above the level at entry, sampled on a thread.

        with PeakRSS() as peak:
            run()
        peak.bytes
    """

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.bytes = 0

    def __enter__(self):
        self._base = self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.bytes = self._peak - self._base
        return False


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- FLOPs -----------------------------------------------------------------------------------------


def forward_flops(config, n_txt: int, n_stream: int, batch: int = 1) -> float:
    """FLOPs (2 per multiply-add) of one transformer forward over n_txt text and n_stream image-stream
    tokens, counted from the architecture (spec section 3):

      per token and block, double or single alike: 4 D^2 (q, k, v, out) + 3 D M (SwiGLU in 2M, out M)
      per block: 2 L^2 D for q k^T plus 2 L^2 D for p v, L = n_txt + n_stream
      input projections: n_stream in_channels D + n_txt C D; final layer: n_stream D out_channels
    Modulations and embeddings (per sample, not per token) are left out: < 0.1 % at real sizes.
    """
    D, M, L = config.hidden_size, config.mlp_hidden, n_txt + n_stream
    macs_block = L * (4 * D * D + 3 * D * M) + 2 * L * L * D
    macs = config.num_blocks * macs_block
    macs += n_stream * config.in_channels * D + n_txt * config.context_in_dim * D + n_stream * D * config.output_channels
    return 2.0 * macs * batch


# --- results written as they are made --------------------------------------------------------------


class RowLog:
    """A command's results, one JSON object per line, each written, flushed and synced before the next
    step starts: a command killed at any point leaves every finished row (and no partial one, a
    line being written whole). Each row also prints as one line.

        log = RowLog("out/rows.jsonl", command="A")
        log.row("compile", name="plain", compile_s=3.1)
    """

    def __init__(self, path: str | Path, command: str, clock: Callable[[], float] = time.perf_counter,
                 append: bool = False):
        """append: add to the rows already in the file (a child process of the command that made it)."""
        self.path, self.command, self.clock = Path(path), command, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = clock()
        if not append:
            self.path.write_text("")
        self.reload()

    def reload(self):
        """Read back the file's rows (those of child processes included)."""
        self.rows = read_rows(self.path) if self.path.exists() else []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def row(self, step: str, **fields) -> dict:
        row = {"command": self.command, "step": step, "t_s": round(self.elapsed(), 3), **fields}
        line = json.dumps(row, default=_plain) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        row = json.loads(line)  # as a reader of the file sees it (tuples as lists)
        self.rows.append(row)
        shown = ", ".join(f"{k} {_short(v)}" for k, v in fields.items())
        print(f"[{row['t_s']:7.1f} s] {self.command} {step}: {shown}", flush=True)
        return row


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a `RowLog` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(value):
    """JSON for numpy scalars and anything else a row holds."""
    return value.item() if hasattr(value, "item") else str(value)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclasses.dataclass
class Budget:
    """A command's wall-clock budget: a step runs only if the seconds it needs are left.

    needs: each step's expected seconds at real size (measured), scaled by `scale` (0 for a tiny
    rehearsal, where every step is short)."""

    seconds: float
    clock: Callable[[], float] = time.perf_counter
    scale: float = 1.0

    def __post_init__(self):
        self.start = self.clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def allows(self, needs_s: float) -> bool:
        return self.left() >= needs_s * self.scale


def device_memory() -> dict:
    """Accelerator memory now, in bytes, where the frameworks report it: JAX's allocator (in use,
    peak since start, limit) and torch's caching allocator (allocated, reserved, peak since its
    last reset). Empty on a CPU."""
    import jax

    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        if key in stats:
            out[f"jax_{key}"] = int(stats[key])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(torch_allocated=torch.cuda.memory_allocated(), torch_reserved=torch.cuda.memory_reserved(),
                   torch_peak_allocated=torch.cuda.max_memory_allocated())
    return out


def xla_memory(compiled) -> dict:
    """XLA's buffer assignment of a compiled program, in bytes: arguments (the weights among them),
    outputs, temporaries (what the program itself allocates: the figure to compare programs by),
    aliased bytes, and their sum."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# --- environment and reports -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Versions, devices and machine of this run. torch and diffusers only if already imported."""
    import jax
    import jaxlib
    import numpy as np

    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
        "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
    for name in ("diffusers", "transformers", "flax", "orbax.checkpoint"):
        if name in sys.modules:
            env[name] = getattr(sys.modules[name], "__version__", "?")
    return env


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(stem: str | Path, record: dict, markdown: str) -> tuple[Path, Path]:
    """Write `record` as JSON and `markdown` next to it: stem.json, stem.md."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path


def reference_helpers():
    """flux2ref.models: the tiny-random-model helpers the parity tests use (diffusers kwargs of a
    config, well-conditioned random init), shared so benchmarks run the same reference."""
    from flux2ref import models

    return models
