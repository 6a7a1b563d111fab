"""Checkpoint conversion: bad input is refused with the file and key named and nothing left behind;
sharded folders, config inference and the native format's round trip work.

Diffusers folders here are written without torch (config.json + safetensors of random tensors with
the diffusers key set); real `save_pretrained` folders are covered by test_parity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, diffusers_kwargs, random_state
from safetensors.numpy import save_file
from testenv import host_devices

import fluxjax
from fluxjax.conversion.__main__ import main as cli_main
from fluxjax.conversion.convert import convert_transformer, infer_config, preset_name
from fluxjax.conversion.safetensors_io import SafetensorsFile, ShardedSafetensors, write_safetensors
from fluxjax.conversion.transformer import params_from_state
from fluxjax.conversion.transformer_keys import BFL_PREFIX, expected_source_shapes
from fluxjax.checkpoint import CONFIG_FILE, CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = "transformer_blocks.1.attn.to_k.weight"  # a key to break


def diffusers_folder(path, state, config=TINY, **overrides):
    """A diffusers transformer folder: config.json (as save_pretrained writes it) and one safetensors file."""
    os.makedirs(path, exist_ok=True)
    cfg = {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.42.1", "eps": 1e-6,
           **diffusers_kwargs(config), **overrides}
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def state():
    return random_state(expected_source_shapes(TINY, "diffusers"), seed=5)


@pytest.fixture(scope="module")
def good(tmp_path_factory, state):
    """A valid folder and its native conversion."""
    root = tmp_path_factory.mktemp("good")
    src = diffusers_folder(root / "src", state)
    convert_transformer(src, root / "native")
    return src, root / "native"


def refused(src, dst, *names, config=None, extra_args=()):
    """Both the function and the CLI refuse `src`, naming every string in `names`; DST stays absent."""
    with pytest.raises(CheckpointError) as err:
        convert_transformer(src, dst, config)
    for name in names:
        assert name in str(err.value), (name, str(err.value))
    assert not os.path.exists(dst)
    args = [str(src), str(dst), "--quiet", *extra_args] + ([] if config is None else ["--config", config])
    assert cli_main(args) == 1
    assert not os.path.exists(dst)
    leftovers = [n for n in os.listdir(os.path.dirname(dst)) if n.startswith(f".{os.path.basename(dst)}.")]
    assert not leftovers
    return str(err.value)


# --- bad tensors -----------------------------------------------------------------------------

def test_missing_key(tmp_path, state):
    bad = {k: v for k, v in state.items() if k != KEY}
    src = diffusers_folder(tmp_path / "src", bad)
    refused(src, tmp_path / "dst", KEY, "missing", "diffusion_pytorch_model.safetensors")


def test_unexpected_key(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", {**state, "transformer_blocks.0.attn.to_q.bias": np.zeros(64, np.float32)})
    refused(src, tmp_path / "dst", "transformer_blocks.0.attn.to_q.bias", "unexpected",
            "diffusion_pytorch_model.safetensors")


def test_wrong_shape(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", {**state, KEY: state[KEY][:32]})
    refused(src, tmp_path / "dst", KEY, "(32, 64)", "diffusion_pytorch_model.safetensors")


def test_integer_tensor_is_refused(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", {**state, KEY: state[KEY].astype(np.int32)})
    refused(src, tmp_path / "dst", KEY, "int32")


# --- corrupt safetensors ---------------------------------------------------------------------

def test_truncated_file(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state)
    path = src / "diffusion_pytorch_model.safetensors"
    os.truncate(path, os.path.getsize(path) - 10)
    refused(src, tmp_path / "dst", str(path), "truncated")


def test_truncated_inside_the_header(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state)
    path = src / "diffusion_pytorch_model.safetensors"
    os.truncate(path, 100)
    refused(src, tmp_path / "dst", str(path), "header length")


def rewrite_header(path, edit):
    """Apply `edit` to the parsed header of a safetensors file and write it back (data unchanged)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header = edit(header)
    new = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def shift_offsets(header, key, delta):
    header[key]["data_offsets"] = [o + delta for o in header[key]["data_offsets"]]
    return header


@pytest.mark.parametrize("case, edit, words", [
    ("not json", lambda h: b"{not json", ["not valid JSON"]),
    ("unknown dtype", lambda h: {**h, KEY: {**h[KEY], "dtype": "F17"}}, [KEY, "F17"]),
    ("shape vs bytes", lambda h: {**h, KEY: {**h[KEY], "shape": [64, 65]}}, [KEY, "[64, 65]"]),
    ("overlap", lambda h: shift_offsets(h, KEY, -4), [KEY, "overlaps"]),
    ("negative shape", lambda h: {**h, KEY: {**h[KEY], "shape": [-64, -64]}}, [KEY, "non-negative"]),
    ("extra field", lambda h: {**h, KEY: {**h[KEY], "foo": 1}}, [KEY, "exactly"]),
])
def test_corrupt_header(tmp_path, state, case, edit, words):
    src = diffusers_folder(tmp_path / "src", state)
    path = src / "diffusion_pytorch_model.safetensors"
    rewrite_header(path, edit)
    refused(src, tmp_path / "dst", str(path), *words)


def test_duplicate_key_and_trailing_bytes(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state)
    path = src / "diffusion_pytorch_model.safetensors"
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8:8 + n].decode().rstrip()
    dup = text[:-1] + "," + json.dumps(KEY) + ":" + json.dumps(json.loads(text)[KEY]) + "}"
    with open(path, "wb") as f:
        f.write(len(dup).to_bytes(8, "little") + dup.encode() + raw[8 + n:])
    refused(src, tmp_path / "dst", KEY, "twice")
    with open(path, "wb") as f:
        f.write(raw + b"\0" * 16)
    refused(src, tmp_path / "dst", str(path), "16 bytes after")


# --- pickles, paths ----------------------------------------------------------------------------

class Trap:
    """Unpickling this creates a marker file: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.ckpt", "model.pth", "model.safetensors"])
def test_pickle_checkpoint_is_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Trap(marker), protocol=4))
    refused(path, tmp_path / "dst", str(path), "pickle")
    assert not marker.exists()


def test_safetensors_whose_header_length_looks_like_pickle_magic(tmp_path):
    """A header of 0x380 bytes starts the file with 0x80 0x03, pickle protocol 3's opening."""
    path = tmp_path / "f.safetensors"
    for k in range(1000):
        write_safetensors(path, [("w", np.ones((2, 2), np.float32))], metadata={"pad": "x" * k})
        if path.read_bytes()[:2] == b"\x80\x03":
            break
    assert path.read_bytes()[:2] == b"\x80\x03"
    np.testing.assert_array_equal(SafetensorsFile(path)["w"], np.ones((2, 2), np.float32))


def test_torch_zip_checkpoint_is_refused_by_magic(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    refused(path, tmp_path / "dst", str(path), "pickle")


def test_diffusers_folder_with_only_a_pickle(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state)
    os.remove(src / "diffusion_pytorch_model.safetensors")
    (src / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Trap(tmp_path / "unpickled")))
    refused(src, tmp_path / "dst", "diffusion_pytorch_model.bin", "pickle")
    assert not (tmp_path / "unpickled").exists()


def test_missing_path(tmp_path):
    refused(tmp_path / "nowhere", tmp_path / "dst", str(tmp_path / "nowhere"), "no such")


def test_folder_without_config_json(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state)
    os.remove(src / "config.json")
    refused(src, tmp_path / "dst", "config.json", "missing")


# --- configs that disagree with the tensors ------------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("num_layers", 3, ["depth=3", "transformer_blocks.N.*"]),
    ("num_attention_heads", 4, ["hidden_size=128", "x_embedder.weight"]),
    ("joint_attention_dim", 32, ["context_in_dim=32", "context_embedder.weight"]),
    ("guidance_embeds", False, ["use_guidance_embed=False", "guidance_embedder"]),
])
def test_config_json_disagreeing_with_the_tensors(tmp_path, state, field, value, words):
    src = diffusers_folder(tmp_path / "src", state, **{field: value})
    refused(src, tmp_path / "dst", str(src / "config.json"), *words)


def test_unsupported_config_json_values(tmp_path, state):
    src = diffusers_folder(tmp_path / "src", state, patch_size=2)
    refused(src, tmp_path / "dst", "config.json", "patch_size")
    src = diffusers_folder(tmp_path / "src2", state, _class_name="FluxTransformer2DModel")
    refused(src, tmp_path / "dst", "config.json", "_class_name")


def test_explicit_config_must_agree(tmp_path, good):
    src, _ = good
    refused(src, tmp_path / "dst", "config.json", config="klein-4b")
    bfl = tmp_path / "flux2.safetensors"
    save_file(random_state(expected_source_shapes(TINY, "bfl"), seed=2), str(bfl))
    refused(bfl, tmp_path / "dst", "in_channels=128", "img_in.weight", str(bfl), config="klein-4b")


def test_bfl_prefix_on_some_keys_only(tmp_path):
    state = random_state(expected_source_shapes(TINY, "bfl"), seed=2)
    state = {(BFL_PREFIX + k if k.startswith("double") else k): v for k, v in state.items()}
    save_file(state, str(tmp_path / "f.safetensors"))
    refused(tmp_path / "f.safetensors", tmp_path / "dst", BFL_PREFIX, "lacks", "final_layer.adaLN_modulation.1.weight")


def test_bfl_config_given_as_json_file(tmp_path):
    config = dataclasses.replace(TINY, theta=1000, axes_dim=(4, 12, 8, 8))  # not inferable from weights
    state = random_state(expected_source_shapes(config, "bfl"), seed=2)
    save_file(state, str(tmp_path / "f.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"theta": 1000, "axes_dim": [4, 12, 8, 8], **{k: getattr(TINY, k) for k in (
            "in_channels", "context_in_dim", "hidden_size", "num_heads", "depth", "depth_single_blocks")}}, f)
    assert cli_main([str(tmp_path / "f.safetensors"), str(tmp_path / "dst"), "--quiet",
                     "--config", str(tmp_path / "config.json")]) == 0
    assert fluxjax.checkpoint.read_config(tmp_path / "dst") == config


# --- config inference --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dev", "klein-9b", "klein-4b"])
@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
def test_inference_recognises_the_released_models(name, fmt):
    """From shapes alone (what a header gives), without allocating a tensor."""
    shapes = expected_source_shapes(fluxjax.PRESETS[name], fmt)
    config, _ = infer_config(shapes, fmt)
    assert preset_name(config) == name
    assert config == fluxjax.PRESETS[name]


def test_inference_reads_a_real_header(tmp_path):
    config = dataclasses.replace(TINY, depth=1, depth_single_blocks=2, use_guidance_embed=False, out_channels=8)
    save_file(random_state(expected_source_shapes(config, "bfl")), str(tmp_path / "f.safetensors"))
    inferred, _ = infer_config(SafetensorsFile(tmp_path / "f.safetensors").shapes, "bfl")
    assert inferred == config


def test_own_writer_round_trips_through_the_reference_reader(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
              "c": np.arange(6, dtype=np.float16).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "w.safetensors", arrays.items())
    ours, theirs = SafetensorsFile(tmp_path / "w.safetensors"), load_file(str(tmp_path / "w.safetensors"))
    for k, v in arrays.items():
        assert ours[k].dtype == v.dtype and theirs[k].shape == v.shape
        np.testing.assert_array_equal(ours[k], v)
        np.testing.assert_array_equal(theirs[k].view(np.uint8), v.view(np.uint8))


# --- good paths --------------------------------------------------------------------------------

def leaves(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_sharded_folder_matches_single_file(tmp_path, state, good):
    from safetensors.numpy import save_file as save

    _, native = good
    src = tmp_path / "sharded"
    os.makedirs(src)
    with open(good[0] / "config.json") as f:
        cfg = f.read()
    (src / "config.json").write_text(cfg)
    keys = sorted(state)
    parts = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        save({k: state[k] for k in part}, str(src / name))
        weight_map.update({k: name for k in part})
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    assert len(ShardedSafetensors(index)) == len(state)
    convert_transformer(src, tmp_path / "native")
    for a, b in zip(leaves(fluxjax.load_transformer(tmp_path / "native")[1]), leaves(fluxjax.load_transformer(native)[1])):
        np.testing.assert_array_equal(a, b)

    weight_map[keys[0]] = "diffusion_pytorch_model-00002-of-00003.safetensors"  # it lives in shard 1
    index.write_text(json.dumps({"weight_map": weight_map}))
    refused(src, tmp_path / "dst", keys[0], str(index))


def test_bf16_file_keeps_its_dtype_and_values(tmp_path):
    import ml_dtypes

    config = dataclasses.replace(TINY, use_guidance_embed=False)
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_state(expected_source_shapes(config, "bfl")).items()}
    write_safetensors(tmp_path / "f.safetensors", state.items())
    convert_transformer(tmp_path / "f.safetensors", tmp_path / "native")
    _, params = fluxjax.load_transformer(tmp_path / "native")
    np.testing.assert_array_equal(np.asarray(params.img_in), state["img_in.weight"].T)
    np.testing.assert_array_equal(np.asarray(params.single_blocks.linear1[2]), state["single_blocks.2.linear1.weight"].T)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_destination_is_never_clobbered(tmp_path, good):
    src, native = good
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_transformer(src, dst)
    assert cli_main([str(src), str(dst), "--quiet"]) == 1
    with pytest.raises(CheckpointError, match="not a fluxjax checkpoint"):
        convert_transformer(src, dst, overwrite=True)
    assert (dst / "precious.txt").read_text() == "keep me"
    assert cli_main([str(src), str(tmp_path / "new"), "--quiet"]) == 0
    assert cli_main([str(src), str(tmp_path / "new"), "--quiet", "--dtype", "bf16"]) == 1
    assert cli_main([str(src), str(tmp_path / "new"), "--quiet", "--dtype", "bf16", "--overwrite"]) == 0
    config, params = fluxjax.load_transformer(tmp_path / "new")
    assert config == TINY and {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert sorted(os.listdir(tmp_path)) == ["dst", "new"]


def test_failure_midway_leaves_nothing(tmp_path, good, monkeypatch):
    src, _ = good
    calls = {"n": 0}
    real = SafetensorsFile.__getitem__

    def failing(self, key):
        calls["n"] += 1
        if calls["n"] == 20:
            raise CheckpointError(f"{self.path}: key {key!r}: simulated read error")
        return real(self, key)

    monkeypatch.setattr(SafetensorsFile, "__getitem__", failing)
    with pytest.raises(CheckpointError, match="simulated"):
        convert_transformer(src, tmp_path / "dst")
    assert os.listdir(tmp_path) == []


@pytest.mark.processes
def test_cli_process_exit_codes(tmp_path, good):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "conversion", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    done = run(tmp_path / "missing", tmp_path / "dst")
    assert done.returncode == 1 and "missing" in done.stderr and "error:" in done.stderr
    assert run(good[0]).returncode == 2  # usage
    done = run(good[0], tmp_path / "dst", "--quiet")
    assert done.returncode == 0 and "wrote" in done.stdout
    assert not os.path.exists(tmp_path / "missing")


# --- the native format ---------------------------------------------------------------------------

def test_native_round_trip_and_errors(tmp_path):
    params = params_from_state(random_state(expected_source_shapes(TINY, "bfl"), seed=1), TINY, "bfl")
    fluxjax.save_transformer(tmp_path / "ck", TINY, params)
    config, loaded = fluxjax.load_transformer(tmp_path / "ck")
    assert config == TINY
    for a, b in zip(leaves(params), leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    fluxjax.save_transformer(tmp_path / "from-jax", TINY, loaded)  # jax arrays save as well
    for a, b in zip(leaves(params), leaves(fluxjax.load_transformer(tmp_path / "from-jax")[1]), strict=True):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        fluxjax.load_transformer(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        fluxjax.load_transformer(tmp_path)
    meta = json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())
    (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        fluxjax.load_transformer(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps({**meta, "config": {**meta["config"], "depth": 3}}))
    with pytest.raises(CheckpointError, match=r"double_blocks\.img_attn\..* has shape \(2, .*needs \(3, "):
        fluxjax.load_transformer(tmp_path / "ck")
    (tmp_path / "ck" / CONFIG_FILE).write_text(json.dumps({**meta, "config": {**meta["config"], "use_guidance_embed": False}}))
    with pytest.raises(CheckpointError, match="unexpected parameter 'guidance_in"):
        fluxjax.load_transformer(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="shape"):
        fluxjax.save_transformer(tmp_path / "ck2", dataclasses.replace(TINY, depth=1), params)
    assert not (tmp_path / "ck2").exists()


@pytest.mark.processes
def test_sharded_load_on_two_devices(tmp_path, good):
    """Params restore straight into the requested shardings (two host devices, in a subprocess)."""
    _, native = good
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import fluxjax
        mesh = Mesh(np.array(jax.devices()[:2]), ("model",))

        def plan(config):
            def spec(sds):
                return NamedSharding(mesh, P(*([None] * (sds.ndim - 1)), "model") if sds.shape[-1] % 2 == 0 else P())
            return jax.tree_util.tree_map(spec, fluxjax.param_shapes(config))

        config, params = fluxjax.load_transformer({str(native)!r}, shardings=plan)
        _, plain = fluxjax.load_transformer({str(native)!r})
        qkv = params.double_blocks.img_attn.qkv
        assert len(qkv.addressable_shards) == 2 and qkv.addressable_shards[0].data.shape[-1] == qkv.shape[-1] // 2
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("ok")
    """)
    env = {**os.environ, **host_devices(2)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_conversion_memory_of_a_2gb_checkpoint():
    """Peak RSS of `python -m conversion` on a random ~2 GB file stays under 1.3x its size."""
    from benchmarks.conversion_memory import measure

    result = measure(gb=2.0, dtype="bf16")
    assert result["ratio"] < 1.3, result
