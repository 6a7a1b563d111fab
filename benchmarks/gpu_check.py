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
    fwd = jax.jit(lambda p, x, c, t: fluxjax.forward(p, config, x, c, t, img_ids, txt_ids,
                                                     attn_impl=setup.attn_impl)[0])

    def sample():
        return jax.block_until_ready(fluxjax.sample(params, config, options, txt, txt_ids, img_ids, noise=noise,
                                                    refs=refs, sigmas=sigmas, attn_impl=setup.attn_impl)[0])

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

    return randomized(meta_model(config, torch_dtype).to_empty(device=device).eval(), device, seed)


def randomized(module, device, seed: int):
    """`module` with every weight drawn on `device`: vectors 1 + N(0, 0.1^2), matrices N(0, 1/fan_in)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g)
            if p.ndim == 1:
                p.mul_(0.1).add_(1.0)
            else:
                p.mul_(p.shape[1] ** -0.5)
    return module


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


# --- shared weights, interventions, parity ----------------------------------------------------------


def shared_params(model, config, dtype):
    """fluxjax weights converted from the diffusers model's own state dict (one random state for both
    sides), leaf by leaf: each stacked leaf crosses the host once and lives on the default device."""
    import ml_dtypes
    import torch

    from fluxjax.conversion.transformer import leaves_from_state

    state = model.state_dict()

    class Host(dict):  # tensors as numpy on demand (bfloat16 through ml_dtypes: numpy has no bfloat16)
        def __getitem__(self, key):
            t = state[key].detach()
            if t.dtype == torch.bfloat16:
                return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.cpu().numpy()

    host = Host({k: None for k in state})
    host.dtypes = {k: np.dtype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else np.dtype(str(v.dtype)[6:])
                   for k, v in state.items()}  # torch.float32 -> float32
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    leaves = [jnp.asarray(leaf, dtype) for _, leaf in leaves_from_state(host, config, "diffusers", shapes=shapes)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fluxjax.param_shapes(config)), leaves)


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


# --- the rehearsal: the study's cells through experiments.run_all -----------------------------------

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_real_folder(path, device, seed: int = 0) -> str:
    """A random FLUX.2 [klein] 9B-sized model folder in the diffusers layout, built on `device` in
    bfloat16: the klein-9B transformer, the FLUX.2 VAE, a Qwen3 text encoder of Qwen3-8B's shapes and
    the offline tokenizer of the tiny folder (its small vocabulary indexes Qwen3's table)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux2ref.folder import qwen3_tokenizer

    def on_device(make):  # built on the meta device, materialised on `device` in bfloat16, filled
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                module = make()
        finally:
            torch.set_default_dtype(default)
        return randomized(module.to_empty(device=device).eval(), device, seed)

    transformer = diffusers_model(fluxjax.FLUX2_KLEIN_9B, torch.bfloat16, device, seed)
    vae = AutoencoderKLFlux2().to(device=device, dtype=torch.bfloat16).eval()
    text = on_device(lambda: Qwen3ForCausalLM(Qwen3Config(**QWEN3_8B)))
    text.model.rotary_emb.__init__(text.config, device=device)  # its buffer was made on the meta device
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                              text_encoder=text, tokenizer=qwen3_tokenizer(), transformer=transformer,
                              is_distilled=True)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, transformer, vae, text
    return str(path)


class _Instrumented:
    """Wraps each experiment's `run` to record its wall time, XLA compile time (jax.monitoring's
    backend-compile events) and the device's peak memory after it."""

    def __init__(self):
        self.rows, self._compile = {}, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self._compile += duration

    def wrap(self, module):
        run = module.run

        def timed_run(ctx, found, settings, name, *a, **kw):
            c0, t0 = self._compile, time.perf_counter()
            with common.PeakRSS() as rss:
                out = run(ctx, found, settings, name, *a, **kw)
            stats = jax.devices()[0].memory_stats() or {}
            self.rows[name] = {"wall_s": time.perf_counter() - t0, "compile_s": self._compile - c0,
                               "device_peak_bytes_so_far": stats.get("peak_bytes_in_use"),
                               "host_rss_increase_bytes": rss.bytes}
            return out

        module.run = timed_run
        return run


def count_cells(run_path, name) -> int:
    """Images the experiment wrote (one per cell) under outputs/<name>/ of the run folder."""
    from pathlib import Path

    return sum(1 for _ in (Path(run_path) / "outputs" / name).rglob("*.png"))


def diffusers_cell_cost(folder, size: int, device, tdtype, say) -> dict:
    """One study-style cell: a `Flux2KleinPipeline` call (4 steps, the reference image, a ref->text
    knockout through attention processors that add the mask in every block). Timed warm."""
    import torch
    from diffusers import Flux2KleinPipeline
    from diffusers.models.transformers import transformer_flux2 as tf
    from PIL import Image

    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=tdtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    masks, state = {}, {}

    def mask_for(n_txt, n_stream):  # [text | image | reference], reference as large as the image
        key = (n_txt, n_stream)
        if key not in masks:
            L, n_img = n_txt + n_stream, n_stream // 2
            m = torch.ones((1, 1, L, L), dtype=torch.bool, device=device)
            m[:, :, :n_txt, n_txt + n_img:] = False
            masks[key] = m
        return masks[key]

    class Double(tf.Flux2AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            state["n_txt"] = encoder_hidden_states.shape[1]
            mask = mask_for(state["n_txt"], hidden_states.shape[1])
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)

    class Single(tf.Flux2ParallelSelfAttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            mask = mask_for(state["n_txt"], hidden_states.shape[1] - state["n_txt"])
            return super().__call__(attn, hidden_states, mask, image_rotary_emb)

    for b in pipe.transformer.transformer_blocks:
        b.attn.set_processor(Double())
    for b in pipe.transformer.single_transformer_blocks:
        b.attn.set_processor(Single())
    reference = Image.new("RGB", (size, size), (200, 30, 30))

    def call():
        out = pipe(image=reference, prompt="draw a ball in this color", height=size, width=size,
                   num_inference_steps=STEPS, generator=torch.Generator(device=device).manual_seed(0),
                   output_type="np").images
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    first, _ = common.timed(call)
    warm, _ = common.timed(call)
    say(f"diffusers, one cell (Flux2KleinPipeline, {STEPS} steps, {size}px, knockout mask): first {first:.2f} s, "
        f"warm {warm:.2f} s")
    del pipe
    return {"first_call_s": first, "per_cell_s": warm}


def rehearsal(folder, out_dir, size: int, device, tdtype, dtype_name: str, blocks: str, say) -> dict:
    """`experiments.run_all --blocks <blocks>` for one colour task, per experiment wall / compile /
    memory, and the same number of cells at the study's one-diffusers-call-per-cell cost."""
    from experiments import drop, knockout, lens, patching, run_all

    inst = _Instrumented()
    originals = {m: inst.wrap(m) for m in (lens, knockout, drop, patching)}
    t0 = time.perf_counter()
    try:
        run_all.main(["--model", str(folder), "--out", str(out_dir), "--blocks", blocks, "--colours", "red,green",
                      "--objects", "ball", "--seeds", "0", "--size", str(size), "--dtype", dtype_name,
                      "--no-progress"])
    finally:
        for m, run in originals.items():
            m.run = run
    total = time.perf_counter() - t0
    for name, row in inst.rows.items():
        row["cells"] = count_cells(out_dir, name)
    cells = sum(r["cells"] for r in inst.rows.values())
    say("rehearsal: " + "; ".join(f"{n} {r['wall_s']:.1f} s (compile {r['compile_s']:.1f} s, {r['cells']} cells)"
                                  for n, r in inst.rows.items()) + f"; total {total:.1f} s")
    cost = diffusers_cell_cost(str(folder), size, device, tdtype, say)
    study_way = cells * cost["per_cell_s"]
    return {"experiments": inst.rows, "total_s": total, "cells": cells, "diffusers": cost,
            "study_way_s": study_way, "ratio_to_study_way": total / study_way if study_way else None,
            "ratio_goal": "<= 0.5x"}


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
