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
what is captured is what the next block reads. `Interventions.image_substitutions` write the image
stream at the same sites (its noisy-image tokens come first, then the references: a value of
N' tokens replaces the stream's first N', e.g. `layout.n_img` for the noisy image alone; the
study's image-category T2I Lens).

Per-step values. The sampler (`fluxjax.sample`) runs the forward once per denoising step. An
intervention value that differs between steps is wrapped in `PerStep` (every array in it carries a
leading [S] axis: step s sees slice s); anything not wrapped is shared by every step. The forward
itself takes no `PerStep` value: the wrapping says explicitly which axis is the step axis.

Axis names as in `fluxjax.numerics`; V is a sweep axis added by `vmap`.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.config import Flux2Config
from fluxjax.layout import TokenLayout

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
    """Write a stream at `site` where `mask` is True: new = where(mask, value + keep * current,
    current). keep = 0 replaces (patching); keep = 1 adds `value` (additive patching, value = the
    source's activation minus the target's). keep is a value, so changing it does not recompile.
    The text stream's ([B, T, D]; mask [B, T]) in `Interventions.substitutions`, the image stream's
    leading N' tokens ([B, N', D]; mask [B, N']) in `Interventions.image_substitutions`.

    A batch axis of 1 is shared by every sample. Build it with `substitution`.
    """

    site: jax.Array  # int32 []: BLOCK0_INPUT or a global block index
    value: jax.Array  # [B or 1, T, D] (image: [B or 1, N', D])
    mask: jax.Array  # bool [B or 1, T] (image: [B or 1, N'])
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
    substitutions: tuple[Substitution, ...] = ()  # of the text stream
    knockout: Knockout | None = None
    drop_reference: DropReference | None = None
    image_substitutions: tuple[Substitution, ...] = ()  # of the image stream's leading tokens (value [B, N', D])


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
        for name in ("text", "image"):
            sites = getattr(self, name)
            if isinstance(sites, (str, bytes, Mapping)) or not isinstance(sites, Iterable):
                raise TypeError(f"Capture {name} must be a tuple of site indices (e.g. {name}=(3,)), got {sites!r}")
            sites = tuple(static_index(s, f"capture {name} site") for s in sites)
            if len(set(sites)) != len(sites):
                raise ValueError(f"capture {name} sites {sites} repeat a site; ask for each site once")
            object.__setattr__(self, name, sites)
        if self.image_tokens is not None:
            tokens = static_index(self.image_tokens, "Capture image_tokens")
            if tokens <= 0:
                raise ValueError(f"Capture image_tokens must be positive or None, got {tokens}")
            object.__setattr__(self, "image_tokens", tokens)

    def validate(self, config: Flux2Config):
        for name in ("text", "image"):
            for s in getattr(self, name):
                if not BLOCK0_INPUT <= s < config.num_blocks:
                    raise ValueError(f"capture {name} site {s} out of range: this model's sites are -1 (input of "
                                     f"block 0) and its blocks 0..{config.num_blocks - 1}")


@struct.dataclass
class Captures:
    text: jax.Array | None = None  # [n_text_sites, B, T, D], in Capture.text order
    image: jax.Array | None = None  # [n_image_sites, B, N', D], in Capture.image order


# ---------------------------------------------------------------------------------------------
# validation at trace time (shapes and static fields only: values may be tracers)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def static_index(value, what: str) -> int:
    """`value` as a Python int: an int, a numpy integer or a concrete integer array of one element;
    bools, floats and anything else raise a TypeError naming `what`."""
    if isinstance(value, (bool, np.bool_)) or np.dtype(getattr(value, "dtype", np.int32)) == np.bool_:
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None


def _dtype_of(x) -> np.dtype:
    """The dtype an array-like has (or would have as a numpy array), without converting a jax array."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_float_value(dtype, what: str) -> None:
    """Refuse a non-floating value dtype (int, bool, complex): it would be cast into the stream silently."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what} must be a floating-point array, got dtype {dtype}; cast it to the model's dtype "
                        "yourself if that is what you mean")


def _check_safe_cast(dtype, stream, what: str) -> None:
    """Refuse a value whose dtype does not cast into the stream's without loss (e.g. float32 into a
    bfloat16 stream, float16 into bfloat16): jnp.promote_types(value, stream) must be the stream's."""
    if jnp.promote_types(dtype, stream) != jnp.dtype(stream):
        raise TypeError(f"{what} is {dtype} but the model's text stream is {jnp.dtype(stream)}: the cast would "
                        f"lose precision; cast the value to {jnp.dtype(stream)} yourself if the rounding is intended")


def check_sites(iv: Interventions | None, config: Flux2Config) -> None:
    """Raise a ValueError for a substitution whose site (concrete: given, not traced) is not one of
    this model's: -1 or a block 0..num_blocks-1. The forward checks this when it is called outside
    jit; under jit the site is a traced value (changing it does not recompile), so `fluxjax.sample`
    and the experiments call this before compiling. Sites stacked for a sweep or per step are
    checked element by element."""
    if iv is None:
        return
    nb = config.num_blocks
    for what, subs in (("substitution", iv.substitutions), ("image substitution", iv.image_substitutions)):
        for i, sub in enumerate(subs):
            site = sub.site.value if is_per_step(sub.site) else sub.site
            if not _is_concrete(site):
                continue
            bad = [int(s) for s in np.unique(np.asarray(site)) if not BLOCK0_INPUT <= int(s) < nb]
            if bad:
                raise ValueError(f"{what} {i}: site {bad[0]} out of range: this model's sites are -1 (input of "
                                 f"block 0) and its blocks 0..{nb - 1}")


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def _check_substitution(sub: Substitution, what: str, nb: int, dtype) -> None:
    """A substitution's site, value dtype and mask dtype (its shapes depend on the stream it writes)."""
    if np.ndim(sub.site) != 0:
        raise ValueError(f"{what}: site must be a scalar, got shape {np.shape(sub.site)}; "
                         "to sweep sites, vmap over a stacked site array")
    if not jnp.issubdtype(_dtype_of(sub.site), jnp.integer):
        raise TypeError(f"{what}: site must be an integer, got dtype {_dtype_of(sub.site)}")
    if _is_concrete(sub.site) and not BLOCK0_INPUT <= int(sub.site) < nb:
        raise ValueError(f"{what}: site {int(sub.site)} out of range: this model's sites are -1 "
                         f"(input of block 0) and its blocks 0..{nb - 1}")
    _check_float_value(_dtype_of(sub.value), f"{what}: value")
    if dtype is not None:
        _check_safe_cast(_dtype_of(sub.value), dtype, f"{what}: value")
    if _dtype_of(sub.mask) != np.bool_:
        raise TypeError(f"{what}: mask must be boolean, got dtype {_dtype_of(sub.mask)}")


def validate(iv: Interventions, capture: Capture, config: Flux2Config, batch: int, n_txt: int, n_stream: int,
             dtype=None):
    """Raise a ValueError (TypeError for a dtype) that says what to fix if `iv` or `capture` do not
    fit this forward. Shapes, dtypes and static fields only, plus the sites where they are concrete.

    batch, n_txt, n_stream: B, T and N of the forward's inputs (the image stream N includes the
    reference tokens). dtype: the text stream's (the model's); substitution values must cast into
    it without loss.
    """
    capture.validate(config)
    if any(is_per_step(n) for n in jax.tree_util.tree_leaves(iv, is_leaf=is_per_step)):
        raise ValueError("a PerStep intervention value has one slice per sampler step: give it to fluxjax.sample, "
                         "or pass one step's slice to the forward")
    nb, width, length = config.num_blocks, config.hidden_size, n_txt + n_stream
    for i, sub in enumerate(iv.image_substitutions):
        _check_substitution(sub, f"image substitution {i}", nb, dtype)
        n_lead = np.shape(sub.value)[-2] if np.ndim(sub.value) == 3 else None
        kept = n_stream - (iv.drop_reference.num_ref_tokens if iv.drop_reference is not None else 0)
        if n_lead is None or not 0 < n_lead <= kept or not _broadcasts_to(np.shape(sub.value), (batch, n_lead, width)):
            raise ValueError(f"image substitution {i}: value of shape {np.shape(sub.value)} does not fit the image "
                             f"stream [B, N', D] with N' <= {kept} leading tokens and D = {width} (a batch axis of 1 "
                             "is shared; e.g. N' = layout.n_img for the noisy image)")
        if np.ndim(sub.mask) != 2 or not _broadcasts_to(np.shape(sub.mask), (batch, n_lead)):
            raise ValueError(f"image substitution {i}: mask of shape {np.shape(sub.mask)} does not fit its value's "
                             f"tokens [B, N'] = {(batch, n_lead)}")
    for i, sub in enumerate(iv.substitutions):
        _check_substitution(sub, f"substitution {i}", nb, dtype)
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
            raise ValueError(f"drop_reference from block {drop.from_block} out of range: give 0..{nb} (this model "
                             f"has blocks 0..{nb - 1}; {nb}: the references leave after the last block)")
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
    """A stream substitution at `site` (`Interventions.substitutions`: the text stream;
    `image_substitutions`: the image stream's leading tokens); mask None replaces every position;
    keep 1.0 adds `value` to the current activations instead of replacing them.

    site: -1 (BLOCK0_INPUT) or a block index, an integer (the forward, or `fluxjax.sample` before
    compiling, checks it against the model's blocks). value: [B, T, D] or [T, D] (shared by the
    batch), floating point of a dtype that casts into the model's without loss (checked by the
    forward); mask: bool [B, T] or [T], e.g. `layout.text_mask('text[padding]', content_mask)` for
    padding-only patching. For a sampler run, site, value or mask may be `per_step(...)` of [S, ...]
    arrays (one slice per denoising step).
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
        raise ValueError(f"substitution value must be [B, T, D] or [T, D]{' after its step axis' if lead else ''}, "
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
    site_steps, site = _unwrap(site)
    if isinstance(site, (bool, np.bool_)) or not jnp.issubdtype(_dtype_of(site), jnp.integer):
        raise TypeError(f"substitution site must be an integer (-1 or a block index), got {site!r}")
    site = jnp.asarray(site, jnp.int32)
    if site.ndim != int(site_steps):
        raise ValueError(f"substitution site must be a scalar{' per step' if site_steps else ''}, got shape "
                         f"{site.shape}; to sweep sites, stack substitutions (fluxjax.interventions.stack)")
    if _is_concrete(site) and site.size and int(site.min()) < BLOCK0_INPUT:
        raise ValueError(f"substitution site {int(site.min())}: use -1 (input of block 0) or a block index")
    keep_dtype = _dtype_of(keep)
    if keep_dtype == np.bool_ or jnp.issubdtype(keep_dtype, jnp.complexfloating) or np.ndim(keep) != 0:
        raise TypeError(f"substitution keep must be a real scalar (0.0 replaces, 1.0 adds), got {keep!r}")
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


def block_indices(blocks, num_blocks: int, *, allow_empty: bool = False, what: str = "blocks") -> list[int]:
    """Blocks given as 'all', an int, 'a:b' / ':k' / 'k:' slices, a range or a list of ints.

    Raises a ValueError (TypeError for a bool, a float or another type) for a block the model does
    not have, a range past its last block, and a spec that selects no block (an empty list, 'k:k',
    '4:2'), unless allow_empty (a sweep's no-knockout end, e.g. range(n, n)). `what` names the
    argument in messages.
    """
    last = f"the valid blocks are 0..{num_blocks - 1}"
    if blocks is None or (isinstance(blocks, str) and blocks.strip() == "all"):
        out = list(range(num_blocks))
    elif isinstance(blocks, (bool, np.bool_)):
        raise TypeError(f"{what} {blocks!r}: a bool selects no block; give 'all', a block index, 'a:b', ':k', 'k:' "
                        "or a list of block indices")
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
            raise ValueError(f"{what} {blocks!r}: negative bounds are not allowed; count blocks from 0")
        start, stop = bounds[0] or 0, num_blocks if bounds[1] is None else bounds[1]
        if start > num_blocks or stop > num_blocks:
            raise ValueError(f"{what} {blocks!r} reaches past the last block: {last} (a range a:b stops at most at "
                             f"{num_blocks})")
        out = list(range(start, stop))
    elif isinstance(blocks, Iterable) and not isinstance(blocks, (bytes, Mapping)):
        out = [static_index(b, f"{what}: block index") for b in blocks]
    else:
        raise TypeError(f"{what} {blocks!r}: give 'all', a block index, 'a:b', ':k', 'k:' or a list of block indices")
    bad = [b for b in out if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what} {bad} out of range: {last}")
    if not out and not allow_empty:
        raise ValueError(f"{what} {blocks!r} select no block ({last}); a knockout that cuts nothing is no knockout")
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
             blocks="all", *, allow_empty: bool = False) -> Knockout:
    """Build a knockout that cuts `edges` (e.g. 'ref->text' or ['ref->text', 'ref->image']) in `blocks`.

    content_mask: bool [B, T] or [T], True at the instruction's tokens. Raises if some query of
    some sample would be left with no key to attend to in some block, and if the spec cuts nothing
    (no edge, no block, an edge between groups the layout lacks) unless allow_empty: a sweep's
    no-knockout cell (e.g. blocks k..n-1 at k = n), equal to no knockout. Combine knockouts with
    different block ranges with `&`.
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
