"""klein-9B on one GPU: fluxjax against diffusers, 4 sampling steps, in one process.

    python -m benchmarks.gpu_check              # on an H100 / H200: the real klein-9B shapes
    python -m benchmarks.gpu_check --check      # anywhere: every shape of the real run, no weights
    python -m benchmarks.gpu_check --tiny       # anywhere (CPU): the whole script on a tiny model

The real run: FLUX2_KLEIN_9B with random bfloat16 weights created on the device (nothing large
crosses from the host), a 1024x1024 image with one 1024x1024 reference (4096 + 4096 image-stream
tokens) and 512 text tokens, batch 1, 4 Euler steps on the FLUX.2 schedule. fluxjax runs
`fluxjax.sample` (the 4 steps compiled as one program, cuDNN attention); diffusers runs
`Flux2Transformer2DModel` (bf16, its default SDPA attention) in the same Euler loop. Both are
timed in turns, after a warm-up, and the script prints:

  time per step      one transformer forward (timed on its own), and end-to-end / steps
  end-to-end         the 4-step loop, noise to latents
  MFU                model FLOPs / (time x peak): FLOPs counted from the architecture and the token
                     counts (`benchmarks.common.forward_flops`), peak = the GPU kind's dense bf16
                     tensor-core TFLOP/s (table below; --peak-tflops overrides)

Both sides hold one random state: diffusers' model is randomised on the device and its state dict
converted to fluxjax (`fluxjax.conversion.transformer`), so every figure comes with its parity
figure. Sections (--sections, in this order; each prints when it ends, so a device session can run
them one per call):

  timing         the table above
  interventions  a knockout forward (ref->text in every block, group-structured attention) vs the
                 plain forward: steady time (goal <= 1.10x) and XLA peak memory (goal <= +5 %)
  parity         relative L2 of fluxjax vs diffusers on the shared weights: a forward, the same
                 forward with a knockout (diffusers through its attention mask) and the 4-step edit
  rehearsal      a random klein-9B-sized model folder in the diffusers layout built on the device
                 (transformer, FLUX.2 VAE, a text encoder of Qwen3-8B's shapes, tokenizer), then
                 `experiments.run_all --blocks 7,17` on the colour task red ball and its patching partner green
                 ball (patching needs a pair) at 1024 x 1024: per
                 experiment wall, compile and device peak memory; and one diffusers
                 `Flux2KleinPipeline` call per cell with the knockout mask in attention processors,
                 times the rehearsal's number of cells (the study's way)

--tiny runs every section end to end on CPU with tiny shapes (float32): a check, not a figure.
"""

from __future__ import annotations

import os

# JAX must not take 75 % of the GPU up front: diffusers needs its 18 GB in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fluxjax  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.gpu_models import build_real_folder, diffusers_model, fluxjax_params, meta_model, shared_params  # noqa: E402
from benchmarks.gpu_rehearsal import STEPS, rehearsal  # noqa: E402
from fluxjax.schedule import flux2_sigmas  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200 NVL": 835.0, "H200": 989.4}


@dataclasses.dataclass(frozen=True)
class Setup:
    config: fluxjax.Flux2Config
    layout: fluxjax.TokenLayout
    dtype: str  # "bfloat16" / "float32"
    attn_impl: str | None  # fluxjax attention implementation


def real_setup() -> Setup:
    # 1024x1024 px -> 128x128 latent (VAE /8) -> 64x64 tokens (2x2 patches); the same for the reference.
    # attention: the default of fluxjax.numerics.default_implementation (cuDNN for bfloat16 on a GPU)
    return Setup(fluxjax.FLUX2_KLEIN_9B, fluxjax.TokenLayout(512, (64, 64), ((64, 64),)), "bfloat16", None)


def tiny_setup() -> Setup:
    config = dataclasses.replace(fluxjax.FLUX2_KLEIN_9B, in_channels=16, context_in_dim=24, hidden_size=64,
                                 num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(8, 8, 8, 8))
    return Setup(config, fluxjax.TokenLayout(16, (4, 4), ((4, 4),)), "bfloat16", None)


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


def fluxjax_calls(params, setup: Setup, txt, noise, refs, sigmas):
    config, layout = setup.config, setup.layout
    txt_ids, img_ids = jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids())
    options = fluxjax.SamplerOptions(num_steps=STEPS, guidance="none")
    model_in = jnp.concatenate([noise, refs], axis=1)
    t = jnp.full((1,), 0.5, noise.dtype)
    fwd = jax.jit(lambda p, x, c, t: fluxjax.forward(p, config, x, c, t, img_ids, txt_ids,
                                                     attn_impl=setup.attn_impl)[0])

    def sample():
        return jax.block_until_ready(fluxjax.sample(params, config, options, txt, txt_ids, img_ids, noise=noise,
                                                    refs=refs, sigmas=sigmas, attn_impl=setup.attn_impl)[0])

    def forward():
        return jax.block_until_ready(fwd(params, model_in, txt, t))

    return sample, forward


def diffusers_calls(model, setup: Setup, txt, noise, refs, sigmas, device):
    import torch

    layout = setup.layout
    img_ids = torch.as_tensor(layout.img_ids(), device=device)
    txt_ids = torch.as_tensor(layout.txt_ids(), device=device)
    n_img = layout.n_img

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    def predict(x, sigma):
        t = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=device)
        out = model(hidden_states=torch.cat([x, refs], dim=1), encoder_hidden_states=txt, timestep=t,
                    img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return out[:, :n_img]

    @torch.no_grad()
    def sample():  # FlowMatchEulerDiscreteScheduler.step: the update in float32, cast back
        x = noise
        for i in range(STEPS):
            v = predict(x, sigmas[i])
            x = (x.float() + float(sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)
        return sync(x)

    @torch.no_grad()
    def forward():
        return sync(predict(noise, 0.5))

    return sample, forward


def content_mask(layout):
    content = np.zeros((1, layout.n_txt), bool)
    content[0, layout.n_txt // 32: layout.n_txt // 8] = True  # an instruction inside the chat template
    return content


def torch_knockout_mask(layout, content, edge, device):
    """diffusers' boolean mask [1, 1, L, L] of the edge 'A->B' (queries in B may not read keys in A),
    written from the token masks alone, independently of fluxjax's tables."""
    import torch

    source, dest = edge.split("->")
    cut = layout.token_mask(dest, content)[:, :, None] & layout.token_mask(source, content)[:, None, :]
    return torch.as_tensor(~cut[:, None], device=device)


def memory_of(compiled) -> dict:
    """XLA's buffer assignment of a compiled program: arguments, outputs, temporaries, and their sum."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def intervention_rows(params, setup: Setup, host, reps: int, say) -> dict:
    """A knockout (ref->text in every block) forward against the plain forward: compile, steady
    time (alternating), XLA memory of each program. Goals (issue 17): <= 1.10x time, <= +5 % memory."""
    config, layout = setup.config, setup.layout
    dtype = jnp.dtype(setup.dtype)
    txt_ids, img_ids = jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids())
    model_in = jnp.concatenate([jnp.asarray(host["noise"], dtype), jnp.asarray(host["refs"], dtype)], axis=1)
    txt, t = jnp.asarray(host["txt"], dtype), jnp.full((1,), 0.5, dtype)
    knock = fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content_mask(layout), "ref->text"))

    def fwd(p, x, c, t, iv):
        return fluxjax.forward(p, config, x, c, t, img_ids, txt_ids, interventions=iv, attn_impl=setup.attn_impl)[0]

    rows, fns = {}, {}
    for name, iv in (("plain", None), ("knockout ref->text", knock)):
        t0 = time.perf_counter()
        compiled = jax.jit(fwd).lower(params, model_in, txt, t, iv).compile()
        rows[name] = {"compile_s": time.perf_counter() - t0, "xla_memory": memory_of(compiled)}
        fns[name] = functools.partial(lambda c, iv: jax.block_until_ready(c(params, model_in, txt, t, iv)), compiled, iv)
        rows[name]["first_run_s"] = common.timed(fns[name])[0]
        say(f"interventions: {name} compiled in {rows[name]['compile_s']:.1f} s, "
            f"XLA peak {rows[name]['xla_memory'].get('peak_bytes', 0) / 2**30:.2f} GiB")
    times = common.alternate(fns, reps)
    for name in rows:
        rows[name]["steady_s"] = statistics.median(times[name])
    ko, plain = rows["knockout ref->text"], rows["plain"]
    out = {"rows": rows, "time_ratio": ko["steady_s"] / plain["steady_s"], "time_goal": "<= 1.10x"}
    if plain["xla_memory"]:
        out["memory_ratio"] = ko["xla_memory"]["peak_bytes"] / plain["xla_memory"]["peak_bytes"]
        out["memory_goal"] = "<= 1.05x"
    say(f"interventions: knockout / plain time {out['time_ratio']:.3f}, memory {out.get('memory_ratio', float('nan')):.3f}")
    return out


def parity(model, params, setup: Setup, host, sigmas, device, say) -> dict:
    """fluxjax vs diffusers on one shared random state: a forward, a forward with a knockout
    (ref->text, every block; diffusers through its attention mask), and the 4-step edit. Relative L2."""
    import torch

    from flux2ref.models import rel_err

    config, layout = setup.config, setup.layout
    dtype, tdtype = jnp.dtype(setup.dtype), getattr(torch, setup.dtype)
    content = content_mask(layout)
    jx = {k: jnp.asarray(v, dtype) for k, v in host.items()}
    tx = {k: torch.as_tensor(v).to(device=device, dtype=tdtype) for k, v in host.items()}
    txt_ids, img_ids = jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids())
    t_img, t_txt = (torch.as_tensor(a, device=device) for a in (layout.img_ids(), layout.txt_ids()))
    model_in = jnp.concatenate([jx["noise"], jx["refs"]], axis=1)
    t = 0.5

    def ours(iv):
        return np.asarray(jax.jit(lambda p: fluxjax.forward(
            p, config, model_in, jx["txt"], jnp.full((1,), t, dtype), img_ids, txt_ids, interventions=iv,
            attn_impl=setup.attn_impl)[0])(params), np.float32)

    @torch.no_grad()
    def theirs(**kwargs):
        out = model(hidden_states=torch.cat([tx["noise"], tx["refs"]], dim=1), encoder_hidden_states=tx["txt"],
                    timestep=torch.full((1,), t, dtype=tdtype, device=device), img_ids=t_img, txt_ids=t_txt,
                    guidance=None, return_dict=False, **kwargs)[0]
        return out.float().cpu().numpy()

    knock = fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content, "ref->text"))
    mask = torch_knockout_mask(layout, content, "ref->text", device)
    out = {"forward": rel_err(ours(None), theirs()),
           "knockout ref->text": rel_err(ours(knock), theirs(joint_attention_kwargs={"attention_mask": mask}))}
    fj_sample, _ = fluxjax_calls(params, setup, jx["txt"], jx["noise"], jx["refs"], sigmas)
    df_sample, _ = diffusers_calls(model, setup, tx["txt"], tx["noise"], tx["refs"], sigmas, device)
    out[f"{STEPS}-step edit (latents)"] = rel_err(np.asarray(fj_sample(), np.float32), df_sample().float().cpu().numpy())
    say("parity (relative L2, shared weights): " + ", ".join(f"{k} {v:.2e}" for k, v in out.items()))
    return out


# --- the run -------------------------------------------------------------------------------------


def check_shapes(setup: Setup) -> dict:
    """Every array of the real run as shapes: fluxjax's sampler under eval_shape, diffusers' model
    and loop on the meta device. Needs no accelerator and no memory."""
    import torch

    config, layout = setup.config, setup.layout
    dtype = jnp.dtype(setup.dtype)
    sds = jax.ShapeDtypeStruct
    params = jax.eval_shape(lambda: fluxjax_params(config, dtype))
    txt = sds((1, layout.n_txt, config.context_in_dim), dtype)
    noise = sds((1, layout.n_img, config.in_channels), dtype)
    refs = sds((1, layout.n_ref, config.in_channels), dtype)
    options = fluxjax.SamplerOptions(num_steps=STEPS, guidance="none")
    sigmas = flux2_sigmas(layout.n_img, STEPS)
    out = jax.eval_shape(lambda p, c, n, r: fluxjax.sample(p, config, options, c, layout.txt_ids(), layout.img_ids(),
                                                           noise=n, refs=r, sigmas=sigmas)[0], params, txt, noise, refs)
    assert out.shape == noise.shape and out.dtype == dtype, out
    nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))

    tdtype = getattr(torch, setup.dtype)
    model = meta_model(config, tdtype)
    targs = [torch.empty(a.shape, dtype=tdtype, device="meta") for a in (txt, noise, refs)]
    sample, _ = diffusers_calls(model, setup, *targs, sigmas, "meta")
    tout = sample()
    assert tuple(tout.shape) == noise.shape and tout.device.type == "meta", tout
    tbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"fluxjax_latents": list(out.shape), "diffusers_latents": list(tout.shape),
            "fluxjax_param_bytes": nbytes, "diffusers_param_bytes": tbytes}


SECTIONS = ("timing", "interventions", "parity", "rehearsal")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="a tiny model on whatever device there is (CPU)")
    mode.add_argument("--check", action="store_true", help="shapes of the real run only (no weights, any machine)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="weights and activations (default bfloat16; --tiny float32, so its agreement check is tight)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, in this order: {', '.join(SECTIONS)} (default all)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per side")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 dense peak")
    ap.add_argument("--deadline-s", type=float, default=420, help="stop timing rounds after this many seconds")
    ap.add_argument("--skip-diffusers", action="store_true", help="no diffusers side: random fluxjax weights")
    ap.add_argument("--work", default=None, help="folder for the rehearsal's model folder and run (default: a temp dir)")
    ap.add_argument("--rehearsal-blocks", default=None,
                    help="--blocks of the rehearsal's run_all (default 7,17; --tiny 1,3)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    if not set(sections) <= set(SECTIONS):
        ap.error(f"--sections {args.sections}: choose among {', '.join(SECTIONS)}")

    def say(msg):
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    setup = tiny_setup() if args.tiny else real_setup()
    setup = dataclasses.replace(setup, dtype=args.dtype or ("float32" if args.tiny else setup.dtype))
    config, layout = setup.config, setup.layout
    if args.check:
        say(f"shapes of the real run: {json.dumps(check_shapes(setup))}")
        return
    import torch

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.tiny:
        raise SystemExit("no GPU: the real klein-9B run needs one; use --tiny or --check on a CPU machine")
    device = "cuda" if on_gpu else "cpu"
    dtype, tdtype = jnp.dtype(setup.dtype), getattr(torch, setup.dtype)
    device_name = jax.devices()[0].device_kind
    peak = (None, args.peak_tflops) if args.peak_tflops else peak_tflops(device_name)
    flops = common.forward_flops(config, layout.n_txt, layout.n_image_stream)
    say(f"{device_name}; jax {jax.__version__}, torch {torch.__version__}; D {config.hidden_size}, "
        f"{config.depth}+{config.depth_single_blocks} blocks, tokens {layout.n_txt} text + {layout.n_img} image + "
        f"{layout.n_ref} reference, {setup.dtype}, {STEPS} steps; {flops / 1e12:.1f} TFLOP per forward; "
        f"peak assumed: {peak}; attention {setup.attn_impl or 'default'}; sections {', '.join(sections)}")

    rng = np.random.default_rng(0)
    host = {"txt": rng.standard_normal((1, layout.n_txt, config.context_in_dim), np.float32),
            "noise": rng.standard_normal((1, layout.n_img, config.in_channels), np.float32),
            "refs": rng.standard_normal((1, layout.n_ref, config.in_channels), np.float32)}
    sigmas = flux2_sigmas(layout.n_img, STEPS)
    record = {"device": device_name, "tiny": args.tiny, "sections": sections,
              "setup": {"config": dataclasses.asdict(config), "dtype": setup.dtype,
                        "tokens": [layout.n_txt, layout.n_img, layout.n_ref], "steps": STEPS,
                        "attn_impl": setup.attn_impl},
              "flops_per_forward": flops, "peak": peak, "environment": common.environment()}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1, default=str)

    model = params = None
    if {"timing", "interventions", "parity"} & set(sections):
        t0 = time.perf_counter()
        model = None if args.skip_diffusers else diffusers_model(config, tdtype, device)
        if model is not None:
            say(f"diffusers weights on {device}: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        # one random state for both sides: fluxjax's weights are diffusers' state dict, converted
        params = jax.block_until_ready(shared_params(model, config, dtype) if model is not None
                                       else fluxjax_params(config, dtype))
        say(f"fluxjax weights on {jax.devices()[0].platform} ({'shared with diffusers' if model is not None else 'random'}): "
            f"{time.perf_counter() - t0:.1f} s")

    if "timing" in sections:
        record["timing"] = timing(model, params, setup, host, sigmas, device, peak, flops, args, start, say)
        save()
    if "interventions" in sections:
        record["interventions"] = intervention_rows(params, setup, host, args.reps, say)
        save()
    if "parity" in sections and model is not None:
        record["parity"] = parity(model, params, setup, host, sigmas, device, say)
        save()
    del model, params
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()

    if "rehearsal" in sections:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        folder, size = work / "model", (64 if args.tiny else 1024)
        t0 = time.perf_counter()
        if not folder.exists():
            if args.tiny:
                from flux2ref.folder import build_model_folder

                build_model_folder(folder)
            else:
                build_real_folder(folder, device)
        say(f"rehearsal model folder ({'tiny' if args.tiny else 'klein-9B-sized'}): {time.perf_counter() - t0:.1f} s")
        gc.collect()
        record["rehearsal"] = rehearsal(folder, work / "run", size, device, tdtype, setup.dtype,
                                        args.rehearsal_blocks or ("1,3" if args.tiny else "7,17"), say)
        save()
    print()
    print(summary(record))
    say("done")
    save()
    return record


def timing(model, params, setup, host, sigmas, device, peak, flops, args, start, say) -> dict:
    """The 4-step loop and one forward of each side, compile apart, then alternating rounds."""
    import torch

    record = {}
    dtype, tdtype = jnp.dtype(setup.dtype), getattr(torch, setup.dtype)
    jx = {k: jnp.asarray(v, dtype) for k, v in host.items()}
    fj_sample, fj_forward = fluxjax_calls(params, setup, jx["txt"], jx["noise"], jx["refs"], sigmas)
    fns = {}
    for name, fn in (("fluxjax sample", fj_sample), ("fluxjax forward", fj_forward)):
        sec, _ = common.timed(fn)
        record[f"{name} first call (compile) s"] = sec
        say(f"{name}: first call (compile + run) {sec:.1f} s")
        fns[name] = fn
    if model is not None:
        tx = {k: torch.as_tensor(v).to(device=device, dtype=tdtype) for k, v in host.items()}
        df_sample, df_forward = diffusers_calls(model, setup, tx["txt"], tx["noise"], tx["refs"], sigmas, device)
        for name, fn in (("diffusers sample", df_sample), ("diffusers forward", df_forward)):
            sec, _ = common.timed(fn)
            record[f"{name} first call s"] = sec
            say(f"{name}: first call {sec:.1f} s")
            fns[name] = fn
    times = {n: [] for n in fns}
    for r in range(args.reps):
        if time.perf_counter() - start > args.deadline_s:
            say(f"deadline: stopping after {r} timing rounds")
            break
        times = {n: times[n] + v for n, v in common.alternate(fns, 1).items()}
        say("round " + str(r + 1) + ": " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()))
    record["steady_s"] = times
    for side in ("fluxjax", "diffusers"):
        if not times.get(f"{side} sample"):
            continue
        e2e, fwd = statistics.median(times[f"{side} sample"]), statistics.median(times[f"{side} forward"])
        mfu = None if peak is None else STEPS * flops / e2e / (peak[1] * 1e12)
        record[side] = {"forward_s": fwd, "end_to_end_s": e2e, "per_step_s": e2e / STEPS, "mfu": mfu,
                        "model_tflops": STEPS * flops / e2e / 1e12}
    return record


def summary(record: dict) -> str:
    """Markdown tables of whatever sections ran."""
    gib = 2 ** 30
    parts = []
    if record.get("tiny"):
        parts.append("(--tiny: a check that the script runs end to end, not a figure)")
    t = record.get("timing")
    if t:
        rows = [[side, f"{t[side]['forward_s']:.3f}", f"{t[side]['per_step_s']:.3f}", f"{t[side]['end_to_end_s']:.3f}",
                 f"{t[side]['model_tflops']:.0f}", "-" if t[side]["mfu"] is None else f"{100 * t[side]['mfu']:.1f} %"]
                for side in ("fluxjax", "diffusers") if side in t]
        parts.append(common.markdown_table(["side", "forward (s)", "end-to-end / step (s)",
                                            f"end-to-end, {STEPS} steps (s)", "model TFLOP/s", "MFU"], rows))
    iv = record.get("interventions")
    if iv:
        rows = [[n, f"{r['compile_s']:.1f}", f"{r['steady_s']:.3f}",
                 f"{r['xla_memory'].get('peak_bytes', 0) / gib:.2f}"] for n, r in iv["rows"].items()]
        parts.append(common.markdown_table(["forward", "compile (s)", "steady (s, median)", "XLA peak (GiB)"], rows)
                     + f"\n\nknockout / plain: time {iv['time_ratio']:.3f} (goal {iv['time_goal']}), memory "
                       f"{iv.get('memory_ratio', float('nan')):.3f} (goal {iv.get('memory_goal', '-')})")
    p = record.get("parity")
    if p:
        parts.append(common.markdown_table(["fluxjax vs diffusers, shared weights", "relative L2"],
                                           [[k, f"{v:.2e}"] for k, v in p.items()]))
    r = record.get("rehearsal")
    if r:
        rows = [[n, f"{x['wall_s']:.1f}", f"{x['compile_s']:.1f}", x["cells"],
                 "-" if x["device_peak_bytes_so_far"] is None else f"{x['device_peak_bytes_so_far'] / gib:.1f}"]
                for n, x in r["experiments"].items()]
        parts.append(common.markdown_table(["experiment", "wall (s)", "compile (s)", "cells",
                                            "device peak so far (GiB)"], rows)
                     + f"\n\nrun_all total {r['total_s']:.1f} s for {r['cells']} cells; the study's way (one "
                       f"diffusers call per cell, {r['diffusers']['per_cell_s']:.2f} s each): {r['study_way_s']:.1f} s; "
                       f"ratio {r['ratio_to_study_way'] or float('nan'):.2f} (goal {r['ratio_goal']})")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
