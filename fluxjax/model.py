"""The FLUX.2 transformer forward: embed, modulations once, double blocks, join, single blocks,
final layer (spec section 3), with interventions as an argument and captures as return values.

The blocks run in `fluxjax.runner.run_blocks` (one `lax.scan` per run of blocks of a kind, which
is also where interventions and captures meet them). The steps before and after the blocks are
public functions (`scale_timestep`, `conditioning`, `modulations`, `embed`, `positions`,
`final_layer`), shared with the [klein] KV variant (`fluxjax.kv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fluxjax.blocks import Modulations
from fluxjax.captures import Capture, Captures, as_capture
from fluxjax.config import Flux2Config
from fluxjax.flow import TokenGroups
from fluxjax.interventions import Interventions, validate
from fluxjax.numerics import linear, modulate, rope_tables, timestep_embedding
from fluxjax.options import RuntimeOptions, runtime_options
from fluxjax.params import Flux2Weights, MLPEmbedder
from fluxjax.runner import run_blocks, stream_lanes


def scale_timestep(x, dtype):
    """diffusers' `x.to(dtype) * 1000`: x rounded to the model dtype, times 1000, rounded again.

    The roundings are explicit (`reduce_precision` on float32 values) because under jit XLA may
    otherwise drop a float32 -> bf16 -> float32 round trip (excess precision), which moves a bf16
    timestep such as 0.9 from diffusers' 900 to 898.4.
    """
    f = jnp.finfo(dtype)

    def rounded(v):
        return jax.lax.reduce_precision(v, exponent_bits=f.nexp, mantissa_bits=f.nmant)

    return rounded(rounded(x.astype(jnp.float32)) * 1000)


def _embed_scalar(p: MLPEmbedder, s, dtype, channels: int):
    """diffusers `Flux2TimestepGuidanceEmbeddings`: s (already x1000, model dtype) -> [B, D]."""
    emb = timestep_embedding(s, channels).astype(dtype)
    return linear(jax.nn.silu(linear(emb, p.in_layer)), p.out_layer)


def conditioning(params: Flux2Weights, config: Flux2Config, s, guidance_s=None):
    """vec [B, D] from the timestep s [B] (and the guidance), both already `scale_timestep`ed.

    The guidance embedding is added only by models that have one (diffusers ignores it otherwise).
    """
    dtype = params.img_in.dtype
    vec = _embed_scalar(params.time_in, s, dtype, config.timestep_channels)
    if guidance_s is not None and params.guidance_in is not None:
        vec = vec + _embed_scalar(params.guidance_in, guidance_s, dtype, config.timestep_channels)
    return vec


def _triples(mod, sets: int) -> tuple:
    """[B, 3 sets D] -> `sets` (shift, scale, gate) triples of [B, 1, D], in checkpoint row order."""
    c = jnp.split(mod[:, None, :], 3 * sets, axis=-1)
    return tuple(tuple(c[3 * i:3 * i + 3]) for i in range(sets))


def modulations(params: Flux2Weights, vec) -> Modulations:
    """The three shared modulations of SiLU(vec), computed once per forward (spec 3.2)."""
    act = jax.nn.silu(vec)
    return Modulations(img=_triples(linear(act, params.double_stream_modulation_img.lin), 2),
                       txt=_triples(linear(act, params.double_stream_modulation_txt.lin), 2),
                       single=_triples(linear(act, params.single_stream_modulation.lin), 1)[0])


def embed(params: Flux2Weights, img, txt):
    """Input projections: image-stream tokens [B, N, in] -> [B, N, D], text [B, T, C] -> [B, T, D]."""
    dtype = params.img_in.dtype
    return linear(img.astype(dtype), params.img_in), linear(txt.astype(dtype), params.txt_in)


def batched_ids(ids):
    """Position ids [N, 4] or [B, N, 4] -> [B or 1, N, 4]."""
    ids = jnp.asarray(ids)
    return ids[None] if ids.ndim == 2 else ids


def positions(config: Flux2Config, txt_ids, img_ids):
    """RoPE (cos, sin) tables of the joint [text, image] sequence, each [B or 1, T + N, K]."""
    t_ids, i_ids = batched_ids(txt_ids), batched_ids(img_ids)
    batch = max(t_ids.shape[0], i_ids.shape[0])
    ids = jnp.concatenate([jnp.broadcast_to(t_ids, (batch, *t_ids.shape[1:])),
                           jnp.broadcast_to(i_ids, (batch, *i_ids.shape[1:]))], axis=1)
    return rope_tables(ids, config.axes_dim, config.theta)


def final_layer(params: Flux2Weights, vec, x):
    """The image tokens' output [B, N, out_channels]. BFL order (shift, scale); diffusers stores
    (scale, shift), swapped on conversion."""
    shift, scale = jnp.split(linear(jax.nn.silu(vec), params.final_layer.adaLN_modulation)[:, None, :], 2, axis=-1)
    return linear(modulate(x, shift, scale), params.final_layer.linear)


def forward(params: Flux2Weights, config: Flux2Config, img, txt, timestep, img_ids, txt_ids, guidance=None, *,
            interventions: Interventions | None = None, capture: Capture | None = None,
            num_ref_tokens: int | None = None, runtime: RuntimeOptions | None = None,
            attn_impl: str | None = None, groups: TokenGroups | None = None) -> tuple[jax.Array, Captures]:
    """FLUX.2 transformer forward with the semantics of diffusers' `Flux2Transformer2DModel.forward`.

    img: [B, N, in_channels], noisy-image tokens then reference tokens; txt: [B, T, C];
    timestep: [B] in [0, 1]; img_ids: int [N, 4] or [B, N, 4]; txt_ids: int [T, 4] or [B, T, 4];
    guidance: [B] or None (ignored by models without a guidance embedder, as in diffusers).
    interventions: see fluxjax.interventions; capture: a `Capture` (or sites: fluxjax.sites).
    num_ref_tokens: how many of img's tokens are references (`layout.n_ref`), needed by image and
    reference sites unless a knockout or reference removal already says it. runtime: the attention
    kernel and its tiles (`fluxjax.RuntimeOptions`; `attn_impl="xla"` is the older spelling).
    groups: every token's group (`fluxjax.token_groups(layout, content_mask)`), needed by a capture
    of the attention flow (`Capture(flow=fluxjax.Flow(...))`, `fluxjax.flow`).

    Returns (output [B, N', out_channels], Captures): N' = N, or N minus the reference tokens when
    they are dropped; the captures hold what `capture` asked for. jit with config, capture,
    num_ref_tokens and runtime static.
    """
    runtime = runtime_options(runtime, attn_impl)
    iv, cap = interventions or Interventions(), as_capture(capture)
    n_txt, dtype = txt.shape[1], params.img_in.dtype
    lanes, refs_known = stream_lanes(n_txt, img.shape[1], num_ref_tokens, iv)
    validate(iv, cap, config, img.shape[0], lanes, refs_known, dtype)
    vec = conditioning(params, config, scale_timestep(timestep, dtype),
                       None if guidance is None else scale_timestep(guidance, dtype))
    x, c = embed(params, img, txt)
    z, captures, _ = run_blocks(params, config, c, x, modulations(params, vec), positions(config, txt_ids, img_ids),
                                lanes, iv, cap, runtime, groups=groups)
    return final_layer(params, vec, z[:, n_txt:]), captures
