"""How the forward applies interventions and records captures, block by block (used by
`fluxjax.model` and `fluxjax.kv`): the substitution rule at a site, the values one block of the
layer scan reads (its index, capture slots and knockout table), the capture buffers, and the
block segments that reference removal splits the blocks into.

The interventions themselves (their types and builders) are `fluxjax.interventions`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.config import Flux2Config
from fluxjax.interventions import BLOCK0_INPUT, Capture, Captures, DropReference, Interventions, Knockout, Substitution
from fluxjax.layout import key_segments
from fluxjax.numerics import KeyGroups

def substitute(substitutions: Sequence[Substitution], h, site):
    """The text stream h [B, T, D] at `site` (an int, or a traced block index) after every
    substitution at that site, in order: new = where(mask, value + keep * current, current)."""
    for sub in substitutions:
        hit = (sub.site == site) & sub.mask[..., None]
        h = jnp.where(hit, sub.value.astype(h.dtype) + sub.keep.astype(h.dtype) * h, h)
    return h


def substitute_leading(substitutions: Sequence[Substitution], h, site):
    """The image stream h [B, N, D] at `site` after every image substitution there, in order: each
    writes the stream's first N' tokens (its value [B, N', D]) by the rule of `substitute`."""
    for sub in substitutions:
        n = sub.value.shape[-2]
        h = jnp.concatenate([substitute((sub,), h[:, :n], site), h[:, n:]], axis=1)
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
