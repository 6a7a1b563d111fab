"""The device-memory plan of GPU commands A (`benchmarks.gpu_check`) and B (`benchmarks.gpu_rehearsal`)
at klein-9B size, computed on any machine without allocating a byte of the models.

    python -m benchmarks.gpu_plan                      # klein-9B: a few minutes of XLA:CPU compiles
    python -m benchmarks.gpu_plan --tiny --out DIR     # the same at tiny size (a check)

Per phase of each command, what is resident at once:
  weights      counted from the parameter shapes (fluxjax `param_shapes`, `vae_param_shapes`;
               torch modules built on the meta device: diffusers' transformer and VAE, Qwen3-8B)
  programs     XLA's memory plan of every compiled JAX program the phase runs, lowered from
               ShapeDtypeStructs (nothing allocated) and compiled by XLA:CPU: its temporaries and
               outputs (arguments are the weights, counted once above)
  torch        a diffusers or Qwen3 forward's working set, estimated from its largest live tensors
               (below), and the study's knockout mask (bool [1, 1, L, L])

XLA:CPU's plan stands for XLA:GPU's as follows. The transformer programs are planned in float32:
in bfloat16 XLA:CPU converts the stacked weights to float32 inside the program (no bfloat16 dots
on CPU), which shows as 35 GiB of temporaries for one forward that a GPU does not have; every
activation of the float32 program is at least as large as its bfloat16 counterpart, so its
temporaries bound the bfloat16 program's from above, up to differences of fusion and the attention
kernel (CPU: the blocked kernel; GPU: cuDNN, whose float32 partial outputs per key segment the
blocked kernel's outputs match in size). The VAE runs in float32 on both. Command A's rows report
XLA:GPU's own plan of every program it compiles, and the devices' peak memory, to check this.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from benchmarks import common, gpu_models

GIB = 2 ** 30
LIMIT_GIB = 70  # the plan must stay under this at every phase (80 GB H100, CUDA context and slack)
CUDA_CONTEXT_GIB = 0.6  # what a process's CUDA context and cuBLAS/cuDNN handles take (per framework)


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def plan_of(fn, *args, **static) -> dict:
    """XLA:CPU's buffer assignment of `jax.jit(fn)` at these shapes, and the seconds it took."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    return {**common.xla_memory(compiled), "compile_s": time.perf_counter() - t0}


def torch_bytes(build) -> int:
    """Parameter and buffer bytes of a torch module built on the meta device."""
    import torch

    with torch.device("meta"):
        module = build()
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def transformer_working_set(config, n_tokens: int, itemsize: int = 2) -> int:
    """Bytes of the largest live tensors of one diffusers single block (the widest) in bfloat16, with
    its float32 islands: the fused projection [L, 3D + 2M], q, k, v and the attention output
    [L, D] each, RMSNorm and RoPE in float32 (3 x [L, D] float32), the SwiGLU halves [L, M] x 2,
    the concatenation [L, D + M], the block output and residual [L, D] x 2. Torch's caching
    allocator adds fragmentation: the plan takes twice this."""
    L, D, M = n_tokens, config.hidden_size, config.mlp_hidden
    elems = L * (3 * D + 2 * M) + 4 * L * D + 2 * L * M + L * (D + M) + 2 * L * D
    return 2 * (elems * itemsize + 3 * L * D * 4)


def qwen3_working_set(q: dict, n_tokens: int, itemsize: int = 2) -> int:
    """One Qwen3 layer at n_tokens (hidden states kept for the three stacked layers), doubled as above."""
    L, D, M = n_tokens, q["hidden_size"], q["intermediate_size"]
    keep = (q["num_hidden_layers"] + 1) * L * D  # output_hidden_states keeps every layer's
    return 2 * (keep + L * (3 * D + 3 * M) + L * q["vocab_size"] // 8) * itemsize


def programs(shapes: gpu_models.Shapes, chunk: int, cells: int, tiny: bool) -> dict:
    """XLA plans of every JAX program of A and B at `shapes`, the transformer's in float32."""
    from experiments.sweep import _sample_many
    from fluxjax.interventions import Interventions, stack

    config, layout = shapes.transformer, shapes.layout
    dt = jnp.float32
    params = fluxjax.param_shapes(config, dt)
    content = np.zeros((1, layout.n_txt), bool)
    content[0, layout.n_txt // 32: layout.n_txt // 8] = True
    x = sds((1, layout.n_image_stream, config.in_channels), dt)
    c = sds((1, layout.n_txt, config.context_in_dim), dt)
    t = sds((1,), dt)
    img_ids, txt_ids = layout.img_ids(), layout.txt_ids()
    middle = config.num_blocks // 2
    knock = fluxjax.Interventions(knockout=fluxjax.knockout(config, layout, content, "ref->text"))

    def fwd(p, x, c, t, iv):
        return fluxjax.forward(p, config, x, c, t, img_ids, txt_ids, interventions=iv)[0]

    out = {}
    for name, iv in (("forward plain", None), ("forward knockout ref->text", knock),
                     (f"forward drop_reference from {middle}",
                      fluxjax.Interventions(drop_reference=fluxjax.drop_reference(layout, middle)))):
        out[name] = plan_of(fwd, params, x, c, t, iv)
    options = fluxjax.SamplerOptions(num_steps=4, guidance="none")
    noise, refs = sds((1, layout.n_img, config.in_channels), dt), sds((1, layout.n_ref, config.in_channels), dt)
    sigmas = sds((5,), jnp.float32)

    def sample(p, txt, noise, refs, sigmas):
        return fluxjax.sample(p, config, options, txt, txt_ids, img_ids, noise=noise, refs=refs, sigmas=sigmas)[0]

    out["sample 4 steps (edit)"] = plan_of(sample, params, c, noise, refs, sigmas)
    t2i = fluxjax.TokenLayout(layout.n_txt, layout.img_grid)
    out["sample 4 steps (text-to-image)"] = plan_of(
        lambda p, txt, noise, sigmas: fluxjax.sample(p, config, options, txt, t2i.txt_ids(), t2i.img_ids(),
                                                     noise=noise, sigmas=sigmas)[0], params, c, noise, sigmas)
    for v in sorted({cells, chunk}):
        ivs = stack([knock] * v)
        out[f"sweep of {v} knockout cells"] = plan_of(
            lambda p, txt, noise, refs, ivs, sigmas: _sample_many(
                p, txt, jnp.asarray(layout.txt_ids()), jnp.asarray(layout.img_ids()), noise, refs, None, ivs, sigmas,
                config=config, options=options, runtime=None), params, c, noise, refs, ivs, sigmas)
    vae = fluxjax.vae_param_shapes(shapes.vae)
    from fluxjax import vae as vaelib

    size = shapes.size
    out[f"VAE decode of {chunk} images"] = plan_of(
        lambda p, tok: vaelib.decode_tokens(p, shapes.vae, tok, size, size), vae,
        sds((chunk, layout.n_img, shapes.vae.token_channels), jnp.float32))
    out["VAE encode of the reference"] = plan_of(
        lambda p, im: vaelib.encode_to_grid(p, shapes.vae, im), vae, sds((1, size, size, 3), jnp.float32))
    return out


def weights(shapes: gpu_models.Shapes) -> dict:
    """Bytes of every model's weights as the commands hold them (bfloat16; the fluxjax VAE float32)."""
    import torch
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config, Qwen3ForCausalLM

    bf16 = 2
    n = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(fluxjax.param_shapes(shapes.transformer)))
    vae_n = sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(fluxjax.vae_param_shapes(shapes.vae)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        qwen = torch_bytes(lambda: Qwen3ForCausalLM(Qwen3Config(**shapes.qwen3)))
        dvae = torch_bytes(lambda: AutoencoderKLFlux2(**{f.name: getattr(shapes.vae, f.name)
                                                         for f in dataclasses.fields(shapes.vae)}))
        dtrans = torch_bytes(lambda: gpu_models.meta_model(shapes.transformer, torch.bfloat16))
    finally:
        torch.set_default_dtype(default)
    return {"fluxjax transformer": n * bf16, "fluxjax VAE (float32)": vae_n * 4, "diffusers transformer": dtrans,
            "Qwen3 text encoder": qwen, "diffusers VAE": dvae}


def phases(shapes: gpu_models.Shapes, w: dict, p: dict, chunk: int, cells: int) -> list[dict]:
    """What each phase of A and B holds at once, in bytes."""
    layout = shapes.layout
    L = layout.total
    torch_fwd = transformer_working_set(shapes.transformer, L)
    qwen_fwd = qwen3_working_set(shapes.qwen3, shapes.n_txt)
    mask = L * L  # bool [1, 1, L, L]
    ctx = int(CUDA_CONTEXT_GIB * GIB)

    def need(name):
        return p[name]["temp"] + p[name]["output"]

    parity_fwd = max(need("forward plain"), need("forward knockout ref->text"))
    fwd = max(need(k) for k in p if k.startswith("forward"))
    out = [
        {"command": "A", "phase": "parity (torch and JAX weights both resident)",
         "parts": {"contexts (torch, JAX)": 2 * ctx, "diffusers transformer": w["diffusers transformer"],
                   "fluxjax transformer": w["fluxjax transformer"],
                   "largest of: the plain and knockout forwards, the 4-step edit, torch forward + mask":
                       max(parity_fwd, need("sample 4 steps (edit)"), torch_fwd + mask)}},
        {"command": "A", "phase": "forwards and sweep (torch released)",
         "parts": {"contexts (torch, JAX)": 2 * ctx, "fluxjax transformer": w["fluxjax transformer"],
                   f"largest of: the four forwards, the sweep of {cells} cells":
                       max(fwd, need(f"sweep of {cells} knockout cells"))}},
        {"command": "B", "phase": "fluxjax process: text encoding (torch)",
         "parts": {"context (torch)": ctx, "Qwen3 text encoder": w["Qwen3 text encoder"], "its forward": qwen_fwd}},
        {"command": "B", "phase": "fluxjax process: the experiment (JAX; torch's cache emptied)",
         "parts": {"contexts (torch, JAX)": 2 * ctx, "fluxjax transformer": w["fluxjax transformer"],
                   "fluxjax VAE (float32)": w["fluxjax VAE (float32)"],
                   f"largest of: the samplers, the sweep of {chunk} cells, VAE decode of {chunk}, VAE encode":
                       max(need("sample 4 steps (edit)"), need("sample 4 steps (text-to-image)"),
                           need(f"sweep of {chunk} knockout cells"), need(f"VAE decode of {chunk} images"),
                           need("VAE encode of the reference"))}},
        {"command": "B", "phase": "diffusers process: one pipeline call per cell",
         "parts": {"context (torch)": ctx, "diffusers transformer": w["diffusers transformer"],
                   "Qwen3 text encoder": w["Qwen3 text encoder"], "diffusers VAE": w["diffusers VAE"],
                   "largest of: transformer forward + mask, text encoder forward, VAE decode (bfloat16)":
                       max(torch_fwd + mask, qwen_fwd, need(f"VAE decode of {chunk} images") // (2 * chunk))}},
    ]
    for ph in out:
        ph["total"] = sum(ph["parts"].values())
    return out


def markdown(record: dict) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [common.markdown_table(["weights", "GiB"], [[k, gib(v)] for k, v in record["weights"].items()]), "",
             common.markdown_table(["program (XLA:CPU plan)", "temporaries (GiB)", "outputs (GiB)", "compile (s)"],
                                   [[k, gib(v["temp"]), gib(v["output"]), f"{v['compile_s']:.0f}"]
                                    for k, v in record["programs"].items()])]
    for ph in record["phases"]:
        lines += ["", f"**{ph['command']}: {ph['phase']}**: {gib(ph['total'])} GiB", "",
                  common.markdown_table(["part", "GiB"], [[k, gib(v)] for k, v in ph["parts"].items()])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--chunk", type=int, default=4, help="B's cells per sweep call")
    ap.add_argument("--cells", type=int, default=4, help="A's sweep cells")
    ap.add_argument("--out", default="benchmarks/results/gpu_plan", help="stem of the .json and .md written")
    args = ap.parse_args(argv)
    shapes = gpu_models.TINY if args.tiny else gpu_models.KLEIN_9B
    w = weights(shapes)
    p = programs(shapes, args.chunk, args.cells, args.tiny)
    record = {"shapes": shapes.name, "chunk": args.chunk, "cells": args.cells, "weights": w, "programs": p,
              "phases": phases(shapes, w, p, args.chunk, args.cells), "limit_gib": LIMIT_GIB,
              "environment": common.environment()}
    record["largest_phase_gib"] = max(ph["total"] for ph in record["phases"]) / GIB
    common.write_report(args.out, record, markdown(record))
    print(markdown(record))
    print(f"\nlargest phase {record['largest_phase_gib']:.1f} GiB (limit {LIMIT_GIB} GiB)")
    return record


if __name__ == "__main__":
    main()
