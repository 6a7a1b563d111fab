"""Parameter pytrees as named leaves: the dotted names checkpoints, converters and initialisers share.

A leaf's name joins its path's field names and list positions with dots, e.g.
'double_blocks.img_attn.qkv' or 'decoder.up.3.block.0.conv1.kernel'. A nested dict keyed by those
parts (`nest`) is how checkpoints store a tree, so any Orbax user can read it without fluxjax.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax


def leaf_name(path) -> str:
    """Dotted name of a pytree path (dataclass fields, dict keys, sequence positions)."""
    return ".".join(str(k.idx) if hasattr(k, "idx") else str(getattr(k, "name", getattr(k, "key", k)))
                    for k in path)


def named_leaves(tree) -> Iterator[tuple[str, object]]:
    """(leaf name, leaf) pairs in the tree's flattening order."""
    return ((leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0])


def nest(pairs: Iterable[tuple[str, object]]) -> dict:
    """(dotted name, value) pairs -> nested dict: {'a.b': x} -> {'a': {'b': x}}."""
    out: dict = {}
    for name, value in pairs:
        insert(out, name, value)
    return out


def insert(tree: dict, name: str, value) -> None:
    """Put `value` into the nested dict `tree` at the dotted `name`, making the parents it lacks."""
    *parents, last = name.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> {dotted name: value}, the inverse of `nest`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def from_named(flat: dict, like):
    """The pytree of `like`'s structure whose leaves are `flat[leaf name]`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[leaf_name(p)] for p, _ in leaves])
