"""Helpers shared by the benchmarks: alternating timing, peak memory, FLOP counts, environment
record and JSON / Markdown reports.

Timing on a shared machine: other processes only ever add time, and they come and go. So the
sides of a comparison run in turn within one process, the order rotated each round, and the
figures are medians (minimum next to them) of each side's rounds.
"""

from __future__ import annotations

import ctypes
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


def alternate(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Run every callable once per round, `reps` rounds, rotating the order each round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timed(fns[n])[0])
    return times


def stats(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs_s": seconds}


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
    if "diffusers" in sys.modules:
        env["diffusers"] = sys.modules["diffusers"].__version__
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
