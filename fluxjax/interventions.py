"""Interventions as values: substitutions at sites, attention-edge knockouts, reference removal.

`Interventions` is one pytree argument of `fluxjax.forward`. Which interventions exist is its
structure (`()` / `None` where absent, each substitution's stream and point, the static fields of
`DropReference`); their contents are arrays. So `jit` compiles one program per structure and reuses
it when only values change (substituted activations, masks, substitution blocks, knockout tables),
and `vmap` over those arrays sweeps blocks, seeds and tasks in one call (see `stack`): a sweep over
the sites of one kind (stream, point) is one compiled call.

Sites are `fluxjax.sites` (block, stream, point): `"b17.text.attn_out"`, `fluxjax.site(3, "image",
"output")`. The older integer sites still work and name the text stream: -1 (`BLOCK0_INPUT`) the
input of block 0 (the output of the text input projection, 'embed.text.output'), b >= 0 the output
of block b; `Interventions.image_substitutions` write the image stream's leading N' tokens at those
sites (a value [B, N', D]; N' = `layout.n_img` is the named site 'b<k>.image.output'). At a site,
substitutions apply first, in order (the text stream's, then the image stream's), and a capture at
the same site sees the result.

Per-step values. The sampler (`fluxjax.sample`) runs the forward once per denoising step. An
intervention value that differs between steps is wrapped in `PerStep` (every array in it carries a
leading [S] axis: step s sees slice s); anything not wrapped is shared by every step. The forward
itself takes no `PerStep` value: the wrapping says explicitly which axis is the step axis.

Captures (`Capture`, `Captures`) live in `fluxjax.captures` and are re-exported here. Axis names as
in `fluxjax.numerics`; V is a sweep axis added by `vmap`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.captures import Capture, Captures  # noqa: F401  (re-exported: the older import path)
from fluxjax.config import Flux2Config
from fluxjax.layout import TokenLayout
from fluxjax.sites import EMBED, POINTS, STREAMS, Lanes, Site, as_site, static_index

BLOCK0_INPUT = EMBED  # the older integer text site -1: the input of block 0 ('embed.text.output')


@struct.dataclass
class PerStep:
    """A value (an array, or a pytree of arrays) with a leading [S] axis: one slice per sampler step.

    E.g. a patching run's `substitution(k, per_step(captures.text[:, j]), mask)`: the source run's
    step-s activations replace the target's at step s.
    """

    value: object


def per_step(value) -> PerStep:
    """Mark `value` (an array or pytree of arrays, each [S, ...]) as one slice per sampler step."""
    if not jax.config.jax_enable_x64 and any(_dtype_of(x) == np.float64 for x in jax.tree_util.tree_leaves(value)):
        raise TypeError("per_step value is float64, which JAX stores as float32 (x64 is off): the cast would lose "
                        "precision; cast it yourself, e.g. value.astype(np.float32)")
    value = jax.tree_util.tree_map(jnp.asarray, value)
    leaves = jax.tree_util.tree_leaves(value)
    if not leaves or any(leaf.ndim == 0 or leaf.shape[0] == 0 for leaf in leaves):
        raise ValueError(f"per_step needs arrays with a leading step axis [S, ...], S >= 1; got shapes "
                         f"{[tuple(leaf.shape) for leaf in leaves]}")
    return PerStep(value)


def is_per_step(node) -> bool:
    return isinstance(node, PerStep)


@struct.dataclass
class Substitution:
    """Write a stream at a site where `mask` is True: new = where(mask, value + keep * current,
    current). keep = 0 replaces (patching); keep = 1 adds `value` (additive patching, value = the
    source's activation minus the target's). keep is a value, so changing it does not recompile.

    The site is (block, stream, point): the block is a value (a sweep over blocks is one program),
    the stream and point are static. A batch axis of 1 is shared by every sample. Build it with
    `substitution`.
    """

    block: jax.Array  # int32 []: a global block index (-1: the input projections, point "output")
    value: jax.Array  # [B or 1, n, D], n the stream's tokens (T, N_img or N_ref)
    mask: jax.Array  # bool [B or 1, n]
    keep: jax.Array  # float32 []: the weight of the current activations
    stream: str = struct.field(pytree_node=False, default="text")
    point: str = struct.field(pytree_node=False, default="output")

    @property
    def site(self):
        """The older name of `block` (a text-output substitution's integer site)."""
        return self.block


@struct.dataclass
class Knockout:
    """Attention-edge knockout: per block (and optionally per head), which query group may attend
    to which key group.

    allowed[b, gq, gk] is False where queries of group gq may not attend to keys of group gk in
    block b; allowed[b, h, gq, gk] gives each head h its own table. `groups` gives every
    joint-sequence token's group (see fluxjax.layout). No [L, L] mask is ever formed from them.
    """

    allowed: jax.Array  # bool [num_blocks, G, G] or [num_blocks, H, G, G]
    groups: jax.Array  # int32 [B, L] (B may be 1: shared by the batch)
    # (n_img, *ref_counts) of the layout (static): lets attention treat the image and each
    # reference as key segments of one group; None treats the image stream as one segment
    stream_counts: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def per_head(self) -> bool:
        return np.ndim(self.allowed) == 4

    def __and__(self, other: "Knockout") -> "Knockout":
        """Both knockouts at once: an edge is allowed only where both allow it (a table shared by
        the heads combines with a per-head one head by head)."""
        a, b = np.shape(self.allowed), np.shape(other.allowed)
        if a[0] != b[0] or a[-2:] != b[-2:] or np.shape(self.groups) != np.shape(other.groups):
            raise ValueError("knockouts built for different layouts or models cannot be combined")
        if len(a) == len(b) == 4 and a != b:
            raise ValueError(f"per-head knockouts of {a[1]} and {b[1]} heads cannot be combined")
        if not any(isinstance(x, jax.core.Tracer) for x in (self.groups, other.groups)):
            if not np.array_equal(np.asarray(self.groups), np.asarray(other.groups)):
                raise ValueError("knockouts built from different content masks cannot be combined")
        return Knockout(allowed=jnp.logical_and(_heads_axis(self.allowed, b), _heads_axis(other.allowed, a)),
                        groups=self.groups, stream_counts=self.stream_counts)


def _heads_axis(allowed, other_shape):
    """A shared table [nb, G, G] with a head axis of 1 when the other table is per head."""
    return allowed[:, None] if np.ndim(allowed) == 3 and len(other_shape) == 4 else allowed


@struct.dataclass
class EdgeGates:
    """A gate on every attention edge between token groups, in every block (and head): queries of
    group gq weigh the keys of group gk by gate[b, (h,) gq, gk] (`fluxjax.numerics.gated_attention`).

    All ones is the plain forward; 0 on an edge is its knockout (`Knockout` with that edge cut), both
    exactly; the gates are values, differentiable in between, so `jax.grad` of a metric with respect
    to `gate` at 1 gives every edge's knockout linearised at once (attribution patching). With a
    knockout, an edge the knockout cuts stays cut whatever its gate. Build it with `edge_gates`.
    """

    gate: jax.Array  # float32 [num_blocks, G, G] or per head [num_blocks, H, G, G]
    groups: jax.Array  # int32 [B or 1, L], as `Knockout.groups`
    stream_counts: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
    # AtP*'s softmax remedy for the gradient at gate = 1 (`fluxjax.numerics.gated_attention`)
    softmax_fix: bool = struct.field(pytree_node=False, default=False)

    @property
    def per_head(self) -> bool:
        return np.ndim(self.gate) == 4


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
    # The older image-stream spelling: integer sites, each value [B, N', D] writing the image stream's
    # first N' tokens (the noisy image first, then the references), its mask [B, N'].
    image_substitutions: tuple[Substitution, ...] = ()
    gates: EdgeGates | None = None  # edge gates (`edge_gates`): the knockouts made differentiable


# ---------------------------------------------------------------------------------------------
# validation at trace time (shapes and static fields only: values may be tracers)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _dtype_of(x) -> np.dtype:
    """The dtype an array-like has (or would have as a numpy array), without converting a jax array."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_float_value(dtype, what: str) -> None:
    """Refuse a non-floating value dtype (int, bool, complex): it would be cast into the stream silently."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what} must be a floating-point array, got dtype {dtype}; cast it to the model's dtype "
                        "yourself if that is what you mean")


def _check_safe_cast(dtype, stream_dtype, what: str, stream: str = "text") -> None:
    """Refuse a value whose dtype does not cast into the stream's without loss (e.g. float32 into a
    bfloat16 stream, float16 into bfloat16): jnp.promote_types(value, stream) must be the stream's."""
    if jnp.promote_types(dtype, stream_dtype) != jnp.dtype(stream_dtype):
        raise TypeError(f"{what} is {dtype} but the model's {stream} stream is {jnp.dtype(stream_dtype)}: the cast "
                        f"would lose precision; cast the value to {jnp.dtype(stream_dtype)} yourself if the rounding "
                        "is intended")


def _first_block(point: str) -> int:
    """The smallest block a site of `point` has: -1 (the input projections) for outputs, else 0."""
    return EMBED if point == "output" else 0


def _range_error(what: str, sub: Substitution, block: int, nb: int) -> ValueError:
    if (sub.stream, sub.point) == ("text", "output"):
        return ValueError(f"{what}: site {block} out of range: this model's sites are -1 (input of block 0, "
                          f"'embed.text.output') and its blocks 0..{nb - 1} ('b<k>.text.output')")
    return ValueError(f"{what}: block {block} out of range for {sub.stream}.{sub.point}: this model's "
                      f"blocks are {_first_block(sub.point)}..{nb - 1}")


def _all_substitutions(iv: Interventions):
    """(what, substitution) of every substitution, the older image-stream ones named as such."""
    return [(f"substitution {i}", s) for i, s in enumerate(iv.substitutions)] + \
           [(f"image substitution {i}", s) for i, s in enumerate(iv.image_substitutions)]


def check_sites(iv: Interventions | None, config: Flux2Config) -> None:
    """Raise a ValueError for a substitution whose block (concrete: given, not traced) is not one of
    this model's: 0..num_blocks-1, or -1 (the input projections) at point 'output'. The forward
    checks this when it is called outside jit; under jit the block is a traced value (changing it
    does not recompile), so `fluxjax.sample` and the experiments call this before compiling. Blocks
    stacked for a sweep or per step are checked element by element."""
    if iv is None:
        return
    nb = config.num_blocks
    for what, sub in _all_substitutions(iv):
        block = sub.block.value if is_per_step(sub.block) else sub.block
        if not _is_concrete(block):
            continue
        bad = [int(b) for b in np.unique(np.asarray(block)) if not _first_block(sub.point) <= int(b) < nb]
        if bad:
            raise _range_error(what, sub, bad[0], nb)


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def _is_edge_table(shape, num_blocks: int, num_heads: int) -> bool:
    """A table over (query group, key group) edges: [num_blocks, G, G], or per head [num_blocks, H, G, G]."""
    return (len(shape) in (3, 4) and shape[0] == num_blocks and shape[-1] == shape[-2]
            and (len(shape) == 3 or shape[1] == num_heads))


def _check_edges(what: str, table, groups, stream_counts, config: Flux2Config, batch: int, lanes: Lanes,
                 cached_refs: int):
    """Raise if an edge table (a knockout's or the edge gates') and its token groups do not fit this
    forward: [num_blocks, (H,) G, G], groups [B or 1, T + N], built for this image stream."""
    nb, heads, shape = config.num_blocks, config.num_heads, np.shape(table)
    if not _is_edge_table(shape, nb, heads):
        raise ValueError(f"{what} table has shape {shape}; it must be [num_blocks, G, G] or per head "
                         f"[num_blocks, H, G, G] with num_blocks = {nb}, H = {heads}")
    g_shape, length = np.shape(groups), lanes.length + cached_refs
    if len(g_shape) != 2 or g_shape[1] != length or g_shape[0] not in (1, batch):
        raise ValueError(f"{what} groups of shape {g_shape} do not match this forward's joint sequence "
                         f"[B, T + N] = {(batch, length)}; build the {what} from this forward's layout")
    if stream_counts is not None and sum(stream_counts) != length - lanes.n_txt:
        raise ValueError(f"{what} built for an image stream of {sum(stream_counts)} tokens, this forward has "
                         f"{length - lanes.n_txt}; build the {what} from this forward's layout")


def validate(iv: Interventions, capture: Capture, config: Flux2Config, batch: int, lanes: Lanes,
             refs_known: bool = True, dtype=None, cached_refs: int = 0):
    """Raise a ValueError (TypeError for a dtype) that says what to fix if `iv` or `capture` do not
    fit this forward. Shapes, dtypes and static fields only, plus the blocks where they are concrete.

    batch: B; lanes: the token counts of the forward's streams. refs_known: whether the forward knows
    which image-stream tokens are references (otherwise image and reference sites are refused).
    dtype: the model's; substitution values must cast into it without loss. cached_refs: the
    reference keys of a [klein] KV cache (the cached forward's references are keys and values only:
    no reference tokens to capture; knockout groups cover them after the image).
    """
    capture.validate(config)
    if any(is_per_step(n) for n in jax.tree_util.tree_leaves(iv, is_leaf=is_per_step)):
        raise ValueError("a PerStep intervention value has one slice per sampler step: give it to fluxjax.sample, "
                         "or pass one step's slice to the forward")
    nb, width, n_txt = config.num_blocks, config.hidden_size, lanes.n_txt
    n_stream = lanes.n_img + lanes.n_ref
    drop = iv.drop_reference
    wants_refs = [s.name for s in capture.sites if s.stream != "text"] + \
                 [f"substitution {i}" for i, sub in enumerate(iv.substitutions) if sub.stream != "text"]
    if wants_refs and not refs_known:
        raise ValueError(f"{wants_refs[0]} reads the image stream, but this forward does not know which of its tokens "
                         "are references: pass num_ref_tokens=layout.n_ref (0 without references)")
    for what, sub in _all_substitutions(iv):
        if sub.stream not in STREAMS or sub.point not in POINTS:
            raise ValueError(f"{what}: unknown site kind {sub.stream}.{sub.point}; build it with "
                             "fluxjax.substitution")
        if np.ndim(sub.block) != 0:
            raise ValueError(f"{what}: site must be a scalar, got shape {np.shape(sub.block)}; "
                             "to sweep sites, vmap over a stacked site array")
        if not jnp.issubdtype(_dtype_of(sub.block), jnp.integer):
            raise TypeError(f"{what}: site must be an integer, got dtype {_dtype_of(sub.block)}")
        if _is_concrete(sub.block) and not _first_block(sub.point) <= int(sub.block) < nb:
            raise _range_error(what, sub, int(sub.block), nb)
        _check_float_value(_dtype_of(sub.value), f"{what}: value")
        if dtype is not None:
            _check_safe_cast(_dtype_of(sub.value), dtype, f"{what}: value",
                             "image" if what.startswith("image") else sub.stream)
        if _dtype_of(sub.mask) != np.bool_:
            raise TypeError(f"{what}: mask must be boolean, got dtype {_dtype_of(sub.mask)}")
    kept = n_stream - (drop.num_ref_tokens if drop is not None and lanes.n_ref else 0)
    for i, sub in enumerate(iv.image_substitutions):
        if (sub.stream, sub.point) != ("text", "output"):
            raise ValueError(f"image substitution {i} is built for the site {sub.stream}.{sub.point}; "
                             "image_substitutions take integer sites: put named sites in substitutions")
        n_lead = np.shape(sub.value)[-2] if np.ndim(sub.value) == 3 else None
        if n_lead is None or not 0 < n_lead <= kept or not _broadcasts_to(np.shape(sub.value), (batch, n_lead, width)):
            raise ValueError(f"image substitution {i}: value of shape {np.shape(sub.value)} does not fit the image "
                             f"stream [B, N', D] with N' <= {kept} leading tokens and D = {width} (a batch axis of 1 "
                             "is shared; e.g. N' = layout.n_img for the noisy image)")
        if np.ndim(sub.mask) != 2 or not _broadcasts_to(np.shape(sub.mask), (batch, n_lead)):
            raise ValueError(f"image substitution {i}: mask of shape {np.shape(sub.mask)} does not fit its value's "
                             f"tokens [B, N'] = {(batch, n_lead)}")
    for i, sub in enumerate(iv.substitutions):
        if sub.stream == "reference" and lanes.n_ref == 0:
            if cached_refs:
                continue  # acts where the cache is extracted: the cached forward has no reference tokens
            raise ValueError(f"substitution {i} writes the reference stream, but this forward has no reference "
                             "tokens")
        n = lanes.size(sub.stream)
        if np.ndim(sub.value) != 3 or not _broadcasts_to(np.shape(sub.value), (batch, n, width)):
            raise ValueError(f"substitution {i}: value of shape {np.shape(sub.value)} does not fit the {sub.stream} "
                             f"stream [B, n, D] = {(batch, n, width)} (a batch axis of 1 is shared)")
        if np.ndim(sub.mask) != 2 or not _broadcasts_to(np.shape(sub.mask), (batch, n)):
            raise ValueError(f"substitution {i}: mask of shape {np.shape(sub.mask)} does not fit the {sub.stream} "
                             f"tokens [B, n] = {(batch, n)} (a batch axis of 1 is shared)")
        if sub.stream == "reference" and drop is not None and _is_concrete(sub.block) and \
                int(sub.block) >= drop.from_block:
            raise ValueError(f"substitution {i} writes the reference stream at block {int(sub.block)}, but the "
                             f"references leave the sequence at block {drop.from_block}")
    for s in capture.sites:
        if s.stream == "reference" and (lanes.n_ref == 0 or (drop is not None and s.block >= drop.from_block)):
            why = ("this forward has no reference tokens" if lanes.n_ref == 0 else
                   f"the references leave the sequence at block {drop.from_block}")
            raise ValueError(f"capture site {s.name}: {why}")
    knock, gates = iv.knockout, iv.gates
    if knock is not None:
        _check_edges("knockout", knock.allowed, knock.groups, knock.stream_counts, config, batch, lanes, cached_refs)
        if jnp.result_type(knock.allowed) != jnp.bool_:
            raise ValueError(f"knockout.allowed must be boolean, got {jnp.result_type(knock.allowed)}")
    if gates is not None:
        _check_edges("edge gates", gates.gate, gates.groups, gates.stream_counts, config, batch, lanes, cached_refs)
        if not jnp.issubdtype(jnp.result_type(gates.gate), jnp.floating):
            raise TypeError(f"edge gates must be floating point, got {jnp.result_type(gates.gate)}")
        if knock is not None and np.shape(knock.allowed)[-1] != np.shape(gates.gate)[-1]:
            raise ValueError(f"the knockout has {np.shape(knock.allowed)[-1]} token groups, the edge gates "
                             f"{np.shape(gates.gate)[-1]}; build both from this forward's layout")
    if drop is not None:
        if not 0 <= drop.from_block <= nb:
            raise ValueError(f"drop_reference from block {drop.from_block} out of range: give 0..{nb} (this model "
                             f"has blocks 0..{nb - 1}; {nb}: the references leave after the last block)")
        if drop.num_ref_tokens != lanes.n_ref + cached_refs or lanes.n_img <= 0:
            raise ValueError(f"drop_reference removes {drop.num_ref_tokens} tokens from an image stream of "
                             f"{n_stream + cached_refs}; build it from this forward's layout")
        if capture.image and capture.image_tokens is None:
            raise ValueError("an image capture with drop_reference needs Capture(image_tokens=...): the image "
                             "stream changes length when the references leave; e.g. image_tokens=layout.n_img")
    keep_max = lanes.n_img if drop is not None else n_stream
    if capture.image and capture.image_tokens is not None and capture.image_tokens > keep_max:
        raise ValueError(f"capture asks for {capture.image_tokens} image tokens but at most {keep_max} are in the "
                         "stream at every site")


# ---------------------------------------------------------------------------------------------
# builders


def _unwrap(x):
    """(True, the arrays) of a PerStep value, (False, x) of anything else."""
    return (True, x.value) if is_per_step(x) else (False, x)


def _is_named_site(site) -> bool:
    return isinstance(site, (Site, str)) or (isinstance(site, tuple) and len(site) == 3)


def substitution(site, value, mask=None, keep=0.0) -> Substitution:
    """A substitution at `site`; mask None replaces every token of the stream; keep 1.0 adds `value`
    to the current activations instead of replacing them.

    site: a site of `fluxjax.sites` ('b17.image.attn_out', `fluxjax.site(3, "text", "output")`), or
    an integer, the older text-stream site (-1 = BLOCK0_INPUT the input of block 0, b the output of
    block b). The forward, or `fluxjax.sample` before compiling, checks the block against the
    model's. value: [B, n, D] or [n, D] (shared by the batch), n the stream's tokens (T, N_img or
    N_ref), floating point of a dtype that casts into the model's without loss (checked by the
    forward); mask: bool [B, n] or [n], e.g. `layout.text_mask('text[padding]', content_mask)` for
    padding-only patching. For a sampler run, an integer site, the value or the mask may be
    `per_step(...)` of [S, ...] arrays (one slice per denoising step).
    """
    value_steps, value = _unwrap(value)
    _check_float_value(_dtype_of(value), "substitution value")
    if not jax.config.jax_enable_x64 and _dtype_of(value) == np.float64:
        raise TypeError("substitution value is float64, which JAX stores as float32 (x64 is off): the cast would "
                        "lose precision; cast the value yourself, e.g. value.astype(np.float32)")
    value = jnp.asarray(value)
    lead = int(value_steps)
    if value.ndim - lead not in (2, 3):
        hint = "; a leading step axis must be marked with per_step(value)" if value.ndim == 4 and not lead else ""
        raise ValueError(f"substitution value must be [B, n, D] or [n, D]{' after its step axis' if lead else ''}, "
                         f"got shape {value.shape}{hint}")
    value = jnp.expand_dims(value, lead) if value.ndim - lead == 2 else value
    mask_steps, mask = _unwrap(mask)
    if mask is not None and _dtype_of(mask) != np.bool_:
        raise ValueError(f"substitution mask must be boolean, got {_dtype_of(mask)}; e.g. "
                         "layout.text_mask('text[padding]', content_mask)")
    mask = jnp.ones((1, value.shape[-2]), bool) if mask is None else jnp.asarray(mask)
    mask = jnp.expand_dims(mask, int(mask_steps)) if mask.ndim - int(mask_steps) == 1 else mask
    if not _broadcasts_to(mask.shape[int(mask_steps):], value.shape[lead:-1]) and \
            not _broadcasts_to(value.shape[lead:-1], mask.shape[int(mask_steps):]):
        raise ValueError(f"substitution mask {mask.shape} does not fit value {value.shape} without its last axis")
    stream, point = "text", "output"
    if _is_named_site(site):
        named = as_site(site)
        site, stream, point = named.block, named.stream, named.point
    site_steps, site = _unwrap(site)
    if isinstance(site, (bool, np.bool_)) or not jnp.issubdtype(_dtype_of(site), jnp.integer):
        raise TypeError(f"substitution site must be an integer (-1 or a block index) or a site such as "
                        f"'b3.text.output', got {site!r}")
    site = jnp.asarray(site, jnp.int32)
    if site.ndim != int(site_steps):
        raise ValueError(f"substitution site must be a scalar{' per step' if site_steps else ''}, got shape "
                         f"{site.shape}; to sweep sites, stack substitutions (fluxjax.interventions.stack)")
    if _is_concrete(site) and site.size and int(site.min()) < BLOCK0_INPUT:
        raise ValueError(f"substitution site {int(site.min())}: use -1 (input of block 0) or a block index, or "
                         "name the site, e.g. 'embed.text.output' or 'b3.text.output'")
    keep_dtype = _dtype_of(keep)
    if keep_dtype == np.bool_ or jnp.issubdtype(keep_dtype, jnp.complexfloating) or np.ndim(keep) != 0:
        raise TypeError(f"substitution keep must be a real scalar (0.0 replaces, 1.0 adds), got {keep!r}")
    return Substitution(block=PerStep(site) if site_steps else site, value=PerStep(value) if value_steps else value,
                        mask=PerStep(mask) if mask_steps else mask, keep=jnp.asarray(keep, jnp.float32),
                        stream=stream, point=point)


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


def block_indices(blocks, num_blocks: int, *, allow_empty: bool = False, what: str = "blocks",
                  unit: str = "block") -> list[int]:
    """Blocks given as 'all', an int, 'a:b' / ':k' / 'k:' slices, a range or a list of ints.

    Raises a ValueError (TypeError for a bool, a float or another type) for a block the model does
    not have, a range past its last block, and a spec that selects no block (an empty list, 'k:k',
    '4:2'), unless allow_empty (a sweep's no-knockout end, e.g. range(n, n)). `what` names the
    argument in messages, `unit` what is counted (heads are selected the same way).
    """
    last = f"the valid {unit}s are 0..{num_blocks - 1}"
    if blocks is None or (isinstance(blocks, str) and blocks.strip() == "all"):
        out = list(range(num_blocks))
    elif isinstance(blocks, (bool, np.bool_)):
        raise TypeError(f"{what} {blocks!r}: a bool selects no {unit}; give 'all', a {unit} index, 'a:b', ':k', "
                        f"'k:' or a list of {unit} indices")
    elif isinstance(blocks, (int, np.integer)):
        out = [int(blocks)]
    elif isinstance(blocks, str):
        parts = blocks.split(":")
        if len(parts) != 2:
            raise ValueError(f"{what} {blocks!r}: use 'all', 'a:b', ':k' or 'k:'")
        bounds = []
        for p in parts:
            p = p.strip()
            if p and not p.lstrip("-").isdigit():
                raise ValueError(f"{what} {blocks!r}: the bounds must be whole numbers, as in 'a:b', ':k' or 'k:'")
            bounds.append(int(p) if p else None)
        if any(v is not None and v < 0 for v in bounds):
            raise ValueError(f"{what} {blocks!r}: negative bounds are not allowed; count {unit}s from 0")
        start, stop = bounds[0] or 0, num_blocks if bounds[1] is None else bounds[1]
        if start > num_blocks or stop > num_blocks:
            raise ValueError(f"{what} {blocks!r} reaches past the last {unit}: {last} (a range a:b stops at most at "
                             f"{num_blocks})")
        out = list(range(start, stop))
    elif isinstance(blocks, Iterable) and not isinstance(blocks, (bytes, Mapping)):
        out = [static_index(b, f"{what}: {unit} index") for b in blocks]
    else:
        raise TypeError(f"{what} {blocks!r}: give 'all', a {unit} index, 'a:b', ':k', 'k:' or a list of {unit} "
                        "indices")
    bad = [b for b in out if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what} {bad} out of range: {last}")
    if not out and not allow_empty:
        raise ValueError(f"{what} {blocks!r} select no {unit} ({last}); a knockout that cuts nothing is no knockout")
    return sorted(set(out))


def _parse_edge(setting: str, layout: TokenLayout):
    if not isinstance(setting, str):
        raise TypeError(f"edge setting {setting!r} must be a string 'A->B', e.g. 'ref->text'")
    if "->" not in setting:
        raise ValueError(f"edge setting {setting!r} must read 'A->B' (information from A to B), e.g. 'ref->text'")
    source, dest = (s.strip() for s in setting.split("->", 1))
    # "A -> B": queries in B may not attend to keys in A.
    q_groups, k_groups = layout.groups_of(dest), layout.groups_of(source)
    if not q_groups or not k_groups:
        raise ValueError(f"edge setting {setting!r} cuts nothing: this layout has no reference tokens")
    return q_groups, k_groups


def knockout(config: Flux2Config, layout: TokenLayout, content_mask, edges: str | Sequence[str],
             blocks="all", *, heads=None, allow_empty: bool = False) -> Knockout:
    """Build a knockout that cuts `edges` (e.g. 'ref->text' or ['ref->text', 'ref->image']) in `blocks`.

    content_mask: bool [B, T] or [T], True at the instruction's tokens. heads: None cuts the edges in
    every head (a table shared by the heads, [num_blocks, G, G]); heads given as blocks are ('a:b',
    an int, a list) cut them in those heads only (a table per head, [num_blocks, H, G, G]). Raises
    if some query of some sample would be left with no key to attend to in some block (and head),
    and if the spec cuts nothing (no edge, no block, no head, an edge between groups the layout
    lacks) unless allow_empty: a sweep's no-knockout cell (e.g. blocks k..n-1 at k = n), equal to no
    knockout. Combine knockouts with different block or head ranges with `&`.
    """
    edges = [edges] if isinstance(edges, str) else list(edges)
    if not edges and not allow_empty:
        raise ValueError("knockout edges name no edge, so the knockout would cut nothing; give at least one "
                         "'A->B' (e.g. 'ref->text')")
    groups = layout.group_ids(content_mask)
    G = layout.num_groups
    cut = np.ones((G, G), bool)
    for e in edges:
        q_groups, k_groups = _parse_edge(e, layout)
        for gq in q_groups:
            for gk in k_groups:
                cut[gq, gk] = False
    allowed = np.ones((config.num_blocks, G, G), bool)
    for b in block_indices(blocks, config.num_blocks, allow_empty=allow_empty, what="knockout blocks"):
        allowed[b] = cut
    if heads is not None:
        chosen = block_indices(heads, config.num_heads, allow_empty=allow_empty, what="knockout heads", unit="head")
        per_head = np.ones((config.num_blocks, config.num_heads, G, G), bool)
        per_head[:, chosen] = allowed[:, None]
        allowed = per_head
    check_knockout(allowed, groups, layout)
    return Knockout(allowed=jnp.asarray(allowed), groups=jnp.asarray(groups),
                    stream_counts=(layout.n_img, *layout.ref_counts))


def allow_all(config: Flux2Config, layout: TokenLayout, content_mask) -> Knockout:
    """A knockout that cuts nothing (equals no knockout; useful as a sweep's baseline cell)."""
    return knockout(config, layout, content_mask, [], blocks=[], allow_empty=True)


def cut_reference(config: Flux2Config, layout: TokenLayout, content_mask, from_block: int, *,
                  allow_empty: bool = False) -> Knockout:
    """Every edge into and out of the reference tokens cut from `from_block` on: the mask form of
    `drop_reference(layout, from_block)`. References still attend to each other, so no query goes
    empty; the non-reference outputs equal the dropped form's.

    from_block: 0..num_blocks-1; num_blocks (nothing cut: a sweep's never-dropped end) only with
    allow_empty."""
    if layout.num_refs == 0:
        raise ValueError("cut_reference: this layout has no reference tokens to cut")
    n = config.num_blocks
    from_block = static_index(from_block, "cut_reference from_block")
    if not 0 <= from_block <= n or (from_block == n and not allow_empty):
        raise ValueError(f"cut_reference from_block {from_block} out of range: give 0..{n - 1} (this model has "
                         f"{n} blocks; {n} cuts nothing, allowed only with allow_empty=True)")
    edges = [f"ref->{g}" for g in ("text", "image")] + [f"{g}->ref" for g in ("text", "image")]
    return knockout(config, layout, content_mask, edges, blocks=range(from_block, n), allow_empty=allow_empty)


def edge_gates(config: Flux2Config, layout: TokenLayout, content_mask, *, per_head: bool = True, value=1.0,
               softmax_fix: bool = False) -> EdgeGates:
    """Gates on every edge between the layout's token groups in every block, all at `value` (1: the
    plain forward): one table per head [num_blocks, H, G, G], or shared by the heads
    [num_blocks, G, G] unless per_head. content_mask: bool [B, T] or [T], as `knockout`'s.
    softmax_fix: AtP*'s remedy for the gradient at 1 (`fluxjax.numerics.gated_attention`)."""
    groups = layout.group_ids(content_mask)
    G = layout.num_groups
    shape = (config.num_blocks, config.num_heads, G, G) if per_head else (config.num_blocks, G, G)
    return EdgeGates(gate=jnp.full(shape, value, jnp.float32), groups=jnp.asarray(groups),
                     stream_counts=(layout.n_img, *layout.ref_counts), softmax_fix=softmax_fix)


def drop_reference(layout: TokenLayout, from_block: int) -> DropReference:
    """Remove the reference tokens from the sequence from block `from_block` on (0: never seen;
    num_blocks: after the last block, the forward checks the upper bound against its model)."""
    if layout.num_refs == 0:
        raise ValueError("this layout has no reference tokens to drop")
    from_block = static_index(from_block, "drop_reference from_block")
    if from_block < 0:
        raise ValueError(f"drop_reference from_block must be >= 0 (0: the reference is never seen), got {from_block}")
    return DropReference(from_block=from_block, num_ref_tokens=layout.n_ref)


def check_knockout(allowed, groups, layout: TokenLayout | None = None):
    """Raise if any query token of any sample has no allowed key in any block (and head).

    allowed: bool [blocks, G, G] or per head [blocks, H, G, G]."""
    allowed = np.asarray(allowed, bool)
    groups = np.asarray(groups)
    names = layout.group_names if layout is not None else None
    for row in range(groups.shape[0]):
        present = np.zeros(allowed.shape[-1], bool)
        present[np.unique(groups[row])] = True
        reachable = (allowed & present).any(axis=-1)  # [blocks, (H,) G]
        empty = np.argwhere(~reachable & present)
        if empty.size:
            b, g = empty[0][0], empty[0][-1]
            who = names[g] if names else f"group {g}"
            head = f" (head {empty[0][1]})" if allowed.ndim == 4 else ""
            raise ValueError(f"knockout leaves the {who} queries of sample {row} with no key to attend to "
                             f"in block {b}{head}; keep at least one key group for every query group")
