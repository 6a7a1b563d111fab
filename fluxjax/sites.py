"""Sites: the named places where a forward's activations are read (captured) or written (substituted).

A site is (block, stream, point), written `fluxjax.site(17, "text", "attn_out")`, `"b17.text.attn_out"`
or `(17, "text", "attn_out")`:

    block   the global block index, double blocks first (klein-9B: 0..7 double, 8..31 single);
            -1 names the input projections, whose only point is their output (the input of block
            0), written "embed.text.output" (or "b-1.text.output")
    stream  text       the text tokens [B, T, D]
            image      the noisy-image tokens [B, N_img, D]
            reference  the reference tokens, every reference in layout order [B, N_ref, D]
    point   input      what the block reads
            attn_out   the attention's contribution to the residual stream, before its gate
            mlp_out    the MLP's contribution, before its gate
            output     what the block returns (the input of the next block)

The points are defined on diffusers' module boundaries (`Flux2Transformer2DModel`), so a PyTorch
forward hook on the same module is their reference (tests/fluxjax/test_sites_parity.py):

    double block b  `transformer_blocks[b]`
      input      forward pre-hook on the block: `encoder_hidden_states` (text) and `hidden_states`
                 (the image stream: image tokens, then the references)
      attn_out   forward hook on `block.attn`: its (hidden_states, encoder_hidden_states), i.e. after
                 `to_out` / `to_add_out`, before `gate_msa`
      mlp_out    forward hooks on `block.ff` (image stream) and `block.ff_context` (text), before
                 `gate_mlp`
      output     forward hook on the block: (encoder_hidden_states, hidden_states)
    single block b  `single_transformer_blocks[b - depth]`, on the joint stream [text, image, refs]
      input      forward pre-hook on the block (`hidden_states`)
      attn_out   the attention's rows of the fused output projection `block.attn.to_out`:
                 to_out.weight[:, :D] applied to the first D features of to_out's input (the
                 attention output, heads merged)
      mlp_out    the MLP's rows: to_out.weight[:, D:] applied to the rest (the SwiGLU output)
      output     forward hook on the block
    block -1       forward hooks on `context_embedder` (text) and `x_embedder` (image stream)

Single blocks run attention and MLP in parallel from one normalised input, and one matrix
projects both: `block.attn`'s output is attn_out + mlp_out, before the one gate. Neither point sees
the other, so a substitution at attn_out leaves mlp_out as it was, and the block's output is
x + gate * (attn_out + mlp_out) with the substituted part. Where no intervention changed either
part, the block keeps its fused projection, bit for bit.

Reading and writing a site: substitutions at a site apply first, in order; a capture at the same
site sees the result. The input of block b and the output of block b - 1 hold the same values;
substitutions at the output of b - 1 apply before those at the input of b. References removed by
`DropReference` from block k on have no sites at blocks >= k.
"""

from __future__ import annotations

import dataclasses
import operator
import re

STREAMS = ("text", "image", "reference")
POINTS = ("input", "attn_out", "mlp_out", "output")
EMBED = -1  # the block index of the input projections (point "output" only)

_NAME = re.compile(r"^(?:b(-?\d+)|embed)\.([a-z_]+)\.([a-z_]+)$")
_SPELLING = 'fluxjax.site(17, "text", "attn_out") or "b17.text.attn_out"'


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """One site (module docstring): hashable and ordered, so it can key captures and be static."""

    block: int
    stream: str
    point: str

    def __post_init__(self):
        block = _index(self.block)
        if block is None:
            raise TypeError(f"a site's block must be an integer, got {self.block!r}; e.g. {_SPELLING}")
        object.__setattr__(self, "block", block)
        if self.stream not in STREAMS:
            raise ValueError(f"unknown stream {self.stream!r} in a site; use one of {STREAMS}, e.g. {_SPELLING}")
        if self.point not in POINTS:
            raise ValueError(f"unknown point {self.point!r} in a site; use one of {POINTS}, e.g. {_SPELLING}")
        if block < EMBED or (block == EMBED and self.point != "output"):
            raise ValueError(f"site block {block}: use a block index >= 0, or -1 with point 'output' (the input "
                             f"projections, 'embed.{self.stream}.output')")

    @property
    def name(self) -> str:
        """'b17.text.attn_out'; 'embed.text.output' for block -1."""
        return f"{'embed' if self.block == EMBED else f'b{self.block}'}.{self.stream}.{self.point}"

    @property
    def kind(self) -> tuple[str, str]:
        """(stream, point): sites of one kind differ only by block, a value of a substitution."""
        return self.stream, self.point

    def __str__(self) -> str:
        return self.name

    def check(self, num_blocks: int) -> None:
        """Raise a ValueError unless this model (of `num_blocks` blocks) has this site."""
        if self.block >= num_blocks:
            raise ValueError(f"site {self.name} out of range: this model's blocks are 0..{num_blocks - 1} (and -1, "
                             "the input projections, at point 'output')")


def site(block, stream: str | None = None, point: str | None = None) -> Site:
    """A `Site`: site(17, "text", "attn_out"), or one written another way: site("b17.text.attn_out"),
    site((17, "text", "attn_out")), a Site, or an integer alone, the older spelling of the text
    stream's sites (-1: the input of block 0, i.e. 'embed.text.output'; b: the output of block b)."""
    if stream is not None or point is not None:
        if stream is None or point is None:
            raise TypeError(f"give a site's block, stream and point together, e.g. {_SPELLING}")
        return Site(block, stream, point)
    return as_site(block)


def as_site(value) -> Site:
    """`value` (a Site, its name, a (block, stream, point) tuple, or an older integer text site) as a Site."""
    if isinstance(value, Site):
        return value
    if isinstance(value, str):
        match = _NAME.match(value.strip())
        if not match:
            raise ValueError(f"site name {value!r} does not read 'b<block>.<stream>.<point>'; e.g. {_SPELLING}")
        block = EMBED if match.group(1) is None else int(match.group(1))
        return Site(block, match.group(2), match.group(3))
    if isinstance(value, tuple) and len(value) == 3:
        return Site(*value)
    block = _index(value)
    if block is None:
        raise TypeError(f"{value!r} is not a site; write {_SPELLING}")
    if block < EMBED:
        raise ValueError(f"text site {block} out of range: -1 is the input of block 0, b >= 0 the output of block b; "
                         f"e.g. 'embed.text.output', 'b3.text.output' or {_SPELLING}")
    return Site(block, "text", "output")


def static_index(value, what: str) -> int:
    """`value` as a Python int: an int, a numpy integer or a concrete integer array of one element;
    bools, floats and anything else raise a TypeError naming `what`."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "i") == "b":
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    index = _index(value)
    if index is None:
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return index


def _index(value):
    """`value` as a Python int if it is an integer (not a bool), else None."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "i") == "b":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True)
class Lanes:
    """Where each stream's tokens lie in the joint sequence [text | image | references] (static).

    A lane is a stream, or the older whole image stream ("image_stream": image tokens then
    references, its first `tokens` kept by an image capture).
    """

    n_txt: int
    n_img: int
    n_ref: int = 0

    @property
    def length(self) -> int:
        return self.n_txt + self.n_img + self.n_ref

    def has(self, lane: str) -> bool:
        return lane != "reference" or self.n_ref > 0

    def span(self, lane: str, tokens: int | None = None) -> tuple[int, int]:
        """[start, stop) of `lane` in the joint sequence."""
        T, n = self.n_txt, self.n_img
        return {"text": (0, T), "image": (T, T + n), "reference": (T + n, self.length),
                "image_stream": (T, self.length if tokens is None else T + tokens)}[lane]

    def size(self, lane: str, tokens: int | None = None) -> int:
        start, stop = self.span(lane, tokens)
        return stop - start

    def without_references(self) -> "Lanes":
        return dataclasses.replace(self, n_ref=0)
