"""GPU command A: klein-9B forwards with interventions, parity with diffusers, a vmapped knockout sweep.

    python -m benchmarks.gpu_check --out DIR          # on one H100 / H200: klein-9B shapes, bfloat16
    python -m benchmarks.gpu_check --tiny --out DIR   # anywhere (CPU): the same steps on a tiny model

Shapes: the klein-9B transformer with random weights made on the device (nothing read from disk),
a 1024 x 1024 image and one 1024 x 1024 reference (4096 + 4096 image-stream tokens), 512 text
tokens, batch 1, bfloat16, attention by `numerics.default_implementation` (cuDNN on a GPU). Steps,
each written as a row of DIR/gpu_check.jsonl the moment it ends (a killed command leaves every
finished row; `benchmarks.common.RowLog`):

  setup       device, versions, shapes; the imports of both commands (a failure is written, not
              raised) and cuDNN's version
  weights     a random diffusers `Flux2Transformer2DModel` on the device, and fluxjax's weights
              converted from its state dict (one random state for both sides)
  compile     the plain forward and the knockout forward (ref->text cut in every block): compile
              time, XLA's memory plan (arguments = the weights, temporaries, outputs)
  parity      relative L2 of fluxjax against diffusers on the shared weights: the forward, the same
              forward with the knockout (diffusers through its attention mask), the 4-step edit
  released    diffusers' model deleted and torch's cache emptied (memory after)
  compile     the reference removal forwards: `cut_reference` (mask form) and `drop_reference`
              (removal form) from the middle block
  steady      the four forwards alternated, --reps rounds: median times (the plain forward's model
              TFLOP/s and MFU against the GPU's dense bf16 peak), and per intervention its
              time and its XLA temporary bytes against the plain forward's (not totals: those
              include the same 17 GiB of weights, which makes any ratio ~1.00 by construction)
  sweep       a vmapped knockout sweep (`experiments.sweep._sample_many`, ref->text from block k
              for --cells values of k, the last cutting nothing) through the cuDNN key-group path:
              compile, time, temporaries; the no-cut cell against the plain 4-step edit
  done        total seconds; DIR/gpu_check.md holds the tables

Memory: JAX's allocator grows on demand (no preallocation) up to XLA_PYTHON_CLIENT_MEM_FRACTION
0.6 of the device and never returns memory; torch holds its model only until `released`. Each
step runs only if its measured time at klein-9B is left of --budget-s (default 270 s, so the
command ends inside a 300 s limit); a skipped step is a row saying so.
"""

from __future__ import annotations

import os

# Before jax is imported: JAX must not take 75 % of the GPU up front (diffusers needs its 18 GB in
# this process), and stays below 60 % (48 GB of 80) whatever it caches.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fluxjax  # noqa: E402
from benchmarks import common, gpu_models  # noqa: E402
from fluxjax.schedule import flux2_sigmas  # noqa: E402

STEPS = 4  # the sampling steps of every GPU figure ([klein] distilled)
BUDGET_S = 270.0
# Seconds each step took at klein-9B on one H100 (benchmarks/results/gpu_check.log and estimates
# from its figures: weights 17 + 9 s, a forward's compile 3 s, the sampler's 10 s, a forward 0.27 s).
NEEDS_S = {"weights": 40, "compile": 15, "parity": 35, "steady": 15, "sweep": 60}
# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200 NVL": 835.0, "H200": 989.4}


@dataclasses.dataclass(frozen=True)
class Setup:
    shapes: gpu_models.Shapes
    dtype: str  # "bfloat16" / "float32"

    @property
    def config(self):
        return self.shapes.transformer

    @property
    def layout(self):
        return self.shapes.layout


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    name = device_name.upper()
    if "H200" in name:
        return ("H200 NVL", PEAK_BF16_TFLOPS["H200 NVL"]) if "NVL" in name else ("H200", PEAK_BF16_TFLOPS["H200"])
    if "H100" in name:
        for kind in ("NVL", "PCIE"):
            if kind in name:
                key = "H100 " + ("NVL" if kind == "NVL" else "PCIe")
                return key, PEAK_BF16_TFLOPS[key]
        return "H100 SXM", PEAK_BF16_TFLOPS["H100 SXM"]  # "NVIDIA H100 80GB HBM3"
    return None


def preflight() -> dict:
    """What both commands import, and cuDNN's version: a failure here is a row, not a crash, so that
    command A finds what would stop command B before B's turn on the machine."""
    found = {}
    for name in ("diffusers", "transformers", "flax", "orbax.checkpoint", "matplotlib", "experiments.knockout",
                 "experiments.context", "fluxjax.pipeline", "flux2ref.folder"):
        try:
            module = __import__(name, fromlist=["_"])
            found[name] = getattr(module, "__version__", "ok")
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            found[name] = f"FAILED: {type(e).__name__}: {e}"
    try:
        from jax._src.lib import cuda_versions

        found["cudnn"] = None if cuda_versions is None else cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001
        found["cudnn"] = f"FAILED: {type(e).__name__}: {e}"
    return found


def content_mask(layout):
    """An instruction inside the chat template: text positions [T/32, T/8) are its content."""
    content = np.zeros((1, layout.n_txt), bool)
    content[0, layout.n_txt // 32: layout.n_txt // 8] = True
    return content


def interventions(setup: Setup) -> dict:
    """The forwards compared: plain, a knockout, and the reference removal in both forms."""
    config, layout = setup.config, setup.layout
    content, middle = content_mask(layout), config.num_blocks // 2
    return {
        "plain": None,
        "knockout ref->text": fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content, "ref->text")),
        f"cut_reference from {middle}": fluxjax.Interventions(
            knockout=fluxjax.cut_reference(config, layout, content, middle)),
        f"drop_reference from {middle}": fluxjax.Interventions(
            drop_reference=fluxjax.drop_reference(layout, middle)),
    }


def torch_knockout_mask(layout, content, edge, device):
    """diffusers' boolean mask [1, 1, L, L] of the edge 'A->B' (queries in B may not read keys in A),
    written from the token masks alone, independently of fluxjax's tables."""
    import torch

    source, dest = edge.split("->")
    cut = layout.token_mask(dest, content)[:, :, None] & layout.token_mask(source, content)[:, None, :]
    return torch.as_tensor(~cut[:, None], device=device)


class Forwards:
    """The transformer forward of each intervention, compiled ahead of time on the shared inputs."""

    def __init__(self, params, setup: Setup, host):
        config, layout = setup.config, setup.layout
        dtype = jnp.dtype(setup.dtype)
        self.params, self.setup = params, setup
        self.model_in = jnp.concatenate([jnp.asarray(host["noise"], dtype), jnp.asarray(host["refs"], dtype)], axis=1)
        self.txt, self.t = jnp.asarray(host["txt"], dtype), jnp.full((1,), 0.5, dtype)
        img_ids, txt_ids = jnp.asarray(layout.img_ids()), jnp.asarray(layout.txt_ids())
        self.fwd = jax.jit(lambda p, x, c, t, iv: fluxjax.forward(p, config, x, c, t, img_ids, txt_ids,
                                                                  interventions=iv)[0])
        self.compiled, self.ivs = {}, {}

    def compile(self, name, iv) -> dict:
        t0 = time.perf_counter()
        compiled = self.fwd.lower(self.params, self.model_in, self.txt, self.t, iv).compile()
        self.compiled[name], self.ivs[name] = compiled, iv
        return {"compile_s": time.perf_counter() - t0, "xla": common.xla_memory(compiled)}

    def call(self, name):
        return jax.block_until_ready(self.compiled[name](self.params, self.model_in, self.txt, self.t, self.ivs[name]))


def diffusers_forward(model, setup: Setup, tx, device, mask=None):
    """One diffusers forward on the shared inputs (t = 0.5): [1, N_img, out] as float32 numpy."""
    import torch

    layout = setup.layout
    with torch.no_grad():
        out = model(hidden_states=torch.cat([tx["noise"], tx["refs"]], dim=1), encoder_hidden_states=tx["txt"],
                    timestep=torch.full((1,), 0.5, dtype=tx["txt"].dtype, device=device),
                    img_ids=torch.as_tensor(layout.img_ids(), device=device),
                    txt_ids=torch.as_tensor(layout.txt_ids(), device=device), guidance=None, return_dict=False,
                    joint_attention_kwargs=None if mask is None else {"attention_mask": mask})[0]
    return out[:, :layout.n_img].float().cpu().numpy()


def diffusers_edit(model, setup: Setup, tx, sigmas, device):
    """The 4-step Euler loop of `Flux2KleinPipeline` on the transformer alone (FlowMatchEuler's update
    in float32, cast back), from the shared noise: latents as float32 numpy."""
    import torch

    layout = setup.layout
    img_ids, txt_ids = (torch.as_tensor(a, device=device) for a in (layout.img_ids(), layout.txt_ids()))
    x = tx["noise"]
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.full((1,), float(sigmas[i]), dtype=x.dtype, device=device)
            v = model(hidden_states=torch.cat([x, tx["refs"]], dim=1), encoder_hidden_states=tx["txt"], timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0][:, :layout.n_img]
            x = (x.float() + float(sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
    return x.float().cpu().numpy()


def fluxjax_edit(params, setup: Setup, host, sigmas, interventions=None):
    config, layout = setup.config, setup.layout
    dtype = jnp.dtype(setup.dtype)
    options = fluxjax.SamplerOptions(num_steps=STEPS, guidance="none")
    latents, _ = fluxjax.sample(params, config, options, jnp.asarray(host["txt"], dtype), layout.txt_ids(),
                                layout.img_ids(), noise=jnp.asarray(host["noise"], dtype),
                                refs=jnp.asarray(host["refs"], dtype), sigmas=sigmas, interventions=interventions)
    return np.asarray(latents, np.float32)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def sweep_cells(setup: Setup, n: int) -> tuple[list[int], list]:
    """ref->text cut from block k on, for n values of k spread over 0..num_blocks (the last cuts nothing)."""
    nb = setup.config.num_blocks
    ks = sorted({int(round(x)) for x in np.linspace(0, nb, n)})
    content = content_mask(setup.layout)
    cells = [fluxjax.Interventions(knockout=fluxjax.knockout(setup.config, setup.layout, content, "ref->text",
                                                             blocks=range(k, nb), allow_empty=True)) for k in ks]
    return ks, cells


def sweep(params, setup: Setup, host, sigmas, n_cells: int, plain_edit, log):
    """The vmapped sampler over knockout tables, as the experiments run it (one compiled program)."""
    from experiments.sweep import _sample_many
    from fluxjax.interventions import stack

    dtype = jnp.dtype(setup.dtype)
    layout, config = setup.layout, setup.config
    ks, cells = sweep_cells(setup, n_cells)
    args = (params, jnp.asarray(host["txt"], dtype), jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids()),
            jnp.asarray(host["noise"], dtype), jnp.asarray(host["refs"], dtype), None, stack(cells),
            jnp.asarray(sigmas))
    kw = dict(config=config, options=fluxjax.SamplerOptions(num_steps=STEPS, guidance="none"), runtime=None)
    t0 = time.perf_counter()
    compiled = _sample_many.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    first_s, latents = common.timed(lambda: jax.block_until_ready(compiled(*args)))
    steady_s, _ = common.timed(lambda: jax.block_until_ready(compiled(*args)))
    latents = np.asarray(latents, np.float32)[:, 0]  # [V, N_img, P]
    row = {"cells": len(ks), "from_blocks": ks, "compile_s": compile_s, "first_s": first_s, "steady_s": steady_s,
           "per_cell_s": steady_s / len(ks), "xla": common.xla_memory(compiled),
           "cells_differ": rel_err(latents[0], latents[-1]), **common.device_memory()}
    if plain_edit is not None:  # the last cell cuts nothing: the plain edit through the key-group path
        row["no_cut_cell_vs_plain_edit"] = rel_err(latents[-1], plain_edit)
    return log.row("sweep", **row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny model on whatever device there is (CPU), float32")
    ap.add_argument("--out", default="benchmarks/results/gpu-a", help="folder of gpu_check.jsonl and gpu_check.md")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds of the four forwards")
    ap.add_argument("--cells", type=int, default=4, help="cells of the vmapped sweep")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="seconds the command may take; a step whose klein-9B time is not left is skipped")
    args = ap.parse_args(argv)
    out = Path(args.out)
    log = common.RowLog(out / "gpu_check.jsonl", "A")
    budget = common.Budget(args.budget_s, scale=0.0 if args.tiny else 1.0)
    setup = Setup(gpu_models.TINY, "float32") if args.tiny else Setup(gpu_models.KLEIN_9B, "bfloat16")
    config, layout = setup.config, setup.layout

    import torch

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.tiny:
        raise SystemExit("no GPU: the klein-9B run needs one; use --tiny on a CPU machine")
    device = "cuda" if on_gpu else "cpu"
    dtype, tdtype = jnp.dtype(setup.dtype), getattr(torch, setup.dtype)
    device_name = jax.devices()[0].device_kind
    log.row("setup", device=device_name, jax=jax.__version__, torch=torch.__version__, shapes=setup.shapes.name,
            dtype=setup.dtype, tokens=[layout.n_txt, layout.n_img, layout.n_ref], blocks=config.num_blocks,
            attention=fluxjax.numerics.default_implementation(dtype), peak_tflops=peak_tflops(device_name),
            flops_per_forward=common.forward_flops(config, layout.n_txt, layout.n_image_stream),
            budget_s=args.budget_s, imports=preflight(), environment=common.environment())

    rng = np.random.default_rng(0)
    host = {"txt": rng.standard_normal((1, layout.n_txt, config.context_in_dim), np.float32),
            "noise": rng.standard_normal((1, layout.n_img, config.in_channels), np.float32),
            "refs": rng.standard_normal((1, layout.n_ref, config.in_channels), np.float32)}
    sigmas = flux2_sigmas(layout.n_img, STEPS)

    def skipped(step):
        log.row(step, skipped=f"{budget.left():.0f} s left of --budget-s {args.budget_s:g}, {NEEDS_S[step]} s needed")

    if not budget.allows(NEEDS_S["weights"]):
        skipped("weights")
        return finish(log, out)
    t0 = time.perf_counter()
    model = gpu_models.diffusers_model(config, tdtype, device)
    log.row("weights", side="diffusers", seconds=time.perf_counter() - t0,
            bytes=sum(p.numel() * p.element_size() for p in model.parameters()), **common.device_memory())
    t0 = time.perf_counter()
    params = jax.block_until_ready(gpu_models.shared_params(model, config, dtype))
    log.row("weights", side="fluxjax (converted from diffusers' state dict)", seconds=time.perf_counter() - t0,
            bytes=gpu_models.param_bytes(params), **common.device_memory())

    forwards = Forwards(params, setup, host)
    ivs = interventions(setup)
    for name in list(ivs)[:2]:
        if not budget.allows(NEEDS_S["compile"]):
            skipped("compile")
            return finish(log, out)
        log.row("compile", forward=name, **forwards.compile(name, ivs[name]))

    plain_edit = None
    if budget.allows(NEEDS_S["parity"]):
        plain_edit = parity(model, forwards, setup, host, sigmas, device, log)
    else:
        skipped("parity")
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    log.row("released", what="the diffusers model", **common.device_memory())

    for name in list(ivs)[2:]:
        if not budget.allows(NEEDS_S["compile"]):
            skipped("compile")
            return finish(log, out)
        log.row("compile", forward=name, **forwards.compile(name, ivs[name]))
    if budget.allows(NEEDS_S["steady"]):
        steady(forwards, args.reps, log, flops=common.forward_flops(config, layout.n_txt, layout.n_image_stream),
               peak=peak_tflops(device_name))
    else:
        skipped("steady")
    if budget.allows(NEEDS_S["sweep"]):
        sweep(params, setup, host, sigmas, args.cells, plain_edit, log)
    else:
        skipped("sweep")
    return finish(log, out)


def parity(model, forwards: Forwards, setup: Setup, host, sigmas, device, log):
    """fluxjax vs diffusers on one random state; returns fluxjax's plain 4-step edit (latents)."""
    import torch

    tdtype = getattr(torch, setup.dtype)
    tx = {k: torch.as_tensor(v).to(device=device, dtype=tdtype) for k, v in host.items()}
    layout = setup.layout
    knock = next(n for n in forwards.compiled if n != "plain")
    mask = torch_knockout_mask(layout, content_mask(layout), knock.split(" ", 1)[1], device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name, theirs in (("plain", lambda: diffusers_forward(model, setup, tx, device)),
                         (knock, lambda: diffusers_forward(model, setup, tx, device, mask))):
        ours_s, ours = common.timed(lambda: np.asarray(forwards.call(name), np.float32)[:, :layout.n_img])
        theirs_s, ref = common.timed(theirs)
        log.row("parity", forward=name, rel_l2=rel_err(ours, ref), fluxjax_first_s=ours_s, diffusers_first_s=theirs_s,
                **common.device_memory())
    ours_s, edit = common.timed(lambda: fluxjax_edit(forwards.params, setup, host, sigmas))
    theirs_s, ref = common.timed(lambda: diffusers_edit(model, setup, tx, sigmas, device))
    log.row("parity", forward=f"{STEPS}-step edit (latents)", rel_l2=rel_err(edit, ref),
            fluxjax_first_s_with_compile=ours_s, diffusers_s=theirs_s, **common.device_memory())
    return edit


def steady(forwards: Forwards, reps: int, log, flops: float, peak):
    """The compiled forwards alternated; each intervention's time and temporaries against plain's;
    the plain forward's model TFLOP/s and MFU (FLOPs counted from the architecture, peak = the GPU
    kind's dense bf16 tensor-core TFLOP/s)."""
    fns = {name: (lambda n=name: forwards.call(n)) for name in forwards.compiled}
    for fn in fns.values():  # one warm call each
        fn()
    times = common.alternate(fns, reps)
    plain_s = statistics.median(times["plain"])
    plain_xla = common.xla_memory(forwards.compiled["plain"])
    rows = {}
    for name, ts in times.items():
        xla = common.xla_memory(forwards.compiled[name])
        rows[name] = {"median_s": statistics.median(ts), "min_s": min(ts),
                      "time_vs_plain": statistics.median(ts) / plain_s,
                      "temp_bytes": xla.get("temp"),
                      "temp_vs_plain": xla["temp"] / plain_xla["temp"] if xla.get("temp") and plain_xla.get("temp")
                      else None}
    tflops = flops / plain_s / 1e12
    return log.row("steady", reps=reps, forwards=rows, plain_model_tflops=tflops,
                   plain_mfu=None if peak is None else tflops / peak[1], **common.device_memory())


def finish(log: common.RowLog, out: Path):
    log.row("done", seconds=log.elapsed())
    (out / "gpu_check.md").write_text(summary(log.rows) + "\n")
    print()
    print(summary(log.rows))
    return log.rows


def summary(rows: list[dict]) -> str:
    """Markdown tables of the rows a run wrote (any prefix of them: a killed run's file too)."""
    gib = 2 ** 30
    parts = []
    setup = next((r for r in rows if r["step"] == "setup"), None)
    if setup:
        parts.append(f"{setup['device']}; jax {setup['jax']}, torch {setup['torch']}; {setup['shapes']} shapes, "
                     f"{setup['dtype']}, tokens {setup['tokens']}, attention {setup['attention']}")
    compiled = [r for r in rows if r["step"] == "compile" and "forward" in r]
    if compiled:
        parts.append(common.markdown_table(
            ["forward", "compile (s)", "XLA arguments (GiB)", "XLA temporaries (GiB)"],
            [[r["forward"], f"{r['compile_s']:.1f}", f"{r['xla'].get('argument', 0) / gib:.2f}",
              f"{r['xla'].get('temp', 0) / gib:.3f}"] for r in compiled]))
    parity = [r for r in rows if r["step"] == "parity" and "rel_l2" in r]
    if parity:
        parts.append(common.markdown_table(["fluxjax vs diffusers, shared weights", "relative L2"],
                                           [[r["forward"], f"{r['rel_l2']:.2e}"] for r in parity]))
    steady_row = next((r for r in rows if r["step"] == "steady" and "forwards" in r), None)
    if steady_row:
        parts.append(common.markdown_table(
            ["forward", "median (s)", "time vs plain", "XLA temporaries vs plain"],
            [[n, f"{f['median_s']:.4f}", f"{f['time_vs_plain']:.3f}",
              "-" if f["temp_vs_plain"] is None else f"{f['temp_vs_plain']:.3f}"]
             for n, f in steady_row["forwards"].items()]))
    sw = next((r for r in rows if r["step"] == "sweep" and "cells" in r), None)
    if sw:
        parts.append(f"vmapped knockout sweep: {sw['cells']} cells (ref->text from blocks {sw['from_blocks']}), "
                     f"compile {sw['compile_s']:.1f} s, {sw['steady_s']:.2f} s per call ({sw['per_cell_s']:.2f} s per "
                     f"cell), XLA temporaries {sw['xla'].get('temp', 0) / gib:.2f} GiB; no-cut cell vs plain edit "
                     f"{sw.get('no_cut_cell_vs_plain_edit', float('nan')):.2e}")
    skipped = [f"{r['step']} ({r['skipped']})" for r in rows if "skipped" in r]
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    done = next((r for r in rows if r["step"] == "done"), None)
    parts.append(f"total {done['seconds']:.1f} s" if done else "(no `done` row: the command did not finish)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
