"""What a forward returns besides its output: the activations at the sites a `Capture` names, and
the attention flow a `Capture(flow=fluxjax.Flow(...))` asks for (`caps.flow`, `fluxjax.flow`).

    capture = fluxjax.Capture(sites=("b3.text.output", fluxjax.site(17, "image", "attn_out")))
    out, caps = fluxjax.forward(..., capture=capture, num_ref_tokens=layout.n_ref)
    caps["b3.text.output"]                   # [B, T, D]
    caps[fluxjax.site(17, "image", "attn_out")]  # [B, N_img, D]

A `Capture` is static (it decides the program's outputs); `Captures` is a pytree of arrays keyed
by site, indexed by any spelling of a site (`fluxjax.sites`). Under the sampler every array has a
leading step axis [S], and under `vmap` the sweep's axes lead as well: `caps[site]` is
[..., B, tokens, D] whatever leads.

Sites of one kind (stream, point) share one buffer [n, ..., B, tokens, D] in the order asked, and
nothing beyond the request is kept. The older spelling `Capture(text=(sites...), image=(...),
image_tokens=k)` keeps working: `caps.text` is the stacked text stream at those integer sites
([n, B, T, D]: -1 the input of block 0, b the output of block b) and `caps.image` the image stream
(image tokens, then references) at them, its first `image_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax
from flax import struct

from fluxjax.flow import AttentionFlow, Flow
from fluxjax.sites import EMBED, STREAMS, Site, as_site, static_index

WHOLE_IMAGE_STREAM = "image_stream"  # the older image capture: image tokens then references (a lane, not a stream)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One capture buffer: a lane of tokens (a stream, or the older whole image stream) at a point."""

    lane: str
    point: str

    @property
    def key(self) -> str:
        return f"{self.lane}.{self.point}"


@dataclasses.dataclass(frozen=True)
class Capture:
    """What a forward returns besides its output (static: a `jit` static argument).

    sites: the sites to capture, each once (any spelling of `fluxjax.sites`).
    text, image, image_tokens: the older spelling (module docstring); image_tokens None keeps the
    whole image stream, which needs a fixed stream length (so not with `DropReference`).
    flow: the attention flow to measure (`fluxjax.Flow`; the forward then needs `groups=`), or None.
    """

    sites: tuple[Site, ...] = ()
    text: tuple[int, ...] = ()
    image: tuple[int, ...] = ()
    image_tokens: int | None = None
    flow: Flow | None = None

    def __post_init__(self):
        sites = self.sites
        if isinstance(sites, (str, Site)) or (isinstance(sites, tuple) and len(sites) == 3 and
                                               isinstance(sites[1], str) and sites[1] in STREAMS):
            sites = (sites,)
        if isinstance(sites, (bytes, Mapping)) or not isinstance(sites, Iterable):
            raise TypeError(f"Capture sites must be a tuple of sites (e.g. sites=('b3.text.output',)), got {sites!r}")
        sites = tuple(as_site(s) for s in sites)
        if len(set(sites)) != len(sites):
            raise ValueError(f"capture sites {[s.name for s in sites]} repeat a site; ask for each site once")
        object.__setattr__(self, "sites", sites)
        for name in ("text", "image"):
            legacy = getattr(self, name)
            if isinstance(legacy, (str, bytes, Mapping)) or not isinstance(legacy, Iterable):
                raise TypeError(f"Capture {name} must be a tuple of site indices (e.g. {name}=(3,)), got {legacy!r}; "
                                "or name sites: Capture(sites=('b3.text.output',))")
            try:
                legacy = tuple(static_index(s, f"capture {name} site") for s in legacy)
            except TypeError as e:
                raise TypeError(f"{e}; or name sites: Capture(sites=('b3.{name}.output',))") from None
            if len(set(legacy)) != len(legacy):
                raise ValueError(f"capture {name} sites {legacy} repeat a site; ask for each site once")
            object.__setattr__(self, name, legacy)
        if self.image_tokens is not None:
            tokens = static_index(self.image_tokens, "Capture image_tokens")
            if tokens <= 0:
                raise ValueError(f"Capture image_tokens must be positive or None, got {tokens}")
            object.__setattr__(self, "image_tokens", tokens)
        if self.flow is not None and not isinstance(self.flow, Flow):
            raise TypeError(f"Capture flow must be a fluxjax.Flow (e.g. Flow(blocks=(3, 5))), got {self.flow!r}")

    def validate(self, config) -> None:
        """Raise a ValueError for a site this model (`config`) does not have."""
        for name in ("text", "image"):
            for s in getattr(self, name):
                if not EMBED <= s < config.num_blocks:
                    raise ValueError(f"capture {name} site {s} out of range: this model's sites are -1 (input of "
                                     f"block 0) and its blocks 0..{config.num_blocks - 1}; named: "
                                     f"'embed.{name}.output', 'b<k>.{name}.output'")
        for s in self.sites:
            s.check(config.num_blocks)
        if self.flow is not None:
            self.flow.validate(config.num_blocks)

    def plan(self) -> tuple[tuple[Kind, tuple[int, ...]], ...]:
        """Each buffer's kind and the blocks it holds, in order: the older text sites first."""
        blocks: dict[Kind, list[int]] = {}
        for s in self.text:
            blocks.setdefault(Kind("text", "output"), []).append(s)
        for s in self.image:
            blocks.setdefault(Kind(WHOLE_IMAGE_STREAM, "output"), []).append(s)
        for s in self.sites:
            held = blocks.setdefault(Kind(s.stream, s.point), [])
            if not (s.kind == ("text", "output") and s.block in self.text):
                held.append(s.block)
        return tuple((kind, tuple(b)) for kind, b in blocks.items())

    def index(self) -> tuple[tuple[str, str, int], ...]:
        """(site name, buffer key, position) of every site asked for by name."""
        positions = {kind.key: blocks for kind, blocks in self.plan()}
        return tuple((s.name, f"{s.stream}.{s.point}", positions[f"{s.stream}.{s.point}"].index(s.block))
                     for s in self.sites)


def as_capture(capture) -> Capture:
    """None, a Capture, or sites (one, or a tuple of them) as a Capture."""
    if capture is None:
        return Capture()
    if isinstance(capture, Capture):
        return capture
    return Capture(sites=capture)


@struct.dataclass
class Captures:
    """The captured activations, keyed by site (module docstring). `caps[site]`, `site in caps`,
    `caps.keys()`; `caps.text` / `caps.image` for the older spelling (None where not asked for)."""

    buffers: dict = struct.field(default_factory=dict)  # buffer key -> [n, ..., B, tokens, D]
    index: tuple[tuple[str, str, int], ...] = struct.field(pytree_node=False, default=())
    legacy_text: int = struct.field(pytree_node=False, default=0)  # leading text.output entries of Capture.text
    flow: AttentionFlow | None = None  # the attention flow where `Capture.flow` asked for it

    def __getitem__(self, key) -> jax.Array:
        name = as_site(key).name
        for site_name, buffer, j in self.index:
            if site_name == name:
                return self.buffers[buffer][..., j, :, :, :]
        raise KeyError(f"site {name} was not captured; captured: {list(self.keys()) or 'nothing'}")

    def __contains__(self, key) -> bool:
        return as_site(key).name in self.keys()

    def keys(self) -> tuple[str, ...]:
        """The names of the sites asked for by name."""
        return tuple(name for name, _, _ in self.index)

    def items(self):
        return ((name, self[name]) for name in self.keys())

    def __len__(self) -> int:
        return len(self.index)

    @property
    def text(self) -> jax.Array | None:
        """[n, B, T, D] (leading axes first) at `Capture.text`'s integer sites, in their order."""
        if not self.legacy_text:
            return None
        buf = self.buffers["text.output"]
        return buf if buf.shape[-4] == self.legacy_text else buf[..., :self.legacy_text, :, :, :]

    @property
    def image(self) -> jax.Array | None:
        """[n, B, image_tokens, D] at `Capture.image`'s integer sites, in their order."""
        return self.buffers.get(f"{WHOLE_IMAGE_STREAM}.output")
