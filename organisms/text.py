"""Text for the model organisms: a word-level tokenizer and a small text encoder trained jointly.

Tokenisation mimics the shape of FLUX.2's: a fixed length of TEXT_LENGTH positions, right padded,
with template tokens around the instruction (as the chat template there):

    <start> draw a circle in this color <end> <pad> <pad> ... <pad>      (32 positions)

The content mask is True at the instruction's own words (`text[content]`); every other position,
the template tokens <start> and <end> included, is `text[padding]`. The empty prompt "" is
<start> <end> and padding, with no content position.

The encoder is a tiny causal transformer (learned token and position embeddings, pre-LayerNorm
blocks with SwiGLU MLPs). As FLUX.2 stacks three hidden states of its text encoder into
[B, T, 3 h], the organism's text features stack the embedding output and the output of each of
the two layers: [B, T, 3 W]. Causal attention, as in the Qwen3 / Mistral encoders: a padding
position sees the whole instruction before it, a content position only the words before it.

Axis names as in `fluxjax.numerics`; V is the vocabulary, W the encoder width, E the encoder's
SwiGLU hidden width. Matrices are stored (in, out).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fluxjax.config import type_problems
from fluxjax.numerics import attention, layer_norm, linear, swiglu
from organisms.data import COLOURS, SHAPES

TEXT_LENGTH = 32
PAD, START, END = "<pad>", "<start>", "<end>"
WORDS = ("a", "draw", "in", "this", "color", "make", "it")
VOCAB: tuple[str, ...] = (PAD, START, END) + WORDS + tuple(SHAPES) + tuple(COLOURS)
TOKEN_IDS = {w: i for i, w in enumerate(VOCAB)}


def tokenize(instructions, length: int = TEXT_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [B, T] and the content mask bool [B, T] of a list of instructions."""
    tokens = np.full((len(instructions), length), TOKEN_IDS[PAD], np.int32)
    content = np.zeros((len(instructions), length), bool)
    for row, text in enumerate(instructions):
        words = text.split()
        unknown = [w for w in words if w not in TOKEN_IDS or w in (PAD, START, END)]
        if unknown:
            raise ValueError(f"instruction {text!r}: word {unknown[0]!r} is not in the organisms' vocabulary "
                             f"({', '.join(VOCAB[3:])})")
        if len(words) + 2 > length:
            raise ValueError(f"instruction {text!r} has {len(words)} words; at most {length - 2} fit in {length} "
                             f"positions with the template tokens")
        ids = [TOKEN_IDS[START]] + [TOKEN_IDS[w] for w in words] + [TOKEN_IDS[END]]
        tokens[row, :len(ids)] = ids
        content[row, 1:1 + len(words)] = True
    return tokens, content


def detokenize(tokens) -> list[str]:
    """The instructions back from token ids (template and pad tokens dropped)."""
    skip = {TOKEN_IDS[PAD], TOKEN_IDS[START], TOKEN_IDS[END]}
    return [" ".join(VOCAB[i] for i in row if i not in skip) for row in np.asarray(tokens)]


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = len(VOCAB)
    length: int = TEXT_LENGTH  # T
    width: int = 64  # W
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: float = 2.0

    def __post_init__(self):
        problems = type_problems(self)
        if problems:
            raise ValueError("invalid TextEncoderConfig: " + "; ".join(problems))
        if min(self.vocab_size, self.length, self.width, self.num_layers, self.num_heads, self.mlp_ratio) <= 0:
            raise ValueError(f"every encoder size must be positive, got {self}")
        if self.width % self.num_heads:
            raise ValueError(f"encoder width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def output_dim(self) -> int:
        """C: the stacked hidden states, embedding output plus one per layer."""
        return self.width * (self.num_layers + 1)


@struct.dataclass
class EncoderLayers:
    """All encoder layers, every leaf with a leading [num_layers] axis."""

    qkv: jax.Array  # [W, 3W]
    proj: jax.Array  # [W, W]
    fc_in: jax.Array  # [W, 2E]: gate half, then value half
    fc_out: jax.Array  # [E, W]


@struct.dataclass
class TextEncoderParams:
    embed: jax.Array  # [V, W]
    position: jax.Array  # [T, W]
    layers: EncoderLayers


def encoder_shapes(config: TextEncoderConfig, dtype=jnp.float32) -> TextEncoderParams:
    W, E, n = config.width, config.mlp_hidden, config.num_layers

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    """Every parameter's shape (init: `organisms.model.init_organism`)."""
    return TextEncoderParams(embed=s(config.vocab_size, W), position=s(config.length, W),
                             layers=EncoderLayers(qkv=s(n, W, 3 * W), proj=s(n, W, W), fc_in=s(n, W, 2 * E),
                                                  fc_out=s(n, E, W)))


def encode(params: TextEncoderParams, config: TextEncoderConfig, tokens) -> jax.Array:
    """Text features [B, T, C] (C = 3W) of token ids [B, T]: the stacked hidden states."""
    tokens = jnp.asarray(tokens)
    if tokens.shape[-1] != config.length:
        raise ValueError(f"tokens have {tokens.shape[-1]} positions; this encoder reads {config.length}")
    h = params.embed[tokens] + params.position[None]  # [B, T, W]
    causal = jnp.tril(jnp.ones((config.length, config.length), bool))[None]  # [1, T, T]
    head_dim = config.width // config.num_heads

    def layer(h, p):
        q, k, v = (a.reshape(*a.shape[:-1], config.num_heads, head_dim)
                   for a in jnp.split(linear(layer_norm(h), p.qkv), 3, axis=-1))
        mask = jnp.broadcast_to(causal, (h.shape[0], *causal.shape[1:]))
        a = attention(q, k, v, mask, implementation="xla").reshape(h.shape)
        h = h + linear(a, p.proj)
        h = h + linear(swiglu(linear(layer_norm(h), p.fc_in)), p.fc_out)
        return h, h

    _, hidden = jax.lax.scan(layer, h, params.layers)  # [num_layers, B, T, W]
    return jnp.concatenate([h, *hidden], axis=-1)
