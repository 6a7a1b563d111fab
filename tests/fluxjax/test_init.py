"""The one initialiser (`fluxjax.init`): the rule per leaf kind, one flat draw, and the organisms'
training init kept bit for bit (their committed training must stay reproducible)."""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
from fluxjax.init import init_tree
from fluxjax.trees import named_leaves
from organisms.model import ORGANISMS, init_organism
from reference import TINY

# sha256 over (shape, dtype, bytes) of every leaf of `init_organism(organism, seed)`, measured with the
# implementation that trained the committed organisms (leaf-by-leaf numpy draws, commit 046739a).
ORGANISM_INIT_SHA256 = {
    0: "1254fc63226125d53b24538ec0a92b614737220c773bfad8cf519dd93afda22a",
    1: "db39e0c4d5ac7a8c4411f18baa95c91740c6332812c5e562085f49bc7a81bf63",
}
# Eager init cuts on the host, jitted init inside the program, where XLA may fuse scale * z + offset
# into one rounding: at most one float32 ulp apart.
CUT_ULP_TOL = 2.0 ** -23


def _sha256(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype.name)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def test_organism_init_is_bit_identical_to_the_committed_training():
    for organism in ORGANISMS.values():
        for seed, digest in ORGANISM_INIT_SHA256.items():
            assert _sha256(init_organism(organism, seed)) == digest, (organism.name, seed)


def test_sequential_numpy_draws_equal_one_flat_draw():
    shapes = [(3, 5), (7,), (2, 2, 4)]
    rng = np.random.default_rng([3, 0])
    sequential = np.concatenate([rng.standard_normal(s).ravel() for s in shapes])
    np.testing.assert_array_equal(sequential, np.random.default_rng([3, 0]).standard_normal(sum(map(np.prod, shapes))))


def test_transformer_rule_per_leaf_kind():
    config = dataclasses.replace(TINY, hidden_size=128, num_heads=4)
    params = fluxjax.init_params(config, jax.random.key(0))
    for name, x in named_leaves(params):
        x = np.asarray(x)
        if name.endswith(("query_norm", "key_norm")):
            assert abs(x.mean() - 1) < 0.05 and abs(x.std() - 0.1) < 0.05, name
        else:
            assert abs(x.std() * np.sqrt(x.shape[-2]) - 1) < 0.15, name
    trained = fluxjax.init_params(config, jax.random.key(0), training=True)
    for name, x in named_leaves(trained):
        x = np.asarray(x)
        if name.endswith(("query_norm", "key_norm")):
            assert (x == 1).all(), name
        elif name.split(".")[0] in ("double_stream_modulation_img", "double_stream_modulation_txt",
                                    "single_stream_modulation", "final_layer"):
            assert (x == 0).all(), name
        else:
            assert x.std() > 0, name


def test_one_flat_draw_eager_equals_jitted():
    key = jax.random.key(3)
    eager = fluxjax.init_params(TINY, key)
    jitted = jax.jit(fluxjax.init_params, static_argnums=0)(TINY, key)
    for (name, a), (_, b) in zip(named_leaves(eager), named_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=CUT_ULP_TOL, atol=CUT_ULP_TOL, err_msg=name)
    # the leaves are consecutive slices of one draw, in flattening order
    unit = init_tree(fluxjax.param_shapes(TINY), key, rule=lambda name, shape: fluxjax.init.Draw())
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(unit)])
    np.testing.assert_array_equal(flat, np.asarray(jax.random.normal(key, flat.shape, jnp.float32)))


def test_bfloat16_and_vae_rule():
    params = fluxjax.init_params(TINY, jax.random.key(0), jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    config = fluxjax.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae = fluxjax.init_vae_params(config, jax.random.key(0))
    var = np.asarray(vae.bn.running_var)
    assert var.min() >= 0.5 and var.shape == (config.token_channels,)
    for name, x in named_leaves(vae):
        x = np.asarray(x)
        if name.endswith(".kernel"):
            assert abs(x.std() * np.sqrt(np.prod(x.shape[:-1])) - 1) < 0.3, name
        elif name.endswith(".weight"):
            assert abs(x.mean() - 1) < 0.1, name


def test_each_parameter_is_declared_once_and_init_and_sharding_follow():
    """`param_infos` holds each leaf's shape, logical axes and init rule; the shapes, the draw of
    every leaf and the fsdp plan are read from it (changing a declaration changes all three)."""
    from fluxjax import params as P
    from fluxjax import sharding

    infos = dict(named_leaves(P.param_infos(TINY)))
    shapes = dict(named_leaves(fluxjax.param_shapes(TINY)))
    assert infos.keys() == shapes.keys()
    from jax.sharding import PartitionSpec

    from fluxjax.trees import leaf_name
    flat = jax.tree_util.tree_flatten_with_path(sharding.param_partition_specs(TINY, 2),
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    specs = {leaf_name(path): tuple(spec) for path, spec in flat}
    for name, info in infos.items():
        assert tuple(shapes[name].shape) == info.shape and len(info.axes) == len(info.shape), name
        assert (P.IN in info.axes) == (info.init != P.NORM), name  # every matrix has a fan-in
        split = [a for a, s in zip(info.axes, specs[name]) if s == "fsdp"]
        assert split == ([P.OUT] if P.OUT in info.axes and info.shape[info.axes.index(P.OUT)] % 2 == 0 else
                         [P.IN] if P.IN in info.axes and info.shape[info.axes.index(P.IN)] % 2 == 0 else []), name
        zero = info.draw(training=True).scale == 0 and info.draw(training=True).offset == 0
        assert zero == (info.init == P.ADALN_ZERO), name
    assert {n for n, i in infos.items() if i.init == P.ADALN_ZERO} == {
        "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
        "final_layer.adaLN_modulation", "final_layer.linear"}
