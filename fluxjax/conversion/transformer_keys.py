"""Key tables: where every fluxjax transformer parameter comes from in the two checkpoint formats.

One row per parameter leaf (dotted path in `fluxjax.params.Flux2Weights`). A row gives the source
key templates (`{i}` is the block index, for stacked block parameters) and how the source tensors
become the leaf:

    linear       torch Linear weight [out, in] -> [in, out]; several keys are concatenated on the
                 `out` axis first (diffusers' separate q, k, v -> BFL's fused qkv)
    vector       copied as is (QK-norm weights [K])
    linear_swap  as linear, after swapping the two row halves: diffusers' final adaLN stores
                 (scale, shift), BFL and fluxjax (shift, scale)

The tables are the whole mapping: a key that no row names is an error, and so is a row whose key
is missing (no `strict=False` anywhere).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fluxjax.trees import leaf_name
from fluxjax.config import Flux2Config

BFL_PREFIX = "model.diffusion_model."  # some third-party single files prefix every key with this


@dataclasses.dataclass(frozen=True)
class Row:
    keys: tuple[str, ...]
    op: str  # "linear" | "vector" | "linear_swap"


def _double(stream_bfl: str, d_attn: dict, d_mlp: str) -> tuple[dict, dict]:
    """Rows of one stream of the double blocks, for both formats."""
    p = f"double_blocks.{stream_bfl}"
    bfl = {
        f"{p}_attn.qkv": Row((f"double_blocks.{{i}}.{stream_bfl}_attn.qkv.weight",), "linear"),
        f"{p}_attn.norm.query_norm": Row((f"double_blocks.{{i}}.{stream_bfl}_attn.norm.query_norm.scale",), "vector"),
        f"{p}_attn.norm.key_norm": Row((f"double_blocks.{{i}}.{stream_bfl}_attn.norm.key_norm.scale",), "vector"),
        f"{p}_attn.proj": Row((f"double_blocks.{{i}}.{stream_bfl}_attn.proj.weight",), "linear"),
        f"{p}_mlp.fc_in": Row((f"double_blocks.{{i}}.{stream_bfl}_mlp.0.weight",), "linear"),
        f"{p}_mlp.fc_out": Row((f"double_blocks.{{i}}.{stream_bfl}_mlp.2.weight",), "linear"),
    }
    t = "transformer_blocks.{i}."
    diffusers = {
        f"{p}_attn.qkv": Row(tuple(t + d_attn[n] + ".weight" for n in ("q", "k", "v")), "linear"),
        f"{p}_attn.norm.query_norm": Row((t + d_attn["norm_q"] + ".weight",), "vector"),
        f"{p}_attn.norm.key_norm": Row((t + d_attn["norm_k"] + ".weight",), "vector"),
        f"{p}_attn.proj": Row((t + d_attn["out"] + ".weight",), "linear"),
        f"{p}_mlp.fc_in": Row((t + d_mlp + ".linear_in.weight",), "linear"),
        f"{p}_mlp.fc_out": Row((t + d_mlp + ".linear_out.weight",), "linear"),
    }
    return bfl, diffusers


def _tables():
    bfl = {
        "img_in": Row(("img_in.weight",), "linear"),
        "txt_in": Row(("txt_in.weight",), "linear"),
        "time_in.in_layer": Row(("time_in.in_layer.weight",), "linear"),
        "time_in.out_layer": Row(("time_in.out_layer.weight",), "linear"),
        "guidance_in.in_layer": Row(("guidance_in.in_layer.weight",), "linear"),
        "guidance_in.out_layer": Row(("guidance_in.out_layer.weight",), "linear"),
        "double_stream_modulation_img.lin": Row(("double_stream_modulation_img.lin.weight",), "linear"),
        "double_stream_modulation_txt.lin": Row(("double_stream_modulation_txt.lin.weight",), "linear"),
        "single_stream_modulation.lin": Row(("single_stream_modulation.lin.weight",), "linear"),
        "single_blocks.linear1": Row(("single_blocks.{i}.linear1.weight",), "linear"),
        "single_blocks.linear2": Row(("single_blocks.{i}.linear2.weight",), "linear"),
        "single_blocks.norm.query_norm": Row(("single_blocks.{i}.norm.query_norm.scale",), "vector"),
        "single_blocks.norm.key_norm": Row(("single_blocks.{i}.norm.key_norm.scale",), "vector"),
        "final_layer.adaLN_modulation": Row(("final_layer.adaLN_modulation.1.weight",), "linear"),
        "final_layer.linear": Row(("final_layer.linear.weight",), "linear"),
    }
    te, ge = "time_guidance_embed.timestep_embedder", "time_guidance_embed.guidance_embedder"
    s = "single_transformer_blocks.{i}.attn."
    diffusers = {
        "img_in": Row(("x_embedder.weight",), "linear"),
        "txt_in": Row(("context_embedder.weight",), "linear"),
        "time_in.in_layer": Row((f"{te}.linear_1.weight",), "linear"),
        "time_in.out_layer": Row((f"{te}.linear_2.weight",), "linear"),
        "guidance_in.in_layer": Row((f"{ge}.linear_1.weight",), "linear"),
        "guidance_in.out_layer": Row((f"{ge}.linear_2.weight",), "linear"),
        "double_stream_modulation_img.lin": Row(("double_stream_modulation_img.linear.weight",), "linear"),
        "double_stream_modulation_txt.lin": Row(("double_stream_modulation_txt.linear.weight",), "linear"),
        "single_stream_modulation.lin": Row(("single_stream_modulation.linear.weight",), "linear"),
        "single_blocks.linear1": Row((s + "to_qkv_mlp_proj.weight",), "linear"),
        "single_blocks.linear2": Row((s + "to_out.weight",), "linear"),
        "single_blocks.norm.query_norm": Row((s + "norm_q.weight",), "vector"),
        "single_blocks.norm.key_norm": Row((s + "norm_k.weight",), "vector"),
        "final_layer.adaLN_modulation": Row(("norm_out.linear.weight",), "linear_swap"),
        "final_layer.linear": Row(("proj_out.weight",), "linear"),
    }
    img_attn = dict(q="attn.to_q", k="attn.to_k", v="attn.to_v", norm_q="attn.norm_q", norm_k="attn.norm_k",
                    out="attn.to_out.0")
    txt_attn = dict(q="attn.add_q_proj", k="attn.add_k_proj", v="attn.add_v_proj", norm_q="attn.norm_added_q",
                    norm_k="attn.norm_added_k", out="attn.to_add_out")
    for stream, d_attn, d_mlp in (("img", img_attn, "ff"), ("txt", txt_attn, "ff_context")):
        b, d = _double(stream, d_attn, d_mlp)
        bfl.update(b)
        diffusers.update(d)
    return {"bfl": bfl, "diffusers": diffusers}


TABLES = _tables()
FORMATS = tuple(TABLES)


def num_layers(config: Flux2Config, leaf: str) -> int | None:
    """Stack size of a block leaf, None for a global one."""
    if leaf.startswith("double_blocks."):
        return config.depth
    if leaf.startswith("single_blocks."):
        return config.depth_single_blocks
    return None


def rows_for(config: Flux2Config, fmt: str) -> dict[str, Row]:
    """The table of `fmt` restricted to the parameters this config has."""
    if fmt not in TABLES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    rows = TABLES[fmt]
    if not config.use_guidance_embed:
        rows = {k: v for k, v in rows.items() if not k.startswith("guidance_in.")}
    return rows


def source_keys(config: Flux2Config, leaf: str, row: Row) -> list[list[str]]:
    """Concrete source keys: one list per layer (one list in all for a global leaf)."""
    n = num_layers(config, leaf)
    if n is None:
        return [list(row.keys)]
    return [[k.format(i=i) for k in row.keys] for i in range(n)]


def expected_source_shapes(config: Flux2Config, fmt: str) -> dict[str, tuple[int, ...]]:
    """Every source key of `fmt` for `config`, with its torch-layout shape."""
    from fluxjax.params import param_shapes

    shapes = _leaf_shapes(param_shapes(config))
    out = {}
    for leaf, row in rows_for(config, fmt).items():
        shape = shapes[leaf]
        per_layer = shape[1:] if num_layers(config, leaf) is not None else shape
        for keys in source_keys(config, leaf, row):
            if row.op == "vector":
                for k in keys:
                    out[k] = tuple(per_layer)
            else:  # [in, out] leaf; sources are [out_part, in], split evenly when several
                fan_in, fan_out = per_layer
                for k in keys:
                    out[k] = (fan_out // len(keys), fan_in)
    return out


def assemble(row: Row, tensors: list[np.ndarray]) -> np.ndarray:
    """The fluxjax leaf (one layer) from the source tensors of one row, in torch layout."""
    if row.op == "vector":
        (t,) = tensors
        return t
    w = np.concatenate(tensors, axis=0) if len(tensors) > 1 else tensors[0]
    if row.op == "linear_swap":
        half = w.shape[0] // 2
        w = np.concatenate([w[half:], w[:half]], axis=0)
    return w.T


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(path): tuple(x.shape) for path, x in flat}
