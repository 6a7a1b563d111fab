"""Attention flow: how much attention each token group pays each token group, per block, head and
step, measured inside the forward without an [L, L] array.

    groups = fluxjax.token_groups(layout, content_mask)
    capture = fluxjax.Capture(flow=fluxjax.Flow(blocks=range(config.num_blocks), tokens=(3,), carried=True))
    out, caps = fluxjax.forward(..., capture=capture, groups=groups, num_ref_tokens=layout.n_ref)
    caps.flow.mass                   # [n, B, H, G, G]: mass[j, b, h, gq, gk], block blocks[j]
    caps.flow.at(3)                  # [B, H, G, G]
    caps.flow.tokens_at(3)           # [B, L, H, G]: every query token's mass on each key group

Groups are the layout's (`fluxjax.layout`): text[content], text[padding], image, ref[0], ...
(G = 3 + references). Per query q, head h and key group g, the attention mass is

    mass[q, h, g] = sum_{k in g} softmax_k(q . k / sqrt(K)) = exp(lse_g(q) - lse(q))

the share of group g's part in the key-group attention's log-sum-exp merge
(`fluxjax.numerics.attention_flow`): the kernels that attend per key segment read it off their
log-sum-exp residuals (the text span's content and padding attended as two parts), the blocked
CPU kernel sums its probabilities per group in the same pass. `Flow.carried` adds the value-
weighted variant, what an edge carries rather than how much it is looked at:

    carried[q, h, g] = || sum_{k in g} p[q, k] v_k ||_2       (head dim, before the output projection)

Attention to sink tokens is large in mass and small in carried norm. The [G, G] tables average
over the queries of each group (per sample: groups differ by content mask); a group with no
queries in a sample is NaN there. Per-token maps (`Flow.tokens`) keep every query token's row
[L, H, G] at the blocks asked for (NaN rows for tokens removed by `DropReference`).

A knockout in the same call is applied as usual, and the flow is measured under it (a cut edge has
mass 0). The flow's groups must be the knockout's (one layout and content mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.layout import TokenLayout
from fluxjax.sites import static_index


@dataclasses.dataclass(frozen=True)
class Flow:
    """What a forward measures of its attention (static: part of a `fluxjax.Capture`).

    blocks: the blocks whose [G, G] tables to keep (global indices); tokens: the blocks whose per-
    token maps [L, H, G] to keep; carried: also the value-weighted variant. Blocks that are neither
    run the plain attention.
    """

    blocks: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    carried: bool = False

    def __post_init__(self):
        for name in ("blocks", "tokens"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError(f"Flow {name} must be block indices (e.g. {name}=range(config.num_blocks)), "
                                f"got {value!r}")
            value = tuple(static_index(b, f"Flow {name} block") for b in value)
            if len(set(value)) != len(value):
                raise ValueError(f"Flow {name} {value} repeat a block; ask for each block once")
            object.__setattr__(self, name, value)
        if not isinstance(self.carried, bool):
            raise TypeError(f"Flow carried must be True or False, got {self.carried!r}")

    @property
    def measured(self) -> tuple[int, ...]:
        """Every block whose attention is measured, sorted."""
        return tuple(sorted({*self.blocks, *self.tokens}))

    def validate(self, num_blocks: int) -> None:
        for b in (*self.blocks, *self.tokens):
            if not 0 <= b < num_blocks:
                raise ValueError(f"Flow block {b} out of range: this model's blocks are 0..{num_blocks - 1}")


@struct.dataclass
class TokenGroups:
    """Every joint-sequence token's group, the flow's rows and columns (`token_groups`).

    groups: int32 [B or 1, L] (a value: another content mask never recompiles); stream_counts
    (static): (n_img, *ref_counts), which cut the keys into the segments of `fluxjax.layout.key_segments`.
    """

    groups: jax.Array  # int32 [B or 1, L]
    stream_counts: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def num_groups(self) -> int:
        return 2 + len(self.stream_counts)


def token_groups(layout: TokenLayout, content_mask) -> TokenGroups:
    """The groups of `layout` with the text content marked by `content_mask` (bool [B or 1, T])."""
    return TokenGroups(groups=jnp.asarray(layout.group_ids(np.asarray(content_mask))),
                       stream_counts=(layout.n_img, *layout.ref_counts))


@struct.dataclass
class AttentionFlow:
    """The measured flow (module docstring). Under the sampler every array has a leading step axis
    [S], under `vmap` the sweep's axes lead too: index from the end, as `at` does."""

    mass: jax.Array | None  # float32 [..., n, B, H, G, G] at `blocks`
    carried: jax.Array | None  # float32 [..., n, B, H, G, G], or None
    token_mass: jax.Array | None  # float32 [..., m, B, L, H, G] at `token_blocks`
    token_carried: jax.Array | None  # float32 [..., m, B, L, H, G], or None
    blocks: tuple[int, ...] = struct.field(pytree_node=False, default=())
    token_blocks: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def at(self, block: int, carried: bool = False) -> jax.Array:
        """[..., B, H, G, G] of `block`: mean over the queries of group gq of the mass (or carried
        norm) on key group gk."""
        if block not in self.blocks:
            raise KeyError(f"the flow of block {block} was not captured; captured: {list(self.blocks)}")
        return self._field(carried, self.mass, self.carried)[..., self.blocks.index(block), :, :, :, :]

    def tokens_at(self, block: int, carried: bool = False) -> jax.Array:
        """[..., B, L, H, G] of `block`: every query token's mass (or carried norm) on each key group."""
        if block not in self.token_blocks:
            raise KeyError(f"per-token flow of block {block} was not captured; captured: {list(self.token_blocks)}")
        return self._field(carried, self.token_mass, self.token_carried)[..., self.token_blocks.index(block), :, :, :, :]

    @staticmethod
    def _field(carried: bool, mass, norms):
        if carried and norms is None:
            raise KeyError("the value-weighted flow was not captured; ask for Flow(..., carried=True)")
        return norms if carried else mass


def check_knockout_groups(knockout, groups: TokenGroups | None) -> None:
    """Raise a ValueError where a knockout and the flow's groups are concrete and differ (the table
    would cut by other groups than the flow reports)."""
    a = getattr(knockout, "groups", None)  # None, or a per-step value: nothing to compare here
    if a is None or groups is None or any(isinstance(x, jax.core.Tracer) for x in (a, groups.groups)):
        return
    a, b = np.asarray(a), np.asarray(groups.groups)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        return  # the forward's shape checks say what is wrong
    if not (a[:, None] == b[None]).all():
        raise ValueError("the knockout and the flow's groups differ (another layout or content mask); build both "
                         "from one layout and content mask")


def group_means(rows, groups, num_groups: int):
    """[B, H, G, G] from per-query rows [B, Lq, H, G] (queries' groups int32 [B or 1, Lq]): the mean
    of each query group's rows, NaN for a group without queries."""
    onehot = (groups[..., None] == jnp.arange(num_groups)).astype(jnp.float32)  # [B or 1, Lq, G]
    sums = jnp.einsum("bqa,bqhg->bhag", onehot, rows)
    counts = jnp.sum(onehot, axis=1)[:, None, :, None]  # [B or 1, 1, G, 1]
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan)
