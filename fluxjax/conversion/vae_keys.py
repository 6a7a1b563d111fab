"""Key tables: where every fluxjax autoencoder parameter comes from in the two checkpoint formats.

`module_table(config)` lists each module of `fluxjax.vae.VAEParams` once, with its name in BFL's
`ae.safetensors` (LDM naming) and in a diffusers `vae/` folder, side by side:

    fluxjax                       BFL ae.safetensors                diffusers vae/
    encoder.down.{i}.block.{j}    encoder.down.{i}.block.{j}        encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample   encoder.down.{i}.downsample.conv  encoder.down_blocks.{i}.downsamplers.0.conv
    encoder.mid.block_1 / _2      encoder.mid.block_1 / _2          encoder.mid_block.resnets.0 / 1
    encoder.mid.attn_1.q/k/v      encoder.mid.attn_1.q/k/v          encoder.mid_block.attentions.0.to_q/k/v
    encoder.quant_conv            encoder.quant_conv                quant_conv
    decoder.post_quant_conv       decoder.post_quant_conv           post_quant_conv
    decoder.up.{i}                decoder.up.{i}                    decoder.up_blocks.{n-1-i}
    {en,de}coder.norm_out         {en,de}coder.norm_out             {en,de}coder.conv_norm_out
    bn.running_mean / _var        bn.running_mean / _var            bn.running_mean / _var

Each module kind expands into its parameter rows. Ops turning a torch tensor into the fluxjax leaf:

    conv      Conv2d weight [out, in, kh, kw] -> [kh, kw, in, out] (HWIO)
    conv1x1   BFL attention q/k/v/proj_out, a 1x1 Conv2d [out, in, 1, 1] -> [in, out]
    linear    diffusers attention to_q/k/v/to_out.0, a Linear [out, in] -> [in, out]
    vector    copied as is (biases, GroupNorm weights, running statistics)

The tables are the whole mapping: a key no row names is an error, and so is a row whose key is
missing. The one tolerated extra is BatchNorm's step counter (`OPTIONAL_KEYS`), which eval-mode
normalisation never reads.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fluxjax.trees import leaf_name
from fluxjax.vae import VAEConfig, vae_param_shapes

FORMATS = ("bfl", "diffusers")
OPTIONAL_KEYS = ("bn.num_batches_tracked",)  # torch BatchNorm2d buffer, [] int64; unused in eval mode


@dataclasses.dataclass(frozen=True)
class Module:
    leaf: str  # dotted module path in VAEParams
    bfl: str
    diffusers: str
    kind: str  # "conv" | "norm" | "resnet" | "attn" | "bn"


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    op: str  # "conv" | "conv1x1" | "linear" | "vector"


def module_table(config: VAEConfig) -> list[Module]:
    """Every module of a VAE of `config`, in forward order."""
    n = config.num_levels
    rows = []

    def mid(part):
        rows.append(Module(f"{part}.mid.block_1", f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "resnet"))
        if config.mid_block_add_attention:
            rows.append(Module(f"{part}.mid.attn_1", f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "attn"))
        rows.append(Module(f"{part}.mid.block_2", f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "resnet"))

    rows.append(Module("encoder.conv_in", "encoder.conv_in", "encoder.conv_in", "conv"))
    for i in range(n):
        for j in range(config.layers_per_block):
            name = f"encoder.down.{i}.block.{j}"
            rows.append(Module(name, name, f"encoder.down_blocks.{i}.resnets.{j}", "resnet"))
        if i != n - 1:
            rows.append(Module(f"encoder.down.{i}.downsample", f"encoder.down.{i}.downsample.conv",
                               f"encoder.down_blocks.{i}.downsamplers.0.conv", "conv"))
    mid("encoder")
    rows.append(Module("encoder.norm_out", "encoder.norm_out", "encoder.conv_norm_out", "norm"))
    rows.append(Module("encoder.conv_out", "encoder.conv_out", "encoder.conv_out", "conv"))
    if config.use_quant_conv:
        rows.append(Module("encoder.quant_conv", "encoder.quant_conv", "quant_conv", "conv"))

    if config.use_post_quant_conv:
        rows.append(Module("decoder.post_quant_conv", "decoder.post_quant_conv", "post_quant_conv", "conv"))
    rows.append(Module("decoder.conv_in", "decoder.conv_in", "decoder.conv_in", "conv"))
    mid("decoder")
    for i in reversed(range(n)):
        d = f"decoder.up_blocks.{n - 1 - i}"
        for j in range(config.layers_per_block + 1):
            name = f"decoder.up.{i}.block.{j}"
            rows.append(Module(name, name, f"{d}.resnets.{j}", "resnet"))
        if i != 0:
            rows.append(Module(f"decoder.up.{i}.upsample", f"decoder.up.{i}.upsample.conv", f"{d}.upsamplers.0.conv",
                               "conv"))
    rows.append(Module("decoder.norm_out", "decoder.norm_out", "decoder.conv_norm_out", "norm"))
    rows.append(Module("decoder.conv_out", "decoder.conv_out", "decoder.conv_out", "conv"))
    rows.append(Module("bn", "bn", "bn", "bn"))
    return rows


def _conv(leaf: str, src: str) -> dict[str, Row]:
    return {f"{leaf}.kernel": Row(f"{src}.weight", "conv"), f"{leaf}.bias": Row(f"{src}.bias", "vector")}


def _norm(leaf: str, src: str) -> dict[str, Row]:
    return {f"{leaf}.weight": Row(f"{src}.weight", "vector"), f"{leaf}.bias": Row(f"{src}.bias", "vector")}


def _dense(leaf: str, src: str, op: str) -> dict[str, Row]:
    return {f"{leaf}.kernel": Row(f"{src}.weight", op), f"{leaf}.bias": Row(f"{src}.bias", "vector")}


def _expand(m: Module, fmt: str, has_shortcut: set[str]) -> dict[str, Row]:
    """Parameter rows (leaf -> Row) of one module."""
    src, d = getattr(m, fmt), fmt == "diffusers"
    if m.kind == "conv":
        return _conv(m.leaf, src)
    if m.kind == "norm":
        return _norm(m.leaf, src)
    if m.kind == "bn":
        return {f"{m.leaf}.{s}": Row(f"{src}.{s}", "vector") for s in ("running_mean", "running_var")}
    if m.kind == "resnet":
        rows = {**_norm(f"{m.leaf}.norm1", f"{src}.norm1"), **_conv(f"{m.leaf}.conv1", f"{src}.conv1"),
                **_norm(f"{m.leaf}.norm2", f"{src}.norm2"), **_conv(f"{m.leaf}.conv2", f"{src}.conv2")}
        if m.leaf in has_shortcut:
            rows.update(_conv(f"{m.leaf}.nin_shortcut", f"{src}.{'conv_shortcut' if d else 'nin_shortcut'}"))
        return rows
    if m.kind == "attn":
        rows = _norm(f"{m.leaf}.norm", f"{src}.{'group_norm' if d else 'norm'}")
        for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            rows.update(_dense(f"{m.leaf}.{ours}", f"{src}.{theirs if d else ours}", "linear" if d else "conv1x1"))
        return rows
    raise ValueError(f"unknown module kind {m.kind!r}")


def rows_for(config: VAEConfig, fmt: str) -> dict[str, Row]:
    """leaf name (e.g. 'encoder.down.1.block.0.conv1.kernel') -> Row, for every leaf of `config`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown VAE checkpoint format {fmt!r}; expected one of {FORMATS}")
    shortcuts = {name.rsplit(".nin_shortcut.", 1)[0] for name in leaf_shapes(config) if ".nin_shortcut." in name}
    rows = {}
    for m in module_table(config):
        rows.update(_expand(m, fmt, shortcuts))
    return rows


def torch_shape(leaf_shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    """The torch-layout shape a source tensor must have to become a leaf of `leaf_shape`."""
    if op == "conv":
        kh, kw, cin, cout = leaf_shape
        return cout, cin, kh, kw
    if op == "conv1x1":
        cin, cout = leaf_shape
        return cout, cin, 1, 1
    if op == "linear":
        cin, cout = leaf_shape
        return cout, cin
    return tuple(leaf_shape)


def to_leaf(tensor: np.ndarray, op: str) -> np.ndarray:
    """The fluxjax leaf from a source tensor in torch layout."""
    if op == "conv":
        return tensor.transpose(2, 3, 1, 0)
    if op == "conv1x1":
        return tensor[:, :, 0, 0].T
    if op == "linear":
        return tensor.T
    return tensor


def expected_source_shapes(config: VAEConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Every required source key of `fmt` for `config`, with its torch-layout shape."""
    shapes = leaf_shapes(config)
    return {row.key: torch_shape(shapes[leaf], row.op) for leaf, row in rows_for(config, fmt).items()}


def leaf_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(vae_param_shapes(config))
    return {leaf_name(path): tuple(x.shape) for path, x in flat}
