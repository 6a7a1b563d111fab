"""The plain forward's CPU time at two commits of the library, in one process, alternating.

    python -m benchmarks.forward_ab [BASE] [--case deep] [--rounds 15] [--calls 4] [--allow-busy]
                                    [--wait-quiet 60] [--out benchmarks/results/forward_ab]

BASE (default HEAD~1, the previous commit) is read with `git archive` into a temporary folder, and
its `fluxjax` is imported next to the checkout's own: each version's modules are installed in
`sys.modules` while its program is traced and compiled (ahead of time), so neither reads the
other's code; the compiled programs then run without Python. Both get the same random weights (each
version's own `init_params` from one key) and inputs, and their outputs are compared.

The programs are the plain forward (no interventions, no captures), jitted with default runtime
options. They are timed in turn, `rounds` rounds of `calls` calls each, the order rotated every
round; per side the median and minimum over rounds of this process's CPU time per call
(`time.process_time`: every XLA thread counts) and of the wall time, then the ratio checkout /
base of the median CPU times and the spread of the per-round ratios.

Cases (fp32, batch 1, timestep 0.5):
  deep  klein-9B depth (8 double + 24 single blocks) at D 256 (2 heads of 128), 512 text +
        16x16 image + 16x16 reference tokens (as `benchmarks.forward`)
  mid   D 1024, 8 heads, 2 double + 4 single blocks, 512 text + 32x32 image + 32x32 reference tokens
  tiny  the tests' tiny model (seconds; to check the command, not a measurement)
Only from a quiet machine (`benchmarks.common.LoadGuard`); --allow-busy writes the figures flagged
as not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]


def _library_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "fluxjax" or k.startswith("fluxjax.")}


@contextlib.contextmanager
def installed(modules: dict):
    """`modules` (a version's fluxjax modules) as sys.modules' fluxjax while the block runs."""
    saved = _library_modules()
    for k in saved:
        del sys.modules[k]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k in _library_modules():
            del sys.modules[k]
        sys.modules.update(saved)


def import_version(root: Path) -> dict:
    """Import the `fluxjax` under `root` apart from any other: its modules, by name."""
    saved = _library_modules()
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        library = importlib.import_module("fluxjax")
        for name in ("forward", "init_params", "TokenLayout", "Flux2Config"):
            getattr(library, name)  # the lazy exports pull in every module the forward needs
        return _library_modules()
    finally:
        sys.path.remove(str(root))
        for k in _library_modules():
            del sys.modules[k]
        sys.modules.update(saved)


def archive(commit: str, into: Path) -> Path:
    """The `fluxjax` folder of `commit`, unpacked under `into`."""
    data = subprocess.run(["git", "archive", commit, "fluxjax"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def case_shapes(name: str):
    import fluxjax

    k9 = fluxjax.FLUX2_KLEIN_9B
    if name == "deep":
        return dataclasses.replace(k9, hidden_size=256, num_heads=2, context_in_dim=768), 512, (16, 16)
    if name == "mid":
        return dataclasses.replace(k9, hidden_size=1024, num_heads=8, context_in_dim=3072, depth=2,
                                   depth_single_blocks=4), 512, (32, 32)
    if name == "tiny":
        return dataclasses.replace(fluxjax.FLUX2_DEV, in_channels=16, context_in_dim=24, hidden_size=64, num_heads=2,
                                   depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8)), 8, (3, 4)
    raise ValueError(f"unknown case {name!r}; use deep, mid or tiny")


def build(modules: dict, case: str):
    """(compiled plain forward, its arguments, compile seconds) of one version."""
    import jax
    import jax.numpy as jnp

    with installed(modules):
        library = sys.modules["fluxjax"]
        config, n_txt, grid = case_shapes(case)
        config = library.Flux2Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        layout = library.TokenLayout(n_txt, grid, (grid,))
        rng = np.random.default_rng(0)
        img = jnp.asarray(rng.standard_normal((1, layout.n_image_stream, config.in_channels)), jnp.float32)
        txt = jnp.asarray(rng.standard_normal((1, n_txt, config.context_in_dim)), jnp.float32)
        args = (library.init_params(config, jax.random.key(0)), img, txt, jnp.full((1,), 0.5, jnp.float32),
                jnp.asarray(layout.img_ids()), jnp.asarray(layout.txt_ids()))

        def plain(params, img, txt, t, img_ids, txt_ids):
            return library.forward(params, config, img, txt, t, img_ids, txt_ids)[0]

        t0 = time.perf_counter()
        compiled = jax.jit(plain).lower(*args).compile()
        return compiled, args, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", nargs="?", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    parser.add_argument("--case", default="deep", choices=["deep", "mid", "tiny"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=4, help="calls per side and round")
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for a quiet machine first")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "forward_ab"))
    args = parser.parse_args(argv)
    base_commit = subprocess.run(["git", "rev-parse", args.base], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.strip()
    head_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "fluxjax"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())
    guard = common.LoadGuard()
    guard.wait_quiet(args.wait_quiet)
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base": import_version(archive(base_commit, Path(tmp))), "checkout": import_version(REPO)}
        built = {name: build(modules, args.case) for name, modules in versions.items()}
    outs = {name: np.asarray(c(*a)) for name, (c, a, _) in built.items()}
    agreement = float(np.abs(outs["base"] - outs["checkout"]).max())

    def side(name):
        compiled, call_args, _ = built[name]

        def run():
            for _ in range(args.calls):
                compiled(*call_args).block_until_ready()
        return run

    common.alternate({"base": side("base"), "checkout": side("checkout")}, 2)  # warm both
    guard.sides.clear()
    common.alternate({"base": side("base"), "checkout": side("checkout")}, args.rounds, guard)
    verdict = guard.enforce(args.allow_busy)
    per_call = {name: {k: [x / args.calls for x in guard.sides[name][k]] for k in ("own_cpu_s", "wall_s")}
                for name in ("base", "checkout")}
    ratios = [c / b for b, c in zip(per_call["base"]["own_cpu_s"], per_call["checkout"]["own_cpu_s"])]
    summary = {name: {"cpu_median_s": statistics.median(v["own_cpu_s"]), "cpu_min_s": min(v["own_cpu_s"]),
                      "wall_median_s": statistics.median(v["wall_s"]), "wall_min_s": min(v["wall_s"]),
                      "compile_s": built[name][2]} for name, v in per_call.items()}
    ratio = summary["checkout"]["cpu_median_s"] / summary["base"]["cpu_median_s"]
    record = {"case": args.case, "base": base_commit, "checkout": head_commit, "checkout_dirty": dirty,
              "rounds": args.rounds, "calls_per_round": args.calls, "max_abs_output_difference": agreement,
              "cpu_ratio_checkout_over_base": ratio, "per_round_cpu_ratios": ratios, "sides": summary,
              "per_call": per_call, "load": verdict, "environment": common.environment()}
    rows = [[name, f"{s['cpu_median_s'] * 1e3:.1f}", f"{s['cpu_min_s'] * 1e3:.1f}", f"{s['wall_median_s'] * 1e3:.1f}",
             f"{s['compile_s']:.1f}"] for name, s in summary.items()]
    lines = [common.busy_banner(verdict),
             f"Plain forward, case {args.case}: checkout {head_commit[:7]}{' (with uncommitted changes)' if dirty else ''}"
             f" against {base_commit[:7]}, {args.rounds} rounds x {args.calls} calls, alternating.", "",
             common.markdown_table(["side", "CPU ms/call (median)", "CPU ms/call (min)", "wall ms/call (median)",
                                    "compile s"], rows), "",
             f"CPU time ratio checkout / base: {ratio:.3f} (per-round ratios {min(ratios):.3f} .. {max(ratios):.3f}, "
             f"median {statistics.median(ratios):.3f}); outputs differ by at most {agreement:.2e}."]
    markdown = "\n".join(line for line in lines if line is not None)
    print(markdown)
    if args.case != "tiny":
        common.write_report(args.out, record, markdown)
    return record


if __name__ == "__main__":
    main()
