"""A 4-step [klein] edit: fluxjax's one-program sampler vs diffusers' `Flux2KleinPipeline`, one process.

Mid-sized random model (hidden 512, 4 heads, 2 double + 4 single blocks), 512 text tokens, a
512x512 output (1024 image tokens) and one 512x512 reference (1024 tokens), float32. Both sides
start from the same prompt embeddings and noise and return latents. The pipeline also encodes the
reference with its (tiny random) VAE on every call; that part is timed on its own and subtracted
for the sampler-only ratio (fluxjax gets the reference tokens precomputed).

Compile time is reported apart from steady-state time; runs alternate between the two sides.
Only from a quiet machine (`benchmarks.common.LoadGuard`); `--allow-busy` flags the figures.
Writes <out>.json and <out>.md.

    python -m benchmarks.sampler [--repeats 5] [--out benchmarks/results/sampler]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from fluxjax import images, sampler

CONFIG = dataclasses.replace(fluxjax.FLUX2_KLEIN_4B, hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4,
                             context_in_dim=1536)
N_TXT, SIZE = 512, 512


def build(seed: int = 0):
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    from flux2ref.models import diffusers_kwargs, randomize_, state_dict_numpy

    from fluxjax.conversion.transformer import params_from_state

    transformer = randomize_(Flux2Transformer2DModel(**diffusers_kwargs(CONFIG)).eval(), seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=32,
                             norm_num_groups=4).eval()
    with torch.no_grad():
        vae.bn.running_var.fill_(1.0)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=None, tokenizer=None, transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_state(state_dict_numpy(transformer), CONFIG, "diffusers"))
    return pipe, params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/sampler)")
    parser.add_argument("--allow-busy", action="store_true", help="write figures from a busy machine, flagged")
    parser.add_argument("--wait-quiet", type=float, default=120.0, help="seconds to wait for the load average to fall")
    args = parser.parse_args(argv)

    from benchmarks import common

    guard = common.LoadGuard()
    if guard.wait_quiet(args.wait_quiet) > guard.load_limit and not args.allow_busy:
        raise common.MachineBusy(f"1-minute load average {guard.load_before:.2f} above {guard.load_limit:.2f}: not "
                                 "measuring on a busy machine (--allow-busy measures and flags the figures)")

    import PIL.Image
    import torch

    pipe, params = build()
    rng = np.random.default_rng(0)
    txt = rng.standard_normal((1, N_TXT, CONFIG.context_in_dim)).astype(np.float32)
    grid = images.image_grid(SIZE, SIZE)
    noise = rng.standard_normal((1, CONFIG.in_channels, *grid)).astype(np.float32)
    ref = PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))

    from flux2ref.models import pipeline_encoder, pipeline_tokens

    encode = pipeline_encoder(pipe)
    refs, ref_grids = images.reference_tokens([ref], encode)
    layout = images.reference_layout(N_TXT, grid, ref_grids)
    args_jax = (params, CONFIG, sampler.KLEIN_DISTILLED, txt, layout.txt_ids(), layout.img_ids())
    kwargs_jax = dict(noise=pipeline_tokens(noise), refs=refs)

    def run_jax():
        return jax.block_until_ready(fluxjax.sample(*args_jax, **kwargs_jax))

    def run_torch():
        with torch.no_grad():
            return pipe(image=ref, prompt_embeds=torch.from_numpy(txt), height=SIZE, width=SIZE, num_inference_steps=4,
                        guidance_scale=1.0, latents=torch.from_numpy(noise), output_type="latent").images

    def run_vae():
        return images.reference_tokens([ref], encode)

    def timed(fn, name=None):
        if name is not None:
            return guard.measure(name, fn)[0]
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    print(f"model: hidden {CONFIG.hidden_size}, {CONFIG.depth}+{CONFIG.depth_single_blocks} blocks; tokens: "
          f"{N_TXT} text + {layout.n_img} image + {layout.n_ref} reference; float32; "
          f"jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    first_jax, first_torch = timed(run_jax), timed(run_torch)
    print(f"first call: fluxjax {first_jax:.2f} s (trace + compile + run), diffusers {first_torch:.2f} s")
    jx, tc, vae = [], [], []
    for r in range(args.repeats):
        for name in (("fluxjax", "diffusers") if r % 2 == 0 else ("diffusers", "fluxjax")):
            (jx if name == "fluxjax" else tc).append(timed(run_jax if name == "fluxjax" else run_torch, name))
        vae.append(timed(run_vae, "reference encode"))
    j, t, v = statistics.median(jx), statistics.median(tc), statistics.median(vae)
    print(f"steady state, median of {args.repeats}: fluxjax {j:.3f} s, diffusers pipeline {t:.3f} s "
          f"(of which reference preprocessing + VAE encode {v:.3f} s)")
    print(f"fluxjax compile, first call minus steady state: {first_jax - j:.2f} s")
    print(f"ratio diffusers / fluxjax: {t / j:.2f}x (whole pipeline call), {(t - v) / j:.2f}x (sampler only)")
    got = np.asarray(run_jax()[0])
    print(f"sanity: fluxjax latents finite: {bool(np.isfinite(got).all())}, shape {got.shape}")
    machine = guard.enforce(args.allow_busy)
    record = {"environment": common.environment(), "machine": machine, "repeats": args.repeats,
              "first_call_s": {"fluxjax": first_jax, "diffusers": first_torch},
              "steady_s": {"fluxjax": jx, "diffusers": tc, "reference encode": vae},
              "fluxjax_over_diffusers": {"pipeline": j / t, "sampler only": j / (t - v)}}
    md = "\n".join(x for x in [
        "# 4-step [klein] edit: fluxjax vs Flux2KleinPipeline", "", common.busy_banner(machine),
        f"{record['environment']['cpu']}, load average before {machine['load_before']:.2f}; hidden {CONFIG.hidden_size}, "
        f"{CONFIG.depth}+{CONFIG.depth_single_blocks} blocks, {N_TXT} + {layout.n_img} + {layout.n_ref} tokens, float32; "
        f"medians of {args.repeats} alternating rounds.", "",
        common.markdown_table(["", "fluxjax", "diffusers", "fluxjax / diffusers"], [
            ["whole call (s)", f"{j:.3f}", f"{t:.3f}", f"{j / t:.2f}"],
            ["sampler only (s; diffusers minus its reference encode)", f"{j:.3f}", f"{t - v:.3f}", f"{j / (t - v):.2f}"],
            ["first call (s)", f"{first_jax:.2f}", f"{first_torch:.2f}", ""]])] if x is not None)
    paths = common.write_report(args.out or common.RESULTS_DIR / "sampler", record, md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
