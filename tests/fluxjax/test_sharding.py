"""Sharded execution on a device mesh equals single-device execution.

The sharded runs need 8 devices; this process keeps its single CPU device. So the module starts
itself once in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the
`__main__` block at the bottom); that process runs the forward and the sampler on (data, fsdp)
meshes (8, 1), (2, 4) and (1, 8), loads a checkpoint straight into shards, and writes outputs and
shard facts to a directory. The tests here compare them with the same computation on one device.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fluxjax
from fluxjax import sharding
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from reference import TINY, rel_err  # noqa: E402
from testenv import host_devices  # noqa: E402

SHARDED_TOL = 1e-6  # fp32: sharded matmuls sum in a different order (partial sums, reduce-scatter); ~5e-7 measured
MESHES = ((8, 1), (2, 4), (1, 8))
BATCH = 8  # divisible by every data axis above
LAYOUT = fluxjax.TokenLayout(12, (3, 4), ((2, 3), (4, 2)))  # text, a 3x4 image, two references
SAMPLER = fluxjax.SamplerOptions(num_steps=2, guidance="embedded", guidance_scale=3.5)
CAPTURE = fluxjax.Capture(text=(fluxjax.BLOCK0_INPUT, 1, 3), image=(0, 4), image_tokens=LAYOUT.n_img)
WORKER_TIMEOUT_S = 600


# --- the case, built identically in both processes -----------------------------------------------


def case():
    """Params, inputs, a knockout and a substitution for TINY (deterministic)."""
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(np.asarray, fluxjax.init_params(TINY, jax.random.key(0)))
    img = rng.standard_normal((BATCH, LAYOUT.n_image_stream, TINY.in_channels)).astype(np.float32)
    txt = rng.standard_normal((BATCH, LAYOUT.n_txt, TINY.context_in_dim)).astype(np.float32)
    t = rng.uniform(0.1, 1.0, BATCH).astype(np.float32)
    guidance = np.full(BATCH, 3.5, np.float32)
    content = np.arange(LAYOUT.n_txt)[None, :] < rng.integers(3, LAYOUT.n_txt, (BATCH, 1))
    value = rng.standard_normal((BATCH, LAYOUT.n_txt, TINY.hidden_size)).astype(np.float32)
    mask = rng.random((BATCH, LAYOUT.n_txt)) < 0.5
    iv = fluxjax.Interventions(
        substitutions=(fluxjax.substitution(1, value, mask),),
        knockout=fluxjax.knockout(TINY, LAYOUT, content, ["ref->text", "image->ref"], blocks="1:4"),
    )
    noise = rng.standard_normal((BATCH, LAYOUT.n_img, TINY.in_channels)).astype(np.float32)
    refs = img[:, LAYOUT.n_img:]
    return params, dict(img=img, txt=txt, t=t, guidance=guidance, iv=iv, noise=noise, refs=refs)


@functools.partial(jax.jit, static_argnames=("capture",))
def run_forward(params, img, txt, t, guidance, iv, *, capture):
    return fluxjax.forward(params, TINY, img, txt, t, LAYOUT.img_ids(), LAYOUT.txt_ids(), guidance,
                           interventions=iv, capture=capture)


def run_sampler(params, x):
    return fluxjax.sample(params, TINY, SAMPLER, x["txt"], LAYOUT.txt_ids(), LAYOUT.img_ids(), noise=x["noise"],
                          refs=x["refs"], interventions=x["iv"], capture=CAPTURE)


def outputs(result) -> dict[str, np.ndarray]:
    out, caps = result
    return {"out": np.asarray(out), "text": np.asarray(caps.text), "image": np.asarray(caps.image)}


# --- the 8-device side ---------------------------------------------------------------------------


def shard_case(params, x, mesh):
    """Params on the plan; batch-carrying arrays split over `data`; tables and sites replicated."""
    iv = x["iv"]
    sub = iv.substitutions[0]
    iv = iv.replace(
        substitutions=(sub.replace(value=sharding.shard_batch(sub.value, mesh),
                                   mask=sharding.shard_batch(sub.mask, mesh)),),
        knockout=iv.knockout.replace(groups=sharding.shard_batch(iv.knockout.groups, mesh),
                                     allowed=jax.device_put(iv.knockout.allowed, sharding.replicated(mesh))))
    batch = sharding.shard_batch({k: x[k] for k in ("img", "txt", "t", "guidance", "noise", "refs")}, mesh)
    return sharding.shard_params(params, mesh), {**batch, "iv": iv}


def shard_facts(params) -> dict:
    """How the parameters ended up spread over the devices."""
    facts = {}
    for name, leaf in [("qkv", params.double_blocks.img_attn.qkv), ("linear1", params.single_blocks.linear1),
                       ("txt_in", params.txt_in), ("query_norm", params.single_blocks.norm.query_norm)]:
        facts[name] = {"global": list(leaf.shape), "devices": len(leaf.sharding.device_set),
                       "shards": sorted({tuple(s.data.shape) for s in leaf.addressable_shards})}
    facts["bytes_per_device"] = sharding.bytes_per_device(params)
    return facts


def worker(out_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    params, x = case()
    facts = {"device_count": jax.device_count()}
    for data, fsdp in MESHES:
        mesh = sharding.make_mesh(data=data, fsdp=fsdp)
        sp, sx = shard_case(params, x, mesh)
        fwd = run_forward(sp, sx["img"], sx["txt"], sx["t"], sx["guidance"], sx["iv"], capture=CAPTURE)
        samp = run_sampler(sp, sx)
        tag = f"{data}x{fsdp}"
        for kind, result in (("forward", fwd), ("sampler", samp)):
            np.savez(os.path.join(out_dir, f"{kind}_{tag}.npz"), **outputs(result))
        facts[tag] = {"params": shard_facts(sp), "out_devices": len(fwd[0].sharding.device_set)}

    # The [dev] plan under eval_shape, as XLA's NamedSharding reads it on 8 real (host) devices.
    mesh = sharding.make_mesh(data=1, fsdp=8)
    init = jax.jit(functools.partial(fluxjax.init_params, fluxjax.FLUX2_DEV, dtype=jnp.bfloat16),
                   out_shardings=sharding.param_shardings(mesh, fluxjax.FLUX2_DEV))
    facts["dev_bf16_bytes_per_device"] = sharding.bytes_per_device(jax.eval_shape(init, jax.random.key(0)))

    # A native checkpoint loaded straight into shards.
    path = os.path.join(out_dir, "ckpt")
    fluxjax.save_transformer(path, TINY, jax.tree_util.tree_map(np.asarray, params))
    mesh = sharding.make_mesh(data=2, fsdp=4)
    config, loaded = fluxjax.load_transformer(path, shardings=functools.partial(sharding.param_shardings, mesh))
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)))
    specs_match = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(sharding.param_shardings(mesh, config))))
    facts["loaded"] = {"equal": same, "specs_match": specs_match, "params": shard_facts(loaded)}
    with open(os.path.join(out_dir, "facts.json"), "w") as f:
        json.dump(facts, f)


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(facts, sharded outputs, single-device outputs). The single-device runs happen here while the
    8-device worker runs: XLA compiles mostly on one core, so the two overlap."""
    out_dir = str(tmp_path_factory.mktemp("sharded"))
    env = {**os.environ, **host_devices(8)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), out_dir], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert jax.device_count() == 1, "this process must keep one device; the sharded runs live in a subprocess"
        params, x = case()
        single = {"forward": outputs(run_forward(params, x["img"], x["txt"], x["t"], x["guidance"], x["iv"],
                                                 capture=CAPTURE)),
                  "sampler": outputs(run_sampler(params, x))}
        _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode:
        pytest.fail(f"the 8-device worker failed:\n{stderr[-4000:]}")
    with open(os.path.join(out_dir, "facts.json")) as f:
        facts = json.load(f)
    sharded = {}
    for kind in ("forward", "sampler"):
        for data, fsdp in MESHES:
            with np.load(os.path.join(out_dir, f"{kind}_{data}x{fsdp}.npz")) as z:
                sharded[kind, (data, fsdp)] = dict(z)
    return facts, sharded, single


@pytest.mark.processes
@pytest.mark.parametrize("mesh", MESHES, ids=[f"{d}x{f}" for d, f in MESHES])
@pytest.mark.parametrize("kind", ["forward", "sampler"])
def test_sharded_equals_single_device(runs, kind, mesh):
    _, sharded, single = runs
    got, want = sharded[kind, mesh], single[kind]
    for name in ("out", "text", "image"):  # the output, then the text and image captures
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) <= SHARDED_TOL, (name, rel_err(got[name], want[name]))


@pytest.mark.processes
@pytest.mark.parametrize("mesh", MESHES, ids=[f"{d}x{f}" for d, f in MESHES])
def test_params_are_split_over_fsdp_and_replicated_over_data(runs, mesh):
    facts = runs[0]
    data, fsdp = mesh
    got = facts[f"{data}x{fsdp}"]
    assert facts["device_count"] == 8 and got["out_devices"] == 8
    for name in ("qkv", "linear1", "txt_in"):  # matrices: one slice of the out axis per fsdp index
        shape = got["params"][name]["global"]
        assert got["params"][name]["devices"] == 8
        assert got["params"][name]["shards"] == [[*shape[:-1], shape[-1] // fsdp]], name
    norm = got["params"]["query_norm"]
    assert norm["shards"] == [norm["global"]]  # replicated
    params = fluxjax.param_shapes(TINY)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    vectors = params.double_blocks.img_attn.norm, params.double_blocks.txt_attn.norm, params.single_blocks.norm
    small = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vectors))
    assert got["params"]["bytes_per_device"] == (total - small) // fsdp + small


@pytest.mark.processes
def test_checkpoint_loads_into_shards(runs):
    facts = runs[0]
    loaded = facts["loaded"]
    assert loaded["equal"] and loaded["specs_match"]
    qkv = loaded["params"]["qkv"]
    assert qkv["shards"] == [[*qkv["global"][:-1], qkv["global"][-1] // 4]]  # no full copy on any device
    assert loaded["params"]["bytes_per_device"] == facts["2x4"]["params"]["bytes_per_device"]


def dev_plan_bytes(fsdp: int, dtype=jnp.bfloat16) -> tuple[int, int, int]:
    """(total, replicated vector, largest per-device) bytes of [dev] under the plan, from the specs."""
    shapes = jax.eval_shape(functools.partial(fluxjax.init_params, fluxjax.FLUX2_DEV, dtype=dtype), jax.random.key(0))
    specs = sharding.param_partition_specs(fluxjax.FLUX2_DEV, fsdp)
    leaves = jax.tree_util.tree_leaves(shapes)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    total = replicated = per_device = 0
    for x, spec in zip(leaves, spec_leaves):
        nbytes = math.prod(x.shape) * x.dtype.itemsize
        total += nbytes
        split = [fsdp if axis == sharding.FSDP else 1 for axis in spec]
        assert all(d % s == 0 for d, s in zip(x.shape, split)), (x.shape, spec)
        per_device += nbytes // math.prod(split)
        if math.prod(split) == 1:
            replicated += nbytes
    return total, replicated, per_device


def test_dev_plan_gives_each_of_8_devices_an_eighth():
    total, replicated, per_device = dev_plan_bytes(8)
    assert replicated < 64 * 1024  # only the QK-norm vectors stay whole
    assert per_device <= (total - replicated) / 8 + replicated


@pytest.mark.processes
def test_dev_plan_as_xla_reads_it_and_as_documented(runs):
    facts = runs[0]
    total, replicated, per_device = dev_plan_bytes(8)
    assert facts["dev_bf16_bytes_per_device"] == per_device
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "sharding.md")).read()
    for number in (total, replicated, per_device):
        assert f"{number:,}" in doc, f"docs/sharding.md does not state {number:,}"


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(data=2)  # this process has one device
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="leading"):
        sharding.shard_batch(np.float32(1.0), mesh)


def test_specs_cover_every_parameter_and_keep_layer_axes_whole():
    config = fluxjax.FLUX2_KLEIN_9B
    specs = sharding.param_partition_specs(config, 8)
    shapes = fluxjax.param_shapes(config)
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(flat) == len(jax.tree_util.tree_leaves(shapes))
    for path, spec in flat:
        name = jax.tree_util.keystr(path)
        if re.search(r"(double|single)_blocks", name):
            assert len(spec) == 0 or spec[0] is None, name
        if "norm" in name and "adaLN" not in name:
            assert len(spec) == 0, name
        else:
            assert sharding.FSDP in tuple(spec), name


if __name__ == "__main__":
    worker(sys.argv[1])
