"""Architecture configuration of the FLUX.2 transformer, and the released presets.

The config holds architecture only: dtypes, attention implementation and device mesh are runtime
choices passed elsewhere. Variants come from `dataclasses.replace(FLUX2_KLEIN_9B, ...)`; the
presets are frozen, so nobody can mutate them for everybody else.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing


def type_problems(config) -> list[str]:
    """One line per field of a config dataclass whose value does not have its annotated type.

    `int` takes integers (not bools), `float` finite real numbers (ints too), `bool` only bools,
    `tuple[int, ...]` a tuple of ints, `X | None` None as well. Run before any range check, so a
    value of the wrong type is named instead of failing a comparison.
    """
    hints = typing.get_type_hints(type(config))
    return [f"{f.name} must be {_describe(hints[f.name])}, got {getattr(config, f.name)!r}"
            for f in dataclasses.fields(config) if not _matches(getattr(config, f.name), hints[f.name])]


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURALS.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a finite number", bool: "true or false"}.get(hint, hint.__name__)


_PLURALS = {int: "integers", float: "finite numbers", bool: "booleans"}


def as_tuple(value):
    """A list given for a tuple field (as JSON gives it) becomes a tuple; anything else is kept for the type check."""
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Flux2Config:
    """Shape of a FLUX.2 transformer (spec section 1).

    Field names follow Black Forest Labs' config dataclass `Flux2Params` (fluxjax's weights are
    `Flux2Weights`, so that name means one thing only). Derived sizes are properties.
    """

    in_channels: int = 128  # 32 VAE latent channels x 2x2 patch
    context_in_dim: int = 15360  # C: width of the stacked text-encoder features
    hidden_size: int = 6144  # D
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE dims per (T, H, W, L) axis
    theta: int = 2000  # RoPE base
    mlp_ratio: float = 3.0
    use_guidance_embed: bool = True
    out_channels: int | None = None  # None: same as in_channels
    timestep_channels: int = 256  # width of the sinusoidal t / guidance features

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", as_tuple(self.axes_dim))
        problems = type_problems(self)
        if problems:
            raise ValueError("invalid Flux2Config: " + "; ".join(problems))
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        for name in ("in_channels", "context_in_dim", "hidden_size", "num_heads", "timestep_channels"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            problems.append("depth and depth_single_blocks must be >= 0")
        if self.hidden_size % max(self.num_heads, 1):
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif sum(self.axes_dim) != self.head_dim:
            problems.append(f"sum(axes_dim) = {sum(self.axes_dim)} must equal head_dim = {self.head_dim}")
        if any(a % 2 for a in self.axes_dim):
            problems.append(f"every RoPE axis needs an even width, got {self.axes_dim}")
        if self.timestep_channels % 2:
            problems.append("timestep_channels must be even")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.theta <= 0:
            problems.append(f"theta must be positive, got {self.theta}")
        if self.out_channels is not None and self.out_channels <= 0:
            problems.append(f"out_channels must be positive or null, got {self.out_channels}")
        if any(a <= 0 for a in self.axes_dim):
            problems.append(f"every RoPE axis needs a positive width, got {self.axes_dim}")
        if problems:
            raise ValueError("invalid Flux2Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """M: SwiGLU hidden width, int(D * mlp_ratio) as in both references."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def num_blocks(self) -> int:
        """Global block count: double blocks are 0..depth-1, single blocks follow."""
        return self.depth + self.depth_single_blocks


FLUX2_DEV = Flux2Config()
FLUX2_KLEIN_9B = Flux2Config(
    context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, use_guidance_embed=False
)
FLUX2_KLEIN_4B = Flux2Config(
    context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, use_guidance_embed=False
)

PRESETS: dict[str, Flux2Config] = {
    "dev": FLUX2_DEV,
    "klein-9b": FLUX2_KLEIN_9B,
    "klein-4b": FLUX2_KLEIN_4B,
}
