"""Convert a FLUX.2 transformer checkpoint into a native fluxjax checkpoint, without torch.

Sources:
  - a diffusers transformer folder: config.json plus diffusion_pytorch_model.safetensors, or
    shards listed in diffusion_pytorch_model.safetensors.index.json. The config comes from
    config.json and is checked against the tensors.
  - a Black Forest Labs single .safetensors file (keys optionally prefixed
    `model.diffusion_model.`). The config is inferred from the tensor shapes (below), or given.

What the shapes say: D, in/out channels, C and the timestep width from the embedders; the head dim
K from the QK-norm weights, so heads = D / K; M from the MLP output projection; the depths from
the block indices; the guidance embedder from its presence. The RoPE split and theta have no
weights: they are taken as in every released model (4 equal axes summing to K, theta 2000); give a
config for anything else.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from fluxjax.conversion.safetensors_io import INDEX_NAME, SafetensorsFile, ShardedSafetensors, refuse_pickle
from fluxjax.conversion.transformer import check_state, leaves_from_state
from fluxjax.conversion.transformer_keys import BFL_PREFIX, TABLES
from fluxjax.checkpoint import CheckpointError, check_destination, config_from_json, read_json, write_checkpoint
from fluxjax.config import PRESETS, Flux2Config

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "fp32": np.dtype(np.float32), "float32": np.dtype(np.float32)}  # conversion targets
DEFAULT_THETA = 2000


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened checkpoint: its format, lazy tensors and (diffusers) parsed config.json."""

    fmt: str  # "bfl" | "diffusers"
    state: Mapping  # lazy key -> np.ndarray, with `.shapes` and `.dtypes`
    where: str  # the path named in error messages
    config_json: dict | None = None
    config_path: str | None = None


def convert_transformer(src: str | os.PathLike, dst: str | os.PathLike, config: Flux2Config | str | None = None,
                        dtype=None, *, overwrite: bool = False, progress: bool = False) -> Flux2Config:
    """Convert `src` (diffusers folder or BFL .safetensors) into a native checkpoint at `dst`.

    config: a Flux2Config, a preset name ("dev", "klein-9b", "klein-4b") or a JSON file of
        Flux2Config fields; it must agree with the checkpoint. None: from config.json (diffusers)
        or inferred from the shapes (BFL).
    dtype: "bf16" / "fp32" (or a numpy/jax dtype); None keeps the stored dtype.
    overwrite: replace an existing fluxjax checkpoint at `dst`.
    progress: show a progress bar (tqdm) over the bytes converted.
    Returns the config. Raises CheckpointError (naming the file and key) on any mismatch. Every key
    and shape is checked before any tensor is read; parameters then stream, one at a time, into a
    temporary directory next to `dst` that is renamed into place only when complete.
    """
    dst = os.path.abspath(os.fspath(dst))
    out_dtype = _dtype(dtype)
    source = open_source(src)
    config = resolve_config(source, config)
    check_state(source.state.shapes, config, source.fmt, source.where)
    check_destination(dst, overwrite)
    total = sum(source.state.nbytes(k) for k in source.state)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None if progress else True) as bar:
        leaves = leaves_from_state(source.state, config, source.fmt, out_dtype, source.where, progress=bar)
        write_checkpoint(dst, config, leaves, overwrite=overwrite)
    return config


def _dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if np.dtype(dtype) not in DTYPES.values():
        raise ValueError(f"unsupported target dtype {np.dtype(dtype).name}; use bf16 or fp32")
    return np.dtype(dtype)


# --- opening a source ------------------------------------------------------------------------

def open_source(src: str | os.PathLike) -> Source:
    """Open a diffusers transformer folder or a single safetensors file (BFL or diffusers keys)."""
    src = os.path.abspath(os.fspath(src))
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        return _open_diffusers_folder(src)
    state = SafetensorsFile(src)
    state = _strip_prefix(state, src)
    fmt = _detect_format(state, src)
    return Source(fmt, state, src)


def _open_diffusers_folder(folder: str) -> Source:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        hint = (f"; this looks like a pipeline folder, pass {os.path.join(folder, 'transformer')}"
                if os.path.isfile(os.path.join(folder, "transformer", "config.json")) else "")
        raise CheckpointError(f"{config_path}: missing; a diffusers transformer folder holds config.json and "
                              f"{SAFETENSORS_NAME}{hint}")
    index, single = os.path.join(folder, INDEX_NAME), os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(index) and os.path.isfile(single):
        raise CheckpointError(f"{folder}: holds both {SAFETENSORS_NAME} and {INDEX_NAME}; remove the stale one")
    if os.path.isfile(index):
        state = ShardedSafetensors(index)
    elif os.path.isfile(single):
        state = SafetensorsFile(single)
    else:
        for name in sorted(os.listdir(folder)):
            if name.startswith("diffusion_pytorch_model"):
                refuse_pickle(os.path.join(folder, name))
        raise CheckpointError(f"{folder}: no {SAFETENSORS_NAME} or {INDEX_NAME} in this folder")
    config_json = read_json(config_path)
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{config_path}: must be a JSON object")
    fmt = _detect_format(state, state.path)
    if fmt != "diffusers":
        raise CheckpointError(f"{state.path}: holds Black Forest Labs keys (e.g. {next(iter(state))!r}) but sits in "
                              f"a diffusers folder; pass the .safetensors file itself")
    return Source(fmt, state, state.path, config_json, config_path)


class _Unprefixed(Mapping):
    """A view of a lazy state with `BFL_PREFIX` removed from every key."""

    def __init__(self, state, prefix: str):
        self._state, self._prefix = state, prefix
        self.path = state.path

    @property
    def shapes(self):
        return {k[len(self._prefix):]: v for k, v in self._state.shapes.items()}

    @property
    def dtypes(self):
        return {k[len(self._prefix):]: v for k, v in self._state.dtypes.items()}

    def nbytes(self, key):
        return self._state.nbytes(self._prefix + key)

    def __getitem__(self, key):
        return self._state[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self._prefix):] for k in self._state)

    def __len__(self):
        return len(self._state)


def _strip_prefix(state, where: str):
    prefixed = [k.startswith(BFL_PREFIX) for k in state]
    if not any(prefixed):
        return state
    if not all(prefixed):
        odd = next(k for k, p in zip(state, prefixed) if not p)
        raise CheckpointError(f"{where}: key {odd!r} lacks the {BFL_PREFIX!r} prefix that other keys carry; "
                              f"a file must use it on every key or none")
    return _Unprefixed(state, BFL_PREFIX)


def _detect_format(state, where: str) -> str:
    marks = {fmt: _key(fmt, "img_in") for fmt in TABLES}
    found = [fmt for fmt, key in marks.items() if key in state]
    if len(found) != 1:
        raise CheckpointError(f"{where}: not a FLUX.2 transformer: expected key {marks['bfl']!r} (Black Forest "
                              f"Labs) or {marks['diffusers']!r} (diffusers), found "
                              f"{'both' if found else 'neither'} (first keys: {sorted(state)[:3]})")
    return found[0]


# --- configs ---------------------------------------------------------------------------------

def _key(fmt: str, leaf: str, i: int = 0) -> str:
    """The first source key of a table row, for block `i`."""
    return TABLES[fmt][leaf].keys[0].format(i=i)


def _block_pattern(fmt: str, leaf: str) -> str:
    """e.g. 'double_blocks.N.*': how a block's keys start."""
    return TABLES[fmt][leaf].keys[0].split("{i}")[0] + "N.*"


def _block_count(fmt: str, leaf: str, shapes: Mapping) -> int:
    """1 + the highest block index seen (gaps then show up as missing keys)."""
    prefix = TABLES[fmt][leaf].keys[0].split("{i}")[0]
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in shapes if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def infer_config(shapes: Mapping[str, tuple[int, ...]], fmt: str, where: str = "checkpoint"
                 ) -> tuple[Flux2Config, dict[str, str]]:
    """Config from tensor shapes alone -> (config, {field: the key it was read from})."""
    def shape(leaf):
        key = _key(fmt, leaf)
        if key not in shapes:
            raise CheckpointError(f"{where}: missing key {key!r}, needed to infer the config")
        return key, tuple(shapes[key])

    provenance = {}
    k, (D, in_channels) = shape("img_in")
    provenance.update(hidden_size=k, in_channels=k)
    k, (_, C) = shape("txt_in")
    provenance["context_in_dim"] = k
    k, (_, t_channels) = shape("time_in.in_layer")
    provenance["timestep_channels"] = k
    k, (out_channels, _) = shape("final_layer.linear")
    provenance["out_channels"] = k
    depth = _block_count(fmt, "double_blocks.img_attn.qkv", shapes)
    single = _block_count(fmt, "single_blocks.linear1", shapes)
    provenance.update(depth=_block_pattern(fmt, "double_blocks.img_attn.qkv"),
                  depth_single_blocks=_block_pattern(fmt, "single_blocks.linear1"))
    if depth:
        k, (K,) = shape("double_blocks.img_attn.norm.query_norm")
        k2, (_, M) = shape("double_blocks.img_mlp.fc_out")
    elif single:
        k, (K,) = shape("single_blocks.norm.query_norm")
        k2, (_, DM) = shape("single_blocks.linear2")
        M = DM - D
    else:
        raise CheckpointError(f"{where}: no transformer blocks found; cannot infer the head dim")
    provenance.update(num_heads=k, mlp_ratio=k2)
    if K <= 0 or D % K:
        raise CheckpointError(f"{where}: key {k!r} gives head dim {K}, which does not divide the width {D}")
    if K % 8:
        raise CheckpointError(f"{where}: head dim {K} (key {k!r}) cannot be split into 4 even RoPE axes; "
                              f"give the config explicitly")
    guidance = _key(fmt, "guidance_in.in_layer") in shapes
    provenance["use_guidance_embed"] = _key(fmt, "guidance_in.in_layer")
    try:
        config = Flux2Config(in_channels=in_channels, context_in_dim=C, hidden_size=D, num_heads=D // K, depth=depth,
                             depth_single_blocks=single, axes_dim=(K // 4,) * 4, theta=DEFAULT_THETA,
                             mlp_ratio=M / D, use_guidance_embed=guidance,
                             out_channels=None if out_channels == in_channels else out_channels,
                             timestep_channels=t_channels)
    except ValueError as e:
        raise CheckpointError(f"{where}: the tensor shapes give no valid config ({e})") from None
    if config.mlp_hidden != M:
        raise CheckpointError(f"{where}: key {k2!r} gives MLP width {M}, which no mlp_ratio reproduces at width {D}")
    return config, provenance


# diffusers config.json field -> Flux2Config field (hidden_size is heads x head dim)
_DIFFUSERS_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "num_layers": "depth",
    "num_single_layers": "depth_single_blocks", "num_attention_heads": "num_heads",
    "joint_attention_dim": "context_in_dim", "timestep_guidance_channels": "timestep_channels",
    "mlp_ratio": "mlp_ratio", "axes_dims_rope": "axes_dim", "rope_theta": "theta",
    "guidance_embeds": "use_guidance_embed",
}
_DIFFUSERS_DEFAULTS = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
                           attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                           timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                           rope_theta=2000, eps=1e-6, guidance_embeds=True)  # Flux2Transformer2DModel.__init__


def config_from_diffusers(cfg: Mapping, where: str = "config.json") -> Flux2Config:
    """Flux2Config of a diffusers `Flux2Transformer2DModel` config.json (absent fields: diffusers' defaults)."""
    name = cfg.get("_class_name", "Flux2Transformer2DModel")
    if name != "Flux2Transformer2DModel":
        raise CheckpointError(f"{where}: key '_class_name' is {name!r}, not 'Flux2Transformer2DModel'")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DIFFUSERS_DEFAULTS}}
    if c["patch_size"] != 1:
        raise CheckpointError(f"{where}: key 'patch_size' is {c['patch_size']}; FLUX.2 patchifies outside the "
                              f"transformer (patch_size 1)")
    if c["eps"] != 1e-6:
        raise CheckpointError(f"{where}: key 'eps' is {c['eps']}; fluxjax implements FLUX.2's 1e-6")
    fields = {ours: c[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items()}
    fields["hidden_size"] = c["num_attention_heads"] * c["attention_head_dim"]
    if fields["out_channels"] == fields["in_channels"]:
        fields["out_channels"] = None
    fields["axes_dim"] = tuple(fields["axes_dim"])
    return config_from_json(fields, where)


def named_config(config: Flux2Config | str) -> Flux2Config:
    """A Flux2Config, a preset name or a JSON file of Flux2Config fields."""
    if isinstance(config, Flux2Config):
        return config
    if config in PRESETS:
        return PRESETS[config]
    if isinstance(config, str) and os.path.isfile(config):
        fields = read_json(config)
        if not isinstance(fields, dict):
            raise CheckpointError(f"{config}: must be a JSON object of Flux2Config fields")
        fields = dict(fields.get("config", fields))  # a native checkpoint's JSON works too
        if "axes_dim" in fields:
            fields["axes_dim"] = tuple(fields["axes_dim"])
        return config_from_json(fields, config)
    raise ValueError(f"unknown config {config!r}; use one of {sorted(PRESETS)} or a JSON file of Flux2Config fields")


def preset_name(config: Flux2Config) -> str | None:
    return next((name for name, preset in PRESETS.items() if preset == config), None)


def _disagreement(config: Flux2Config, inferred: Flux2Config, provenance: dict[str, str], label: str,
                  where: str) -> None:
    for f in dataclasses.fields(Flux2Config):
        if f.name in provenance and getattr(config, f.name) != getattr(inferred, f.name):
            raise CheckpointError(f"{label} gives {f.name}={getattr(config, f.name)!r} but the tensors in {where} "
                                  f"say {getattr(inferred, f.name)!r} (from {provenance[f.name]!r})")


def resolve_config(source: Source, config: Flux2Config | str | None = None) -> Flux2Config:
    """The config to convert with, checked against the tensors' shapes (and config.json)."""
    inferred, provenance = infer_config(source.state.shapes, source.fmt, source.where)
    if source.config_json is not None:
        from_json = config_from_diffusers(source.config_json, source.config_path)
        _disagreement(from_json, inferred, provenance, source.config_path, source.where)
        if config is not None and named_config(config) != from_json:
            given = named_config(config)
            diff = next(f.name for f in dataclasses.fields(Flux2Config)
                        if getattr(given, f.name) != getattr(from_json, f.name))
            raise CheckpointError(f"{source.config_path}: gives {diff}={getattr(from_json, diff)!r} but the config "
                                  f"asked for has {getattr(given, diff)!r}")
        return from_json
    if config is None:
        return inferred
    config = named_config(config)
    _disagreement(config, inferred, provenance, "the config asked for", source.where)
    return config
