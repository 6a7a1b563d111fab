"""Native checkpoints verify themselves and configs are checked by type and range.

Every tree carries per-array and per-file checksums (`fluxjax.checkpoint`): a damaged file is
refused with one line naming it (and, for changed bytes, the array), before TensorStore sees it
where it can be; a config field of the wrong type or range is refused naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from reference import TINY

import fluxjax
from fluxjax.checkpoint import (CHECKSUMS_FILE, CONFIG_FILE, CheckpointError, add_checksums, expected_leaves,
                                read_tree, verify_tree, write_tree)
from fluxjax.config import Flux2Config
from fluxjax.trees import named_leaves
from fluxjax.vae import VAEConfig

REPO = Path(__file__).resolve().parents[2]
TREE = {"big": np.arange(64 * 256, dtype=np.float32).reshape(64, 256),  # 64 KiB: most of the data file
        "small": {"bias": np.linspace(-1, 1, 7, dtype=np.float32)}}
LIKE = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TREE)


def save(path: Path) -> Path:
    write_tree(path, named_leaves(TREE), expected_leaves(TREE))
    return path


def data_file(tree: Path) -> Path:
    """The largest file of the tree: the one holding the big array's bytes."""
    return max((p for p in tree.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE),
               key=lambda p: p.stat().st_size)


def flip(path: Path, n: int = 100) -> None:
    """Invert n bytes in the middle of `path`, keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def refused(tree: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as err:
        read_tree(tree, LIKE)
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


def test_round_trip_writes_and_checks_checksums(tmp_path):
    tree = save(tmp_path / "tree")
    sums = json.loads((tree / CHECKSUMS_FILE).read_text())
    assert set(sums["arrays"]) == {"big", "small.bias"}
    assert set(sums["files"]) == {p.relative_to(tree).as_posix() for p in tree.rglob("*")
                                  if p.is_file() and p.name != CHECKSUMS_FILE}
    loaded = read_tree(tree, LIKE)
    np.testing.assert_array_equal(loaded["big"], TREE["big"])
    verify_tree(tree)


# each case damages a fresh tree and names what the one-line refusal must contain
DAMAGE = {
    "flipped data bytes": (lambda t: flip(data_file(t)), lambda t: ["'big'", str(data_file(t))]),
    "truncated data file": (lambda t: os.truncate(data_file(t), data_file(t).stat().st_size // 2),
                            lambda t: [str(data_file(t)), "truncated"]),
    "deleted data file": (lambda t: data_file(t).unlink(), lambda t: ["missing"]),
    "deleted manifest": (lambda t: next(t.rglob("manifest.ocdbt")).unlink(), lambda t: ["manifest.ocdbt", "missing"]),
    "deleted metadata": (lambda t: (t / "_CHECKPOINT_METADATA").unlink(), lambda t: ["_CHECKPOINT_METADATA"]),
    "flipped metadata": (lambda t: flip(t / "_CHECKPOINT_METADATA", 4), lambda t: ["_CHECKPOINT_METADATA"]),
    "deleted checksums": (lambda t: (t / CHECKSUMS_FILE).unlink(), lambda t: ["add-checksums"]),
    "garbled checksums": (lambda t: (t / CHECKSUMS_FILE).write_text("{"), lambda t: [CHECKSUMS_FILE]),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_tree_is_refused_in_one_line_naming_the_file(tmp_path, case):
    tree = save(tmp_path / "tree")
    damage, words = DAMAGE[case]
    expected = words(tree)  # computed before the damage: a deleted file is named by its old path
    damage(tree)
    refused(tree, *expected, "damaged" if case != "deleted checksums" else "")


def test_flipped_bytes_in_a_transformer_checkpoint_name_the_array(tmp_path):
    params = fluxjax.init_params(TINY, jax.random.key(0))
    fluxjax.save_transformer(tmp_path / "ck", TINY, params)
    names = [name for name, _ in named_leaves(params)]
    flip(data_file(tmp_path / "ck" / "params"))
    with pytest.raises(CheckpointError) as err:
        fluxjax.load_transformer(tmp_path / "ck")
    message = str(err.value)
    assert "\n" not in message and "differs from the checksum" in message, message
    assert any(f"array {name!r}" in message for name in names), message


def test_changed_checksum_says_the_files_are_intact(tmp_path):
    tree = save(tmp_path / "tree")
    sums = json.loads((tree / CHECKSUMS_FILE).read_text())
    sums["arrays"]["small.bias"] = "0" * 64
    (tree / CHECKSUMS_FILE).write_text(json.dumps(sums))
    refused(tree, "'small.bias'", "checksums themselves were changed")


@pytest.mark.processes
def test_a_tree_without_checksums_loads_once_they_are_added(tmp_path):
    tree = save(tmp_path / "tree")
    (tree / CHECKSUMS_FILE).unlink()
    refused(tree, "add-checksums")
    done = subprocess.run([sys.executable, "-m", "fluxjax.checkpoint", "add-checksums", str(tree)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_tree(tree, LIKE)["big"], TREE["big"])
    with pytest.raises(CheckpointError, match="already exists"):
        add_checksums(tree)


@pytest.mark.processes
def test_truncated_file_gives_one_line_and_no_noise(tmp_path):
    """In a fresh process: the refusal is the only output (no TensorStore dump, no 'Exception ignored')."""
    tree = save(tmp_path / "tree")
    os.truncate(data_file(tree), 10)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from fluxjax.checkpoint import CheckpointError, read_tree
        like = {{"big": jax.ShapeDtypeStruct((64, 256), np.float32),
                "small": {{"bias": jax.ShapeDtypeStruct((7,), np.float32)}}}}
        try:
            read_tree({str(tree)!r}, like)
        except CheckpointError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "truncated" in done.stdout, done
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("root", sorted((REPO / "organisms" / "checkpoints").iterdir()), ids=lambda p: p.name)
def test_committed_organisms_carry_checksums_that_hold(root):
    trees = [p.parent for p in root.rglob("_CHECKPOINT_METADATA")]
    assert len(trees) == 2, trees  # the transformer's params and the text encoder
    for tree in trees:
        verify_tree(tree)


# --- configs ---------------------------------------------------------------------------------

CONFIG_CASES = [  # (config class, field, bad value, words of the message)
    (Flux2Config, "theta", -5, "theta must be positive"),
    (Flux2Config, "mlp_ratio", "three", "mlp_ratio must be a finite number"),
    (Flux2Config, "mlp_ratio", float("nan"), "mlp_ratio must be a finite number"),
    (Flux2Config, "depth", 2.5, "depth must be an integer"),
    (Flux2Config, "num_heads", True, "num_heads must be an integer"),
    (Flux2Config, "use_guidance_embed", "yes", "use_guidance_embed must be true or false"),
    (Flux2Config, "axes_dim", (8, "8", 8, 8), "axes_dim must be a list of integers"),
    (Flux2Config, "out_channels", 0, "out_channels must be positive"),
    (Flux2Config, "hidden_size", None, "hidden_size must be an integer"),
    (VAEConfig, "latent_channels", "32", "latent_channels must be an integer"),
    (VAEConfig, "patch_size", (2, 2, 2), "patch_size must be a list of 2"),
    (VAEConfig, "batch_norm_eps", -1.0, "batch_norm_eps must be positive"),
]


@pytest.mark.parametrize("cls, field, value, words", CONFIG_CASES,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in CONFIG_CASES])
def test_config_fields_are_checked_by_type_and_range(cls, field, value, words):
    base = TINY if cls is Flux2Config else VAEConfig()
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(base, **{field: value})


@pytest.mark.parametrize("field, value, words", [("theta", -5, "theta must be positive"),
                                                 ("mlp_ratio", "three", "mlp_ratio must be a finite number")])
def test_checkpoint_config_of_the_wrong_type_or_range_is_refused_naming_file_and_field(tmp_path, field, value, words):
    fluxjax.save_transformer(tmp_path / "ck", TINY, fluxjax.init_params(TINY, jax.random.key(0)))
    meta_file = tmp_path / "ck" / CONFIG_FILE
    meta = json.loads(meta_file.read_text())
    meta["config"][field] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        fluxjax.load_transformer(tmp_path / "ck")
    assert str(meta_file) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_organism_encoder_config_is_checked():
    from organisms.text import TextEncoderConfig

    with pytest.raises(ValueError, match="mlp_ratio must be a finite number"):
        TextEncoderConfig(mlp_ratio="two")
