"""How a forward runs, as opposed to what it computes: the attention kernel and its tile sizes.

    runtime = fluxjax.RuntimeOptions(attention="xla")          # the dense reference kernel
    out, _ = fluxjax.forward(params, config, ..., runtime=runtime)

One frozen, hashable object (a static argument of `jit`) passed once to the forward, the sampler,
the KV forwards or the VAE; the block runner hands it to the one attention function. None of its
fields changes the mathematics: every kernel computes the same softmax attention, to float
rounding (`fluxjax.numerics.attention` lists them and their reference).
"""

from __future__ import annotations

import dataclasses
import operator

ATTENTION_KERNELS = ("xla", "blocked", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """Static runtime choices of a forward.

    attention: "xla", "blocked", "cudnn", "pallas", or None for the backend's default
        (`fluxjax.numerics.default_implementation`: blocked on CPU, cuDNN for bfloat16 on GPU,
        Pallas on TPU).
    query_block: queries per tile of the blocked CPU kernel (a [B, 256, L] float32 logits tile
        stays in cache).
    pallas_block: query and key tile of the Pallas kernel (TPU lanes are 128 wide).
    """

    attention: str | None = None
    query_block: int = 256
    pallas_block: int = 128

    def __post_init__(self):
        if self.attention is not None and self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention kernel {self.attention!r}; use None (the backend's default) or one "
                             f"of {ATTENTION_KERNELS}")
        for name in ("query_block", "pallas_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or _index(value) is None or value < 8:
                raise ValueError(f"RuntimeOptions {name} must be an integer >= 8, got {value!r}")
            object.__setattr__(self, name, int(value))


def _index(value):
    try:
        return operator.index(value)
    except TypeError:
        return None


DEFAULT = RuntimeOptions()


def runtime_options(runtime: RuntimeOptions | str | None = None, attn_impl: str | None = None) -> RuntimeOptions:
    """The options of a call: `runtime` (a RuntimeOptions, or a kernel name as shorthand), or the older
    `attn_impl="xla"` keyword, which means `runtime=RuntimeOptions(attention="xla")`; not both."""
    if attn_impl is not None:
        if runtime is not None:
            raise ValueError("pass runtime=RuntimeOptions(attention=...) or attn_impl=..., not both")
        return RuntimeOptions(attention=attn_impl)
    if runtime is None:
        return DEFAULT
    if isinstance(runtime, str):
        return RuntimeOptions(attention=runtime)
    if not isinstance(runtime, RuntimeOptions):
        raise TypeError(f"runtime must be a fluxjax.RuntimeOptions, got {runtime!r}")
    return runtime
