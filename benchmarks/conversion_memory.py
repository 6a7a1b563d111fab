"""Peak memory of `python -m conversion` on a random checkpoint of a given size.

    python -m benchmarks.conversion_memory            # ~2 GB bf16 BFL file
    python -m benchmarks.conversion_memory --gb 2 --dtype fp32 --out-dtype bf16

Writes a random Black Forest Labs-format safetensors file (head dim 128, width chosen to reach the
size) into a temporary directory, converts it in a child process under `/usr/bin/time -v`, and
reports the child's maximum resident set size against the file size; the same for a child that
only imports the converter, the fixed cost in that figure. Everything it writes is deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

from fluxjax.conversion.safetensors_io import write_safetensors
from fluxjax.conversion.transformer_keys import expected_source_shapes
from fluxjax.config import FLUX2_KLEIN_4B
from fluxjax.params import count_params, param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32)}


def config_of_size(nbytes: float, itemsize: int):
    """klein-4B's layout (head dim 128, 5 double + 20 single blocks) at the width closest to `nbytes`."""
    best = None
    for heads in range(1, 49):
        config = dataclasses.replace(FLUX2_KLEIN_4B, hidden_size=128 * heads, num_heads=heads,
                                     context_in_dim=256 * heads)
        size = count_params(param_shapes(config)) * itemsize
        if best is None or abs(size - nbytes) < abs(best[1] - nbytes):
            best = (config, size)
    return best[0]


def write_random_bfl(path: str, config, dtype: np.dtype, seed: int = 0) -> int:
    """A random BFL-format file, generated and written one tensor at a time; returns its size."""
    shapes = expected_source_shapes(config, "bfl")
    rng = np.random.default_rng(seed)

    def tensors():
        for key, shape in shapes.items():
            yield key, (rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))).astype(dtype)

    write_safetensors(path, tensors(), shapes={k: (s, dtype) for k, s in shapes.items()})
    return os.path.getsize(path)


def max_rss(args: list[str]) -> tuple[int, float]:
    """(maximum resident set size in bytes, wall seconds) of a child process, from `/usr/bin/time -v`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))
    return rss, seconds


def measure(gb: float = 2.0, dtype: str = "bf16", out_dtype: str | None = None) -> dict:
    itemsize = DTYPES[dtype].itemsize
    config = config_of_size(gb * 1e9, itemsize)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        src, dst = os.path.join(tmp, "flux2-random.safetensors"), os.path.join(tmp, "native")
        size = write_random_bfl(src, config, DTYPES[dtype])
        extra = [] if out_dtype is None else ["--dtype", out_dtype]
        peak, seconds = max_rss(["-m", "conversion", src, dst, "--quiet", *extra])
        baseline, _ = max_rss(["-c", "import fluxjax.conversion.convert, conversion.__main__"])
    return dict(config=config, file_bytes=size, peak_rss=peak, baseline_rss=baseline, ratio=peak / size,
                seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="target file size in GB (default 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the file (default bf16)")
    parser.add_argument("--out-dtype", choices=sorted(DTYPES), help="convert to this dtype (default: keep)")
    args = parser.parse_args()
    r = measure(args.gb, args.dtype, args.out_dtype)
    c = r["config"]
    print(f"file: {r['file_bytes'] / 1e9:.2f} GB {args.dtype} (D={c.hidden_size}, {c.depth} double + "
          f"{c.depth_single_blocks} single blocks), converted to {args.out_dtype or args.dtype}")
    print(f"peak RSS of `python -m conversion`: {r['peak_rss'] / 1e9:.2f} GB = {r['ratio']:.2f}x the file "
          f"(of which {r['baseline_rss'] / 1e9:.2f} GB is the interpreter with jax and orbax imported); "
          f"{r['seconds']:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
