"""The block loop is written once and the blocks have no modes.

The forward and the two [klein] KV forwards are configurations of one runner
(`fluxjax.runner.run_blocks`): each traces to one `lax.scan` per run of blocks of a kind (double
blocks, then single blocks; a reference removal splits a run in two), and nothing else in the
library calls a block. The blocks take the same arguments in every configuration: no flag picks
what they return.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import jax
import numpy as np

import fluxjax
from fluxjax import blocks, kv

LIBRARY = Path(fluxjax.__file__).resolve().parent
CONFIG = dataclasses.replace(fluxjax.FLUX2_KLEIN_4B, in_channels=8, context_in_dim=16, hidden_size=32, num_heads=2,
                             depth=2, depth_single_blocks=3, axes_dim=(4, 4, 4, 4))
LAYOUT = fluxjax.TokenLayout(n_txt=4, img_grid=(2, 2), ref_grids=((2, 2),))
RUNTIME = fluxjax.RuntimeOptions(attention="xla")  # the dense kernel: no scans inside attention


def _scan_lengths(jaxpr) -> list[int]:
    """The lengths of the scans in `jaxpr` and its sub-programs (jit, custom rules), not looking
    inside a scan's own body."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"])
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _scan_lengths(inner)
    return found


def _inputs():
    rng = np.random.default_rng(0)
    params = fluxjax.init_params(CONFIG, jax.random.key(0))
    img = rng.standard_normal((1, LAYOUT.n_img, CONFIG.in_channels)).astype(np.float32)
    refs = rng.standard_normal((1, LAYOUT.n_ref, CONFIG.in_channels)).astype(np.float32)
    txt = rng.standard_normal((1, LAYOUT.n_txt, CONFIG.context_in_dim)).astype(np.float32)
    return params, img, refs, txt, np.array([0.5], np.float32)


def test_every_configuration_runs_one_scan_per_run_of_blocks():
    params, img, refs, txt, t = _inputs()
    ids = LAYOUT.img_ids()
    img_ids, ref_ids = ids[:LAYOUT.n_img], ids[LAYOUT.n_img:]
    runs = [CONFIG.depth, CONFIG.depth_single_blocks]
    content = np.ones((1, LAYOUT.n_txt), bool)
    ko = fluxjax.knockout(CONFIG, LAYOUT, content, "ref->text")
    sub = fluxjax.substitution("b3.text.attn_out", np.zeros((1, LAYOUT.n_txt, CONFIG.hidden_size), np.float32))
    every = fluxjax.Interventions(substitutions=(sub,), knockout=ko)
    capture = fluxjax.Capture(sites=("b0.image.mlp_out", "b4.text.output"))

    def forward(iv, drop=None):
        iv = iv if drop is None else iv.replace(drop_reference=fluxjax.drop_reference(LAYOUT, drop))
        return fluxjax.forward(params, CONFIG, np.concatenate([img, refs], 1), txt, t, ids, LAYOUT.txt_ids(),
                               interventions=iv, capture=capture, num_ref_tokens=LAYOUT.n_ref, runtime=RUNTIME)

    def extract(iv):
        return kv.forward_kv_extract(params, CONFIG, img, refs, txt, t, img_ids, ref_ids, LAYOUT.txt_ids(),
                                     interventions=iv, capture=capture, runtime=RUNTIME)

    cache = jax.eval_shape(extract, None)[1]  # shapes only: traced, never run

    def cached(iv, cache=cache):
        return kv.forward_kv_cached(params, CONFIG, img, txt, t, img_ids, LAYOUT.txt_ids(), cache,
                                    interventions=iv, capture=capture, runtime=RUNTIME)

    for name, fn in (("forward", forward), ("KV extract", extract), ("KV cached", cached)):
        for iv in (None, every):
            args = (iv, cache) if fn is cached else (iv,)
            lengths = _scan_lengths(jax.make_jaxpr(fn)(*args).jaxpr)
            assert lengths == runs, f"{name}: scans of lengths {lengths}, expected one per kind of block {runs}"
    # the references leave after block 3: the single blocks run as two runs, 3 and 4
    assert _scan_lengths(jax.make_jaxpr(lambda iv: forward(iv, drop=3))(every).jaxpr) == [2, 1, 2]


def _calls(tree: ast.AST, names: set[str]) -> list[ast.Call]:
    def called(node):
        return node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) in names]


def test_only_the_runner_calls_a_block_and_it_has_one_scan():
    callers = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = [n for n in tree.body if isinstance(n, ast.FunctionDef)] + \
              [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, ast.FunctionDef)]
        for fn in top:  # module-level functions and methods, with whatever they define inside
            if _calls(fn, {"double_block", "single_block"}):
                callers.setdefault(path.relative_to(LIBRARY).as_posix(), set()).add(fn.name)
    assert callers == {"runner.py": {"run_blocks"}}, f"blocks called outside fluxjax.runner.run_blocks: {callers}"
    runner = ast.parse((LIBRARY / "runner.py").read_text())
    assert len(_calls(runner, {"scan", "fori_loop", "while_loop", "map"})) == 1, \
        "fluxjax/runner.py must hold exactly one loop over blocks (its `_scan`)"


def test_blocks_take_no_mode_flags():
    """Every configuration calls the blocks with the same arguments: the attention closure and the
    edit of the contributions carry what differs, and a block always returns a BlockOut."""
    expected = {blocks.double_block: ["p", "txt", "img", "mod_txt", "mod_img", "rope", "attend", "edit"],
                blocks.single_block: ["p", "z", "mod", "rope", "attend", "edit"]}
    for fn, names in expected.items():
        signature = inspect.signature(fn)
        assert list(signature.parameters) == names, f"{fn.__name__} takes {list(signature.parameters)}"
        assert signature.return_annotation in (blocks.BlockOut, "BlockOut")
