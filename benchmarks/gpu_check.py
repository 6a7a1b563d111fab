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

Weights differ between the two sides (each initialises its own on the device): the timings do not
depend on the values, and numerical agreement is the parity tests' business. `--tiny` shares the
weights and prints the latents' relative difference as a check that both loops do the same thing.
Designed to finish in under 8 minutes on an H100: each phase prints when it ends, and the timing
rounds stop early if the deadline (--deadline-s) comes near.
"""

from __future__ import annotations

import os

# JAX must not take 75 % of the GPU up front: diffusers needs its 18 GB in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fluxjax  # noqa: E402
from benchmarks import common  # noqa: E402
from fluxjax.schedule import flux2_sigmas  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200 NVL": 835.0, "H200": 989.4}
STEPS = 4


@dataclasses.dataclass(frozen=True)
class Setup:
    config: fluxjax.Flux2Config
    layout: fluxjax.TokenLayout
    dtype: str  # "bfloat16" / "float32"
    attn_impl: str | None  # fluxjax attention implementation


def real_setup() -> Setup:
    # 1024x1024 px -> 128x128 latent (VAE /8) -> 64x64 tokens (2x2 patches); the same for the reference.
    return Setup(fluxjax.FLUX2_KLEIN_9B, fluxjax.TokenLayout(512, (64, 64), ((64, 64),)), "bfloat16", "cudnn")


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


# --- fluxjax -------------------------------------------------------------------------------------


def _is_norm(path) -> bool:
    return any(getattr(k, "name", None) in ("query_norm", "key_norm") for k in path)


def fluxjax_params(config, dtype, seed: int = 0):
    """Random params made on the default device, one leaf at a time, drawn directly in `dtype`
    (as `init_params`: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2)); peak memory is the
    params plus one leaf's temporaries."""
    shapes = fluxjax.param_shapes(config, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dt, norm):
        z = jax.random.normal(key, shape, dt)
        return 1 + 0.1 * z if norm else z * jnp.asarray(1 / math.sqrt(shape[-2]), dt)

    out = [draw(k, s.shape, jnp.dtype(dtype), _is_norm(p)) for (p, s), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def fluxjax_calls(params, setup: Setup, txt, noise, refs, sigmas):
    config, layout = setup.config, setup.layout
    txt_ids, img_ids = jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids())
    options = fluxjax.SamplerOptions(num_steps=STEPS, guidance="none")
    model_in = jnp.concatenate([noise, refs], axis=1)
    t = jnp.full((1,), 0.5, noise.dtype)
    fwd = jax.jit(lambda p, x, c, t: fluxjax.forward(p, config, x, c, t, img_ids, txt_ids, attn_impl=setup.attn_impl))

    def sample():
        return jax.block_until_ready(fluxjax.sample(params, config, options, txt, txt_ids, img_ids, noise=noise,
                                                    refs=refs, sigmas=sigmas, attn_impl=setup.attn_impl))

    def forward():
        return jax.block_until_ready(fwd(params, model_in, txt, t))

    return sample, forward


# --- diffusers -----------------------------------------------------------------------------------


def meta_model(config, torch_dtype):
    """Flux2Transformer2DModel of `config` on the meta device (shapes only), parameters in `torch_dtype`."""
    import torch
    from diffusers import Flux2Transformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            return Flux2Transformer2DModel(**common.reference_helpers().diffusers_kwargs(config))
    finally:
        torch.set_default_dtype(default)


def diffusers_model(config, torch_dtype, device, seed: int = 0):
    """A Flux2Transformer2DModel built on the meta device and materialised on `device` in
    `torch_dtype` (no full-precision copy ever exists), filled like `fluxjax_params`."""
    import torch

    model = meta_model(config, torch_dtype).to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(generator=g)
            if p.ndim == 1:
                p.mul_(0.1).add_(1.0)
            else:
                p.mul_(p.shape[1] ** -0.5)
    return model


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
                                                           noise=n, refs=r, sigmas=sigmas), params, txt, noise, refs)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="a tiny model on whatever device there is (CPU)")
    mode.add_argument("--check", action="store_true", help="shapes of the real run only (no weights, any machine)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="weights and activations (default bfloat16; --tiny float32, so its agreement check is tight)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per side")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 dense peak")
    ap.add_argument("--deadline-s", type=float, default=420, help="stop timing rounds after this many seconds")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()

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
        f"peak assumed: {peak}")

    rng = np.random.default_rng(0)
    host = {"txt": rng.standard_normal((1, layout.n_txt, config.context_in_dim), np.float32),
            "noise": rng.standard_normal((1, layout.n_img, config.in_channels), np.float32),
            "refs": rng.standard_normal((1, layout.n_ref, config.in_channels), np.float32)}
    sigmas = flux2_sigmas(layout.n_img, STEPS)
    record = {"device": device_name, "setup": {"config": dataclasses.asdict(config), "dtype": setup.dtype,
              "tokens": [layout.n_txt, layout.n_img, layout.n_ref], "steps": STEPS, "attn_impl": setup.attn_impl},
              "flops_per_forward": flops, "peak": peak, "environment": common.environment()}

    t0 = time.perf_counter()
    model = None if args.skip_diffusers else diffusers_model(config, tdtype, device)
    if model is not None:
        say(f"diffusers weights on {device}: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    if args.tiny and model is not None:  # share the weights: both loops must then agree
        from fluxjax.conversion.transformer import params_from_state

        state = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params_from_state(state, config, "diffusers"))
    else:
        params = jax.block_until_ready(fluxjax_params(config, dtype))
    say(f"fluxjax weights on {jax.devices()[0].platform}: {time.perf_counter() - t0:.1f} s")

    jx = {k: jnp.asarray(v, dtype) for k, v in host.items()}
    fj_sample, fj_forward = fluxjax_calls(params, setup, jx["txt"], jx["noise"], jx["refs"], sigmas)
    fns = {}
    for name, fn in (("fluxjax sample", fj_sample), ("fluxjax forward", fj_forward)):
        sec, out = common.timed(fn)
        record[f"{name} first call (compile) s"] = sec
        say(f"{name}: first call (compile + run) {sec:.1f} s")
        fns[name] = fn
    fj_latents = np.asarray(fj_sample(), np.float32)
    if model is not None:
        tx = {k: torch.as_tensor(v).to(device=device, dtype=tdtype) for k, v in host.items()}
        df_sample, df_forward = diffusers_calls(model, setup, tx["txt"], tx["noise"], tx["refs"], sigmas, device)
        for name, fn in (("diffusers sample", df_sample), ("diffusers forward", df_forward)):
            sec, _ = common.timed(fn)
            record[f"{name} first call s"] = sec
            say(f"{name}: first call {sec:.1f} s")
            fns[name] = fn
        df_latents = df_sample().float().cpu().numpy()
        record["latents_rel_diff"] = float(np.linalg.norm(fj_latents - df_latents) / np.linalg.norm(df_latents))
        say(f"latents, fluxjax vs diffusers: relative difference {record['latents_rel_diff']:.2e}"
            + (" (shared weights)" if args.tiny else " (independent random weights: not a parity check)"))

    times = {n: [] for n in fns}
    for r in range(args.reps):
        if time.perf_counter() - start > args.deadline_s:
            say(f"deadline: stopping after {r} timing rounds")
            break
        times = {n: times[n] + v for n, v in common.alternate(fns, 1).items()}
        say("round " + str(r + 1) + ": " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()))
    record["steady_s"] = times

    rows = []
    for side in ("fluxjax", "diffusers"):
        if not times.get(f"{side} sample"):
            continue
        e2e, fwd = statistics.median(times[f"{side} sample"]), statistics.median(times[f"{side} forward"])
        mfu = None if peak is None else STEPS * flops / e2e / (peak[1] * 1e12)
        rows.append([side, f"{fwd:.3f}", f"{e2e / STEPS:.3f}", f"{e2e:.3f}", f"{STEPS * flops / e2e / 1e12:.0f}",
                     "-" if mfu is None else f"{100 * mfu:.1f} %"])
        record[side] = {"forward_s": fwd, "end_to_end_s": e2e, "per_step_s": e2e / STEPS, "mfu": mfu}
    print()
    print(common.markdown_table(["side", "forward (s)", "end-to-end / step (s)", f"end-to-end, {STEPS} steps (s)",
                                 "model TFLOP/s", "MFU"], rows))
    print(f"\nmedians of {len(times['fluxjax sample'])} rounds; FLOPs {flops / 1e12:.2f} T per forward "
          f"(architecture count, spec section 3); peak {peak}; total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
