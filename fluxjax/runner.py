"""The block runner: the one loop over FLUX.2's blocks, and where interventions meet them.

`run_blocks` runs the double blocks, joins the streams and runs the single blocks, each run of
blocks of one kind under one `lax.scan` over their stacked parameters (compile time does not grow
with depth). Around every block it applies the substitutions and records the captures of its sites
(`fluxjax.sites`: input, attention and MLP contributions, output; text, image and reference
streams), and it gives the block its attention as a closure: the layer's knockout table, the
cached keys of a [klein] KV cache, the kernel options. The blocks themselves have no modes.

The forward and the two [klein] KV forwards are configurations of this one runner:

    forward     `fluxjax.model.forward`: the joint sequence [text | image | references]
    KV extract  `fluxjax.kv.forward_kv_extract`: the same sequence, the references modulated at their
                own timestep and reading only each other (a knockout table), keep_kv=True returns
                every block's reference keys and values
    KV cached   `fluxjax.kv.forward_kv_cached`: [text | image] only, `cache` given: every block's
                keys and values get the cached references' appended (their knockout groups follow
                the image's)

What a block of a scan reads of the interventions (its index, capture slots, knockout table,
cached keys) is scanned along with its parameters (`LayerValues`). Reference removal
(`DropReference`) splits the blocks into runs before and after the references leave.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.blocks import BlockOut, Modulations, double_block, single_block
from fluxjax.captures import WHOLE_IMAGE_STREAM, Capture, Captures
from fluxjax.config import Flux2Config
from fluxjax.flow import AttentionFlow, Flow, TokenGroups, check_knockout_groups, group_means
from fluxjax.interventions import DropReference, Interventions
from fluxjax.layout import key_segments
from fluxjax.numerics import KeyGroups, attention, attention_flow
from fluxjax.options import RuntimeOptions
from fluxjax.sites import EMBED, Lanes

INNER = ("attn_out", "mlp_out")  # the points inside a block, reached through its `edit`


def stream_lanes(n_txt: int, n_stream: int, num_ref_tokens: int | None, iv: Interventions) -> tuple[Lanes, bool]:
    """The forward's lanes and whether it knows which image-stream tokens are references: from
    `num_ref_tokens`, else from the layout the knockout or the edge gates were built for, or the reference removal; otherwise the whole
    image stream counts as image (which the older captures and text-only interventions need)."""
    n_ref = num_ref_tokens
    for edges in (iv.knockout, iv.gates):  # either knows the layout it was built for
        if n_ref is None and edges is not None and edges.stream_counts is not None:
            n_ref = sum(edges.stream_counts[1:])
    if n_ref is None and iv.drop_reference is not None:
        n_ref = iv.drop_reference.num_ref_tokens
    if n_ref is not None and not 0 <= n_ref < n_stream:
        raise ValueError(f"num_ref_tokens {n_ref} does not fit an image stream of {n_stream} tokens; give "
                         "layout.n_ref (0 without references)")
    return Lanes(n_txt, n_stream - (n_ref or 0), n_ref or 0), n_ref is not None


# --- reading and writing a lane of the streams ----------------------------------------------------
# Streams are (text, image stream) in double blocks and the joint array in single blocks.


def _read(h, lanes: Lanes, lane: str, tokens: int | None = None):
    start, stop = lanes.span(lane, tokens)
    if isinstance(h, tuple):
        return h[0] if lane == "text" else h[1][:, start - lanes.n_txt:stop - lanes.n_txt]
    return h[:, start:stop]


def _write(h, lanes: Lanes, lane: str, value, tokens: int | None = None):
    start, stop = lanes.span(lane, tokens)
    if isinstance(h, tuple):
        if lane == "text":
            return value, h[1]
        return h[0], h[1].at[:, start - lanes.n_txt:stop - lanes.n_txt].set(value)
    return h.at[:, start:stop].set(value)


def _substitutions(iv: Interventions) -> tuple:
    """Every substitution, in order: the older image-stream ones (`Interventions.image_substitutions`)
    after the rest, on the lane of the image stream's leading tokens."""
    return iv.substitutions + tuple(s.replace(stream=WHOLE_IMAGE_STREAM) for s in iv.image_substitutions)


def _substitute(h, lanes: Lanes, substitutions, point: str, index):
    """`h` after every substitution at (index, point), in order: new = where(mask, value + keep *
    current, current) on the substitution's lane. index: the block (an int, or a traced index)."""
    for sub in substitutions:
        if sub.point != point or not lanes.has(sub.stream):
            continue
        tokens = sub.value.shape[-2] if sub.stream == WHOLE_IMAGE_STREAM else None  # the leading tokens
        current = _read(h, lanes, sub.stream, tokens)
        hit = (sub.block == index) & sub.mask[..., None]
        new = jnp.where(hit, sub.value.astype(current.dtype) + sub.keep.astype(current.dtype) * current, current)
        h = _write(h, lanes, sub.stream, new, tokens)
    return h


# --- captures ----------------------------------------------------------------------------------------


def _tokens(capture: Capture, lane: str) -> int | None:
    return capture.image_tokens if lane == WHOLE_IMAGE_STREAM else None


def _begin_captures(capture: Capture, h, lanes: Lanes) -> dict:
    """Zeroed buffers [n, B, tokens, D] of every capture kind, holding the input projections' output
    (block -1) where it is asked for."""
    buffers = {}
    for kind, blocks in capture.plan():
        value = _read(h, lanes, kind.lane, _tokens(capture, kind.lane))
        buf = jnp.zeros((len(blocks), *value.shape), value.dtype)
        if EMBED in blocks and kind.point == "output":
            buf = buf.at[blocks.index(EMBED)].set(value)
        buffers[kind.key] = buf
    return buffers


def _record(buffers: dict, capture: Capture, slots: dict, point: str, h, lanes: Lanes) -> dict:
    """`buffers` with the streams `h` at `point` written to this block's slots. A block that is not
    captured (slot -1) rewrites slot 0 with its own value, so the buffers hold exactly the requested
    sites."""
    out = dict(buffers)
    for kind, _ in capture.plan():
        if kind.point != point or not lanes.has(kind.lane):
            continue
        buf, slot = buffers[kind.key], slots[kind.key]
        value = _read(h, lanes, kind.lane, _tokens(capture, kind.lane)).astype(buf.dtype)
        at = jnp.maximum(slot, 0)
        value = jnp.where(slot >= 0, value, jax.lax.dynamic_index_in_dim(buf, at, 0, keepdims=False))
        out[kind.key] = jax.lax.dynamic_update_index_in_dim(buf, value, at, 0)
    return out


# --- attention flow (fluxjax.flow) -------------------------------------------------------------------
# Buffers beside the captures': "flow.mass" [n, B, H, G, G] at Flow.blocks, "flow.token_mass"
# [m, B, L, H, G] at Flow.tokens, and their "carried" twins; slots "flow" and "flow.tokens".

FLOW_TABLES, FLOW_TOKENS = "flow", "flow.tokens"


def _flow_buffers(flow: Flow | None, groups: TokenGroups | None, batch: int, heads: int, length: int) -> dict:
    if flow is None:
        return {}
    G = groups.num_groups
    names = ("mass", "carried") if flow.carried else ("mass",)
    out = {f"flow.{n}": jnp.zeros((len(flow.blocks), batch, heads, G, G), jnp.float32) for n in names}
    out.update({f"flow.token_{n}": jnp.zeros((len(flow.tokens), batch, length, heads, G), jnp.float32)
                for n in names})
    return out


def _flow_slots(flow: Flow | None, num_blocks: int) -> dict:
    """Slot tables [num_blocks] of the flow buffers (-1: not kept)."""
    if flow is None:
        return {}
    slots = {}
    for key, blocks in ((FLOW_TABLES, flow.blocks), (FLOW_TOKENS, flow.tokens)):
        table = np.full(num_blocks, -1, np.int32)
        table[list(blocks)] = np.arange(len(blocks), dtype=np.int32)
        slots[key] = table
    return slots


def _put(buf, slot, value):
    """buf with `value` at `slot`, or unchanged for slot -1 (slot 0 rewritten with its own value)."""
    at = jnp.maximum(slot, 0)
    value = jnp.where(slot >= 0, value, jax.lax.dynamic_index_in_dim(buf, at, 0, keepdims=False))
    return jax.lax.dynamic_update_index_in_dim(buf, value, at, 0)


def _record_flow(buffers: dict, slots: dict, measured, groups: TokenGroups) -> dict:
    """`buffers` with one block's measured flow (mass, carried: [B, Lq, H, G] each) written to its
    slots: the [G, G] means over each query group, and the per-token rows (NaN past Lq)."""
    if measured is None:
        return buffers
    out = dict(buffers)
    for name, rows in zip(("mass", "carried"), measured):
        if rows is None:
            continue
        B, Lq = rows.shape[:2]
        qgroups = jnp.broadcast_to(groups.groups[:, :Lq], (B, Lq))
        out[f"flow.{name}"] = _put(buffers[f"flow.{name}"], slots[FLOW_TABLES],
                                   group_means(rows, qgroups, groups.num_groups))
        tokens = buffers[f"flow.token_{name}"]
        if tokens.shape[0]:
            padded = jnp.pad(rows, ((0, 0), (0, tokens.shape[2] - Lq), (0, 0), (0, 0)), constant_values=jnp.nan)
            out[f"flow.token_{name}"] = _put(tokens, slots[FLOW_TOKENS], padded)
    return out


def _end_flow(buffers: dict, flow: Flow | None) -> tuple[dict, AttentionFlow | None]:
    """The capture buffers without the flow's, and the flow's as an `AttentionFlow`."""
    if flow is None:
        return buffers, None
    rest = {k: v for k, v in buffers.items() if not k.startswith("flow.")}
    return rest, AttentionFlow(mass=buffers["flow.mass"], carried=buffers.get("flow.carried"),
                               token_mass=buffers["flow.token_mass"], token_carried=buffers.get("flow.token_carried"),
                               blocks=flow.blocks, token_blocks=flow.tokens)


def check_flow(flow: Flow | None, groups: TokenGroups | None, iv: Interventions, lanes: Lanes, batch: int) -> None:
    """Raise a ValueError that says what to fix where `groups` do not fit the flow asked for."""
    if flow is None:
        return
    if groups is None:
        raise ValueError("Capture(flow=...) measures attention between token groups: pass groups="
                         "fluxjax.token_groups(layout, content_mask)")
    shape = np.shape(groups.groups)
    if len(shape) != 2 or shape[0] not in (1, batch) or shape[1] != lanes.length:
        raise ValueError(f"flow groups of shape {shape} do not fit this forward's joint sequence [B, T + N] = "
                         f"{(batch, lanes.length)}; build them from this forward's layout")
    if sum(groups.stream_counts) != lanes.n_img + lanes.n_ref:
        raise ValueError(f"flow groups were built for an image stream of {sum(groups.stream_counts)} tokens, this "
                         f"forward has {lanes.n_img + lanes.n_ref}; build them from this forward's layout")
    knock = iv.knockout
    if knock is not None and (np.shape(knock.allowed)[-1] != groups.num_groups or
                              knock.stream_counts not in (None, groups.stream_counts)):
        raise ValueError("the knockout and the flow's groups come from different layouts; build both from one "
                         "layout and content mask")
    check_knockout_groups(knock, groups)


# --- the layers of a scan -------------------------------------------------------------------------


@struct.dataclass
class LayerValues:
    """What one block of a scan reads of the interventions and the cache (scanned along the blocks)."""

    index: jax.Array  # int32 []: the global block index (substitution blocks compare to it)
    slots: dict  # capture buffer key -> int32 []: where this block's value goes, -1 if nowhere
    allowed: jax.Array | None  # bool [G, G] or [H, G, G]: its knockout table, None without a knockout
    gate: jax.Array | None  # float [G, G] or [H, G, G]: its edge gates, None without gates
    cached: tuple | None  # (k, v) [B, N_ref, H, K]: the references' keys and values, None without a cache


def _layer_values(iv: Interventions, capture: Capture, config: Flux2Config, start: int, stop: int,
                  cached) -> LayerValues:
    """The `LayerValues` of global blocks [start, stop), stacked on a leading layer axis."""
    idx = np.arange(start, stop, dtype=np.int32)
    slots = {}
    for kind, blocks in capture.plan():
        table = np.full(config.num_blocks, -1, np.int32)
        for j, b in enumerate(blocks):
            if b >= 0:
                table[b] = j
        slots[kind.key] = table[idx]
    slots.update({key: table[idx] for key, table in _flow_slots(capture.flow, config.num_blocks).items()})
    allowed = None if iv.knockout is None else iv.knockout.allowed[start:stop]
    gate = None if iv.gates is None else iv.gates.gate[start:stop]
    return LayerValues(index=idx, slots=slots, allowed=allowed, gate=gate, cached=cached)


def _attend(iv: Interventions, layer: LayerValues, n_txt: int, runtime: RuntimeOptions,
            flow: Flow | None = None, groups: TokenGroups | None = None, measure: str = "none"):
    """This layer's attention: the cached reference keys and values appended after the sequence's own,
    the knockout table and the edge gates applied as key groups (no [L, L] mask), through
    `fluxjax.numerics.attention`. measure: "none", "all" (every layer of the scan measures its flow:
    `attention_flow` with the flow's groups) or "some" (those with a flow slot; the others run the
    plain attention under a `lax.cond` and report zeros)."""
    knockout, gates = iv.knockout, iv.gates
    if gates is not None and measure != "none":
        raise ValueError("the attention flow is measured without edge gates: capture the flow in a run without "
                         "Interventions(gates=...)")

    def key_groups(n_q, n_k, allowed, source, stream_counts, gate=None):  # the references are last: a drop truncates
        return KeyGroups(allowed=allowed, groups=source[:, :n_q],
                         segments=key_segments(n_txt, n_k, allowed.shape[-1], stream_counts),
                         key_groups=None if n_k == n_q else source[:, :n_k], gate=gate,
                         softmax_fix=gates is not None and gates.softmax_fix)

    def plain(q, k, v):
        mask = None
        if layer.allowed is not None or layer.gate is not None:
            own = knockout if knockout is not None else gates
            allowed = layer.allowed if layer.allowed is not None else jnp.ones(layer.gate.shape[-2:], bool)
            mask = key_groups(q.shape[1], k.shape[1], allowed, own.groups, own.stream_counts, layer.gate)
        return attention(q, k, v, mask, runtime)

    def measured(q, k, v):
        G = groups.num_groups
        allowed = jnp.ones((G, G), bool) if layer.allowed is None else layer.allowed
        source = groups.groups if knockout is None else knockout.groups
        o, mass, carried = attention_flow(q, k, v, key_groups(q.shape[1], k.shape[1], allowed, source,
                                                               groups.stream_counts), runtime, carried=flow.carried)
        return o, (mass, carried)

    def attend(q, k, v):
        if layer.cached is not None:
            k = jnp.concatenate([k, layer.cached[0].astype(k.dtype)], axis=1)
            v = jnp.concatenate([v, layer.cached[1].astype(v.dtype)], axis=1)
        if measure == "none":
            return plain(q, k, v), None
        if measure == "all":
            return measured(q, k, v)
        shapes = jax.eval_shape(measured, q, k, v)[1]

        def unmeasured(q, k, v):
            return plain(q, k, v), jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        wanted = (layer.slots[FLOW_TABLES] >= 0) | (layer.slots[FLOW_TOKENS] >= 0)
        return jax.lax.cond(wanted, measured, unmeasured, q, k, v)

    return attend


# --- segments ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of blocks [start, stop) of one kind, before which the references may leave."""

    start: int
    stop: int
    double: bool
    drop_refs: bool  # the reference tokens leave the sequence before this segment


def block_segments(config: Flux2Config, drop: DropReference | None) -> list[Segment]:
    """The blocks as runs of one kind (double, then single), split where the references leave the
    sequence (`DropReference`); dropping them after the last block is an empty last run."""
    nd, nb = config.depth, config.num_blocks
    at = nb + 1 if drop is None else drop.from_block
    bounds = sorted({0, nd, nb, min(at, nb)})
    segments = [Segment(a, b, a < nd, a == at) for a, b in zip(bounds, bounds[1:]) if a < b]
    if at == nb:
        segments.append(Segment(nb, nb, nd == nb, True))
    return segments


def _without_references(h, mods: Modulations, lanes: Lanes):
    """The streams and per-token modulations with the reference tokens (the last ones) removed."""
    n = lanes.n_ref

    def cut(m):  # a modulation chunk [B, 1, D] is shared by every token and stays
        return m if m.shape[1] == 1 else m[:, :-n]

    h = (h[0], h[1][:, :-n]) if isinstance(h, tuple) else h[:, :-n]
    mods = Modulations(img=jax.tree_util.tree_map(cut, mods.img), txt=mods.txt,
                       single=jax.tree_util.tree_map(cut, mods.single))
    return h, mods, lanes.without_references()


# --- the runner -----------------------------------------------------------------------------------------


def run_blocks(params, config: Flux2Config, txt, img, mods: Modulations, rope, lanes: Lanes, iv: Interventions,
               capture: Capture, runtime: RuntimeOptions, *, cache=None, keep_kv: bool = False,
               groups: TokenGroups | None = None):
    """Every block on the embedded streams, with interventions and captures.

    txt: [B, T, D]; img: the image stream [B, N, D] (image tokens, then references); rope: (cos,
    sin) of the joint sequence (at least T + N positions, references last); lanes: the streams'
    token counts. cache: None, or per-block reference keys and values ((double k, double v),
    (single k, single v)), each [blocks, B, N_ref, H, K], appended to every block's own. keep_kv:
    also return every block's reference keys and values in that form (zeros where the references
    have left the sequence). groups: every token's group (`fluxjax.flow.TokenGroups`), the rows
    and columns of the attention flow where `capture.flow` asks for it.

    Returns (the joint stream after the last block [B, L', D], Captures, the reference keys and
    values or None).
    """
    subs, nd = _substitutions(iv), config.depth
    n_ref = lanes.n_ref
    inner = any(s.point in INNER for s in subs) or any(k.point in INNER for k, _ in capture.plan())
    flow = capture.flow
    check_flow(flow, groups, iv, lanes, txt.shape[0])
    h = _substitute((txt, img), lanes, subs, "output", EMBED)
    buffers = _begin_captures(capture, h, lanes)
    buffers.update(_flow_buffers(flow, groups, txt.shape[0], config.num_heads, lanes.length))
    kept = {True: [], False: []}

    for seg in block_segments(config, iv.drop_reference):
        if seg.drop_refs:  # the references leave: their tokens, or their cached keys and values
            if lanes.n_ref:
                h, mods, lanes = _without_references(h, mods, lanes)
            cache = None
        if not seg.double and isinstance(h, tuple):
            h = jnp.concatenate(h, axis=1)  # the join: text first
        if seg.start == seg.stop:
            continue
        length = lanes.length
        rope_l = tuple(r[:, :length] for r in rope)
        if seg.double:
            stacked = jax.tree_util.tree_map(lambda a: a[seg.start:seg.stop], params.double_blocks)

            def block(p, h, attend, edit):
                return double_block(p, h[0], h[1], mods.txt, mods.img, rope_l, attend, edit)
        else:
            stacked = jax.tree_util.tree_map(lambda a: a[seg.start - nd:seg.stop - nd], params.single_blocks)

            def block(p, z, attend, edit):
                return single_block(p, z, mods.single, rope_l, attend, edit)
        part = 0 if seg.double else 1
        offset = 0 if seg.double else nd
        cached = None if cache is None else tuple(a[seg.start - offset:seg.stop - offset] for a in cache[part])
        values = _layer_values(iv, capture, config, seg.start, seg.stop, cached)
        measured = [] if flow is None else [b for b in flow.measured if seg.start <= b < seg.stop]
        measure = "none" if not measured else "all" if len(measured) == seg.stop - seg.start else "some"
        h, buffers, kv = _scan(block, stacked, values, h, buffers, lanes, iv, capture, runtime, inner,
                               keep_kv and n_ref > 0, n_ref, groups, measure)
        kept[seg.double].append(kv)

    if isinstance(h, tuple):  # a model without single blocks
        h = jnp.concatenate(h, axis=1)
    buffers, measured_flow = _end_flow(buffers, flow)
    captures = Captures(buffers=buffers, index=capture.index(), legacy_text=len(capture.text), flow=measured_flow)
    if not keep_kv:
        return h, captures, None
    both = tuple(tuple(jnp.concatenate(parts, axis=0) for parts in zip(*kept[d])) if kept[d] else None
                 for d in (True, False))
    return h, captures, both


def _scan(block, stacked, values: LayerValues, h, buffers, lanes: Lanes, iv: Interventions, capture: Capture,
          runtime: RuntimeOptions, inner: bool, keep_kv: bool, n_ref: int, groups: TokenGroups | None = None,
          measure: str = "none"):
    """One run of blocks of one kind under `lax.scan`: the loop every configuration shares."""
    subs = _substitutions(iv)

    def body(carry, xs):
        h, buffers = carry
        p, layer = xs
        h = _substitute(h, lanes, subs, "input", layer.index)
        buffers = _record(buffers, capture, layer.slots, "input", h, lanes)
        edit = (lambda point, value: _substitute(value, lanes, subs, point, layer.index)) if inner else None
        attend = _attend(iv, layer, lanes.n_txt, runtime, capture.flow, groups, measure)
        res: BlockOut = block(p, h, attend, edit)
        buffers = _record_flow(buffers, layer.slots, res.measured, groups)
        for point in INNER:
            if getattr(res, point) is not None:
                buffers = _record(buffers, capture, layer.slots, point, getattr(res, point), lanes)
        h = _substitute(res.out, lanes, subs, "output", layer.index)
        buffers = _record(buffers, capture, layer.slots, "output", h, lanes)
        kv = None
        if keep_kv:  # the references' own keys and values, or zeros once they have left
            start, stop = Lanes(lanes.n_txt, lanes.n_img, n_ref).span("reference")
            kv = tuple(a[:, start:stop] if lanes.n_ref else jnp.zeros((a.shape[0], n_ref, *a.shape[2:]), a.dtype)
                       for a in res.kv)
        return (h, buffers), kv

    (h, buffers), kv = jax.lax.scan(body, (h, buffers), (stacked, values))
    return h, buffers, kv
