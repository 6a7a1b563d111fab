"""Interventions as values and captures as return values.

`Interventions` is one pytree argument of `fluxjax.forward`. Which interventions exist is its
structure (`()` / `None` where absent, plus the static fields of `DropReference`); their contents
are arrays. So `jit` compiles one program per structure and reuses it when only values change
(mask contents, substituted activations, knockout matrices, substitution sites), and `vmap` over
those arrays sweeps blocks, seeds and tasks in one call (see `stack`).

Sites name where the text stream is read or written. Blocks are numbered globally, double blocks
first (klein-9B: 0..7 double, 8..31 single):

    site -1 (BLOCK0_INPUT)  input of block 0, i.e. the output of the text input projection
    site b >= 0             output of block b (in single blocks, the text slice of the joint stream)

At a site, substitutions apply first, in order, and a capture at the same site sees the result:
what is captured is what the next block reads.

Per-step values. The sampler (`fluxjax.sample`) runs the forward once per denoising step. An
intervention value that differs between steps is wrapped in `PerStep` (every array in it carries a
leading [S] axis: step s sees slice s); anything not wrapped is shared by every step. The forward
itself takes no `PerStep` value: the wrapping says explicitly which axis is the step axis.

Axis names as in `fluxjax.numerics`; V is a sweep axis added by `vmap`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.config import Flux2Config
from fluxjax.layout import TokenLayout, key_segments
from fluxjax.numerics import KeyGroups

BLOCK0_INPUT = -1


@struct.dataclass
class PerStep:
    """A value (an array, or a pytree of arrays) with a leading [S] axis: one slice per sampler step.

    E.g. a patching run's `substitution(k, per_step(captures.text[:, j]), mask)`: the source run's
    step-s activations replace the target's at step s.
    """

    value: object


def per_step(value) -> PerStep:
    """Mark `value` (an array or pytree of arrays, each [S, ...]) as one slice per sampler step."""
    return PerStep(jax.tree_util.tree_map(jnp.asarray, value))


def is_per_step(node) -> bool:
    return isinstance(node, PerStep)


@struct.dataclass
class Substitution:
    """Write the text stream at `site` where `mask` is True: new = where(mask, value + keep * current,
    current). keep = 0 replaces (patching); keep = 1 adds `value` (additive patching, value = the
    source's activation minus the target's). keep is a value, so changing it does not recompile.

    A batch axis of 1 is shared by every sample. Build it with `substitution`.
    """

    site: jax.Array  # int32 []: BLOCK0_INPUT or a global block index
    value: jax.Array  # [B or 1, T, D]
    mask: jax.Array  # bool [B or 1, T]
    keep: jax.Array  # float32 []: the weight of the current activations


@struct.dataclass
class Knockout:
    """Attention-edge knockout: per block, which query group may attend to which key group.

    allowed[b, gq, gk] is False where queries of group gq may not attend to keys of group gk in
    block b; `groups` gives every joint-sequence token's group (see fluxjax.layout).
    """

    allowed: jax.Array  # bool [num_blocks, G, G]
    groups: jax.Array  # int32 [B, L] (B may be 1: shared by the batch)
    # (n_img, *ref_counts) of the layout (static): lets attention treat the image and each
    # reference as key segments of one group; None treats the image stream as one segment
    stream_counts: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __and__(self, other: "Knockout") -> "Knockout":
        """Both knockouts at once: an edge is allowed only where both allow it."""
        if np.shape(self.allowed) != np.shape(other.allowed) or np.shape(self.groups) != np.shape(other.groups):
            raise ValueError("knockouts built for different layouts or models cannot be combined")
        if not any(isinstance(a, jax.core.Tracer) for a in (self.groups, other.groups)):
            if not np.array_equal(np.asarray(self.groups), np.asarray(other.groups)):
                raise ValueError("knockouts built from different content masks cannot be combined")
        return Knockout(allowed=jnp.logical_and(self.allowed, other.allowed), groups=self.groups,
                        stream_counts=self.stream_counts)


@struct.dataclass
class DropReference:
    """The reference tokens leave the sequence from block `from_block` on (static: shapes change).

    Blocks before `from_block` see them as usual; the output then has no reference tokens.
    """

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

    text, image: sites to capture (see module docstring), each at most once. image_tokens: how
    many leading image-stream tokens to keep (e.g. `layout.n_img` for the noisy image only); None
    keeps the whole stream, which needs a fixed stream length (so not with `DropReference`).
    """

    text: tuple[int, ...] = ()
    image: tuple[int, ...] = ()
    image_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "text", tuple(int(s) for s in self.text))
        object.__setattr__(self, "image", tuple(int(s) for s in self.image))
        for name, sites in (("text", self.text), ("image", self.image)):
            if len(set(sites)) != len(sites):
                raise ValueError(f"capture {name} sites {sites} repeat a site; ask for each site once")
        if self.image_tokens is not None and self.image_tokens <= 0:
            raise ValueError(f"image_tokens must be positive or None, got {self.image_tokens}")

    def validate(self, config: Flux2Config):
        for s in self.text + self.image:
            if not BLOCK0_INPUT <= s < config.num_blocks:
                raise ValueError(f"capture site {s} out of range [-1, {config.num_blocks - 1}]")


@struct.dataclass
class Captures:
    text: jax.Array | None = None  # [n_text_sites, B, T, D], in Capture.text order
    image: jax.Array | None = None  # [n_image_sites, B, N', D], in Capture.image order


# ---------------------------------------------------------------------------------------------
# validation at trace time (shapes and static fields only: values may be tracers)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def validate(iv: Interventions, capture: Capture, config: Flux2Config, batch: int, n_txt: int, n_stream: int):
    """Raise a ValueError that says what to fix if `iv` or `capture` do not fit this forward.

    batch, n_txt, n_stream: B, T and N of the forward's inputs (the image stream N includes the
    reference tokens).
    """
    capture.validate(config)
    if any(is_per_step(n) for n in jax.tree_util.tree_leaves(iv, is_leaf=is_per_step)):
        raise ValueError("a PerStep intervention value has one slice per sampler step: give it to fluxjax.sample, "
                         "or pass one step's slice to the forward")
    nb, width, length = config.num_blocks, config.hidden_size, n_txt + n_stream
    for i, sub in enumerate(iv.substitutions):
        if np.ndim(sub.site) != 0:
            raise ValueError(f"substitution {i}: site must be a scalar, got shape {np.shape(sub.site)}; "
                             "to sweep sites, vmap over a stacked site array")
        if _is_concrete(sub.site) and not BLOCK0_INPUT <= int(sub.site) < nb:
            raise ValueError(f"substitution {i}: site {int(sub.site)} out of range [-1, {nb - 1}]")
        if np.ndim(sub.value) != 3 or not _broadcasts_to(np.shape(sub.value), (batch, n_txt, width)):
            raise ValueError(f"substitution {i}: value of shape {np.shape(sub.value)} does not fit the text stream "
                             f"[B, T, D] = {(batch, n_txt, width)} (a batch axis of 1 is shared)")
        if np.ndim(sub.mask) != 2 or not _broadcasts_to(np.shape(sub.mask), (batch, n_txt)):
            raise ValueError(f"substitution {i}: mask of shape {np.shape(sub.mask)} does not fit the text tokens "
                             f"[B, T] = {(batch, n_txt)} (a batch axis of 1 is shared)")
    knock = iv.knockout
    if knock is not None:
        if np.ndim(knock.allowed) != 3 or np.shape(knock.allowed)[0] != nb or \
                np.shape(knock.allowed)[1] != np.shape(knock.allowed)[2]:
            raise ValueError(f"knockout.allowed has shape {np.shape(knock.allowed)}; it must be [num_blocks, G, G] "
                             f"with num_blocks = {nb}")
        if jnp.result_type(knock.allowed) != jnp.bool_:
            raise ValueError(f"knockout.allowed must be boolean, got {jnp.result_type(knock.allowed)}")
        g_shape = np.shape(knock.groups)
        if len(g_shape) != 2 or g_shape[1] != length or g_shape[0] not in (1, batch):
            raise ValueError(f"knockout groups of shape {g_shape} do not match this forward's joint sequence "
                             f"[B, T + N] = {(batch, length)}; build the knockout from this forward's layout")
    drop = iv.drop_reference
    if drop is not None:
        if not 0 <= drop.from_block <= nb:
            raise ValueError(f"drop_reference from block {drop.from_block}: must be in [0, {nb}]")
        if not 0 < drop.num_ref_tokens < n_stream:
            raise ValueError(f"drop_reference removes {drop.num_ref_tokens} tokens from an image stream of "
                             f"{n_stream}; build it from this forward's layout")
        if capture.image and capture.image_tokens is None:
            raise ValueError("an image capture with drop_reference needs Capture(image_tokens=...): the image "
                             "stream changes length when the references leave; e.g. image_tokens=layout.n_img")
    keep_max = n_stream - (drop.num_ref_tokens if drop is not None else 0)
    if capture.image and capture.image_tokens is not None and capture.image_tokens > keep_max:
        raise ValueError(f"capture asks for {capture.image_tokens} image tokens but at most {keep_max} are in the "
                         "stream at every site")


# ---------------------------------------------------------------------------------------------
# builders


def _unwrap(x):
    """(True, the arrays) of a PerStep value, (False, x) of anything else."""
    return (True, x.value) if is_per_step(x) else (False, x)


def substitution(site, value, mask=None, keep=0.0) -> Substitution:
    """A text-stream substitution at `site`; mask None replaces every position; keep 1.0 adds `value`
    to the current activations instead of replacing them.

    value: [B, T, D] or [T, D] (shared by the batch); mask: bool [B, T] or [T], e.g.
    `layout.text_mask('text[padding]', content_mask)` for padding-only patching. For a sampler run,
    value or mask may be `per_step(...)` of [S, ...] arrays (one slice per denoising step).
    """
    value_steps, value = _unwrap(value)
    value = jnp.asarray(value)
    lead = int(value_steps)
    if value.ndim - lead not in (2, 3):
        hint = "; a leading step axis must be marked with per_step(value)" if value.ndim == 4 and not lead else ""
        raise ValueError(f"substitution value must be [B, T, D] or [T, D]{' after its step axis' if lead else ''}, "
                         f"got shape {value.shape}{hint}")
    value = jnp.expand_dims(value, lead) if value.ndim - lead == 2 else value
    mask_steps, mask = _unwrap(mask)
    mask = jnp.ones((1, value.shape[-2]), bool) if mask is None else jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"substitution mask must be boolean, got {mask.dtype}")
    mask = jnp.expand_dims(mask, int(mask_steps)) if mask.ndim - int(mask_steps) == 1 else mask
    if not _broadcasts_to(mask.shape[int(mask_steps):], value.shape[lead:-1]) and \
            not _broadcasts_to(value.shape[lead:-1], mask.shape[int(mask_steps):]):
        raise ValueError(f"substitution mask {mask.shape} does not fit value {value.shape} without its last axis")
    site_steps, site = _unwrap(site)
    site = jnp.asarray(site, jnp.int32)
    if not site_steps and site.ndim == 0 and _is_concrete(site) and int(site) < BLOCK0_INPUT:
        raise ValueError(f"substitution site {int(site)}: use -1 (input of block 0) or a block index")
    return Substitution(site=PerStep(site) if site_steps else site, value=PerStep(value) if value_steps else value,
                        mask=PerStep(mask) if mask_steps else mask, keep=jnp.asarray(keep, jnp.float32))


def stack(items: Sequence):
    """Stack pytrees of one structure (interventions, substitutions, knockouts) on a new leading
    axis V, for `jax.vmap(..., in_axes=0)` over a sweep."""
    items = list(items)
    if not items:
        raise ValueError("nothing to stack")
    structure = jax.tree_util.tree_structure(items[0])
    for i, it in enumerate(items[1:], 1):
        if jax.tree_util.tree_structure(it) != structure:
            raise ValueError(f"item {i} has a different structure from item 0; a sweep varies values only")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *items)


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
        if any(v is not None and v < 0 for v in (start, stop)):
            raise ValueError(f"block range {blocks!r}: negative bounds are not allowed; count blocks from 0")
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

    content_mask: bool [B, T] or [T], True at the instruction's tokens. Raises if some query of
    some sample would be left with no key to attend to in some block. Combine knockouts with
    different block ranges with `&`.
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
    return Knockout(allowed=jnp.asarray(allowed), groups=jnp.asarray(groups),
                    stream_counts=(layout.n_img, *layout.ref_counts))


def allow_all(config: Flux2Config, layout: TokenLayout, content_mask) -> Knockout:
    """A knockout that cuts nothing (equals no knockout; useful as a sweep's baseline cell)."""
    return knockout(config, layout, content_mask, [], blocks=[])


def cut_reference(config: Flux2Config, layout: TokenLayout, content_mask, from_block: int) -> Knockout:
    """Every edge into and out of the reference tokens cut from `from_block` on: the mask form of
    `drop_reference(layout, from_block)`. References still attend to each other, so no query goes
    empty; the non-reference outputs equal the dropped form's."""
    edges = [f"ref->{g}" for g in ("text", "image")] + [f"{g}->ref" for g in ("text", "image")]
    return knockout(config, layout, content_mask, edges, blocks=range(from_block, config.num_blocks))


def drop_reference(layout: TokenLayout, from_block: int) -> DropReference:
    """Remove the reference tokens from the sequence from block `from_block` on (0: never seen)."""
    if layout.num_refs == 0:
        raise ValueError("this layout has no reference tokens to drop")
    if from_block < 0:
        raise ValueError(f"from_block must be >= 0, got {from_block}")
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


# ---------------------------------------------------------------------------------------------
# applying interventions and recording captures inside the forward (fluxjax.model)


def substitute(substitutions: Sequence[Substitution], h, site):
    """The text stream h [B, T, D] at `site` (an int, or a traced block index) after every
    substitution at that site, in order: new = where(mask, value + keep * current, current)."""
    for sub in substitutions:
        hit = (sub.site == site) & sub.mask[..., None]
        h = jnp.where(hit, sub.value.astype(h.dtype) + sub.keep.astype(h.dtype) * h, h)
    return h


@struct.dataclass
class LayerValues:
    """What one block of a scan reads of the interventions and captures (scanned along the blocks)."""

    index: jax.Array  # int32 []: the global block index (substitution sites compare to it)
    text_slot: jax.Array  # int32 []: where its text output is captured, -1 if it is not
    image_slot: jax.Array  # int32 []: the same for the image stream
    allowed: jax.Array | None  # bool [G, G]: its knockout table, None without a knockout

    def mask(self, knockout: Knockout | None, n_txt: int, length: int) -> KeyGroups | None:
        """The block's knockout for a joint sequence of `length` tokens, as key groups for
        `fluxjax.numerics.attention` (no [L, L] mask is formed), or None. The references are last,
        so a drop truncates the groups."""
        if self.allowed is None:
            return None
        return KeyGroups(allowed=self.allowed, groups=knockout.groups[:, :length],
                         segments=key_segments(n_txt, length, self.allowed.shape[-1], knockout.stream_counts))


def _slot_table(sites: tuple[int, ...], num_blocks: int) -> np.ndarray:
    slots = np.full(num_blocks, -1, np.int32)
    for j, s in enumerate(sites):
        if s >= 0:
            slots[s] = j
    return slots


def layer_values(iv: Interventions, capture: Capture, config: Flux2Config, start: int, stop: int) -> LayerValues:
    """The `LayerValues` of global blocks [start, stop), stacked on a leading layer axis."""
    idx = np.arange(start, stop, dtype=np.int32)
    allowed = None if iv.knockout is None else iv.knockout.allowed[start:stop]
    return LayerValues(index=idx, text_slot=_slot_table(capture.text, config.num_blocks)[idx],
                       image_slot=_slot_table(capture.image, config.num_blocks)[idx], allowed=allowed)


def begin_captures(capture: Capture, text, image) -> Captures:
    """Zeroed capture buffers for `capture`, holding the input of block 0 where it is asked for.

    text [B, T, D], image [B, N, D]: the streams at the input of block 0.
    """
    def buffer(sites, h):
        if not sites:
            return None
        buf = jnp.zeros((len(sites), *h.shape), h.dtype)
        return buf.at[sites.index(BLOCK0_INPUT)].set(h) if BLOCK0_INPUT in sites else buf

    kept = image if capture.image_tokens is None else image[:, :capture.image_tokens]
    return Captures(text=buffer(capture.text, text), image=buffer(capture.image, kept))


def record_block(captures: Captures, layer: LayerValues, text, image) -> Captures:
    """`captures` with one block's outputs written to its slots. A block that is not captured
    (slot -1) rewrites slot 0 with its own value, so the buffers hold exactly the requested sites."""
    def store(buf, slot, h):
        if buf is None:
            return None
        at = jnp.maximum(slot, 0)
        h = jnp.where(slot >= 0, h[:, :buf.shape[2]], jax.lax.dynamic_index_in_dim(buf, at, 0, keepdims=False))
        return jax.lax.dynamic_update_index_in_dim(buf, h, at, 0)

    return Captures(text=store(captures.text, layer.text_slot, text),
                    image=store(captures.image, layer.image_slot, image))


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of blocks [start, stop) of one kind, before which the references may leave."""

    start: int
    stop: int
    double: bool
    drop_refs: bool  # the reference tokens leave the sequence before this segment


def block_segments(config: Flux2Config, drop: DropReference | None) -> list[Segment]:
    """The forward's blocks as runs of one kind (double, then single), split where the references
    leave the sequence (`DropReference`); dropping them after the last block is an empty last run."""
    nd, nb = config.depth, config.num_blocks
    at = nb + 1 if drop is None else drop.from_block
    bounds = sorted({0, nd, nb, min(at, nb)})
    segments = [Segment(a, b, a < nd, a == at) for a, b in zip(bounds, bounds[1:]) if a < b]
    if at == nb:
        segments.append(Segment(nb, nb, nd == nb, True))
    return segments
