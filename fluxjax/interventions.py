"""Interventions as values and captures as return values.

`Interventions` is one pytree argument of `fluxjax.forward`. Which interventions exist is its
structure (`None` / `()` where absent, plus a few static fields); their contents are arrays. So
`jit` compiles one program per structure and reuses it when only values change, and `vmap` over
the arrays sweeps blocks, seeds and tasks in one call.

Sites name where the text stream is read or written. Blocks are numbered globally, double blocks
first (klein-9B: 0..7 double, 8..31 single):

    site -1 (BLOCK0_INPUT)  input of block 0, i.e. the output of the text input projection
    site b >= 0             output of block b (in single blocks, the text slice of the joint stream)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.config import Flux2Config
from fluxjax.layout import TokenLayout

BLOCK0_INPUT = -1

EDGE_SETTINGS = ("ref->text", "ref->image", "ref->text[padding]", "ref->text[content]",
                 "text->ref", "image->ref", "image->text", "text->image")


@struct.dataclass
class Substitution:
    """Replace the text stream at `site` where `mask` is True: new = where(mask, value, current)."""

    site: jax.Array  # int32 []: BLOCK0_INPUT or a global block index
    value: jax.Array  # [B, T, D]
    mask: jax.Array  # bool [B, T]


@struct.dataclass
class Knockout:
    """Attention-edge knockout: per block, which query group may attend to which key group.

    allowed[b, gq, gk] is False where queries of group gq may not attend to keys of group gk in
    block b; `groups` gives every joint-sequence token's group (see fluxjax.layout).
    """

    allowed: jax.Array  # bool [num_blocks, G, G]
    groups: jax.Array  # int32 [B, L]

    def __and__(self, other: "Knockout") -> "Knockout":
        if np.shape(self.allowed) != np.shape(other.allowed):
            raise ValueError("knockouts built for different layouts or models cannot be combined")
        return Knockout(allowed=jnp.logical_and(self.allowed, other.allowed), groups=self.groups)


@struct.dataclass
class DropReference:
    """The reference tokens leave the sequence from block `from_block` on (static: shapes change)."""

    from_block: int = struct.field(pytree_node=False)
    num_ref_tokens: int = struct.field(pytree_node=False)


@struct.dataclass
class Interventions:
    substitutions: tuple[Substitution, ...] = ()
    knockout: Knockout | None = None
    drop_reference: DropReference | None = None


@dataclasses.dataclass(frozen=True)
class Capture:
    """What a forward returns besides its output (static). Only what is asked for is kept.

    text, image: sites to capture (see module docstring). image_tokens: how many leading
    image-stream tokens to keep (e.g. `layout.n_img` for the noisy image only); None keeps the
    whole stream present at the site.
    """

    text: tuple[int, ...] = ()
    image: tuple[int, ...] = ()
    image_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "text", tuple(int(s) for s in self.text))
        object.__setattr__(self, "image", tuple(int(s) for s in self.image))

    def validate(self, config: Flux2Config):
        for s in self.text + self.image:
            if not BLOCK0_INPUT <= s < config.num_blocks:
                raise ValueError(f"capture site {s} out of range [-1, {config.num_blocks - 1}]")


@struct.dataclass
class Captures:
    text: jax.Array | None = None  # [n_text_sites, B, T, D], in Capture.text order
    image: jax.Array | None = None  # [n_image_sites, B, N', D], in Capture.image order


# ---------------------------------------------------------------------------------------------
# builders


def substitution(site, value, mask=None) -> Substitution:
    """A text-stream substitution; mask None replaces every position."""
    value = jnp.asarray(value)
    if mask is None:
        mask = jnp.ones(value.shape[:-1], bool)
    mask = jnp.asarray(mask, bool)
    if mask.shape != value.shape[:-1]:
        raise ValueError(f"substitution mask {mask.shape} must match value {value.shape} without its last axis")
    return Substitution(site=jnp.asarray(site, jnp.int32), value=value, mask=mask)


def block_indices(blocks, num_blocks: int) -> list[int]:
    """Blocks given as 'all', an int, 'a:b' / ':k' / 'k:' slices, a range or a list of ints."""
    if blocks is None or blocks == "all":
        out = list(range(num_blocks))
    elif isinstance(blocks, (int, np.integer)):
        out = [int(blocks)]
    elif isinstance(blocks, str):
        parts = blocks.split(":")
        if len(parts) != 2:
            raise ValueError(f"block range {blocks!r}: use 'all', 'a:b', ':k' or 'k:'")
        start, stop = (int(p) if p.strip() else None for p in parts)
        out = list(range(num_blocks))[slice(start, stop)]
    elif isinstance(blocks, Iterable):
        out = [int(b) for b in blocks]
    else:
        raise TypeError(f"cannot read blocks from {blocks!r}")
    bad = [b for b in out if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: this model has blocks 0..{num_blocks - 1}")
    return sorted(set(out))


def _parse_edge(setting: str, layout: TokenLayout):
    if "->" not in setting:
        raise ValueError(f"edge setting {setting!r} must read 'A->B' (information from A to B), e.g. 'ref->text'")
    source, dest = (s.strip() for s in setting.split("->", 1))
    # "A -> B": queries in B may not attend to keys in A.
    return layout.groups_of(dest), layout.groups_of(source)


def knockout(config: Flux2Config, layout: TokenLayout, content_mask, edges: str | Sequence[str],
             blocks="all") -> Knockout:
    """Build a knockout that cuts `edges` (e.g. 'ref->text' or ['ref->text', 'ref->image']) in `blocks`.

    Raises if some query of some sample would be left with no key to attend to in some block.
    Combine knockouts with different block ranges with `&`.
    """
    edges = [edges] if isinstance(edges, str) else list(edges)
    groups = layout.group_ids(content_mask)
    G = layout.num_groups
    cut = np.ones((G, G), bool)
    for e in edges:
        q_groups, k_groups = _parse_edge(e, layout)
        for gq in q_groups:
            for gk in k_groups:
                cut[gq, gk] = False
    allowed = np.ones((config.num_blocks, G, G), bool)
    for b in block_indices(blocks, config.num_blocks):
        allowed[b] = cut
    check_knockout(allowed, groups, layout)
    return Knockout(allowed=jnp.asarray(allowed), groups=jnp.asarray(groups))


def allow_all(config: Flux2Config, layout: TokenLayout, content_mask) -> Knockout:
    """A knockout that cuts nothing (equals no knockout; useful as a sweep's baseline cell)."""
    return knockout(config, layout, content_mask, [], blocks=[])


def cut_reference(config: Flux2Config, layout: TokenLayout, content_mask, from_block: int) -> Knockout:
    """Every edge into and out of the reference tokens cut from `from_block` on: the mask form of
    `DropReference(from_block)`. References still attend to each other, so no query goes empty."""
    edges = [f"ref->{g}" for g in ("text", "image")] + [f"{g}->ref" for g in ("text", "image")]
    return knockout(config, layout, content_mask, edges, blocks=range(from_block, config.num_blocks))


def drop_reference(layout: TokenLayout, from_block: int) -> DropReference:
    if layout.num_refs == 0:
        raise ValueError("this layout has no reference tokens to drop")
    return DropReference(from_block=int(from_block), num_ref_tokens=layout.n_ref)


def check_knockout(allowed, groups, layout: TokenLayout | None = None):
    """Raise if any query token of any sample has no allowed key in any block."""
    allowed = np.asarray(allowed, bool)
    groups = np.asarray(groups)
    names = layout.group_names if layout is not None else None
    for row in range(groups.shape[0]):
        present = np.zeros(allowed.shape[-1], bool)
        present[np.unique(groups[row])] = True
        reachable = (allowed & present[None, None, :]).any(axis=-1)  # [blocks, G]
        empty = np.argwhere(~reachable & present[None, :])
        if empty.size:
            b, g = empty[0]
            who = names[g] if names else f"group {g}"
            raise ValueError(f"knockout leaves the {who} queries of sample {row} with no key to attend to "
                             f"in block {b}; keep at least one key group for every query group")
