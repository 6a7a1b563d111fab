"""The environment JAX runs in for the tests, in this process and in the processes the tests start.

The tests' models are tiny, so XLA's compile time dominates their run time. By default they compile
with LLVM's optimisation off (FAST_COMPILE), which halves the suite's time (tests/fluxjax/test_sites.py:
93 s of CPU with XLA's defaults, 42 s with it, measured in one session). The program is the same
(the same HLO passes and fusions); its results differ from the default build's in float32 rounding
only (measured on the tiny model's forward with a knockout, two captures and a 3-step sampler: at
most 5.3e-7 relative, where the tests' tightest bar is 1e-6). The bit-for-bit identities the tests
check (capturing changes nothing, writing a site's own value changes nothing, ...) hold in both.
(Adding `--xla_cpu_use_fusion_emitters=false` would halve the time again, but it breaks one of those
identities, self-patching through the sampler, which holds in XLA's default build: so not that.)

FLUXJAX_TEST_FAST_COMPILE=0 runs the tests with XLA's default compilation; an XLA_FLAGS that sets
the level itself is kept as given.
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0",)


def xla_flags(base: str | None = None) -> str:
    """`base` (default: this process's XLA_FLAGS) with the tests' compile flags, unless turned off."""
    base = os.environ.get("XLA_FLAGS", "") if base is None else base
    if os.environ.get("FLUXJAX_TEST_FAST_COMPILE", "1") == "0":
        return base
    extra = [f for f in FAST_COMPILE if f.split("=")[0] not in base]
    return " ".join([base, *extra]).strip()


def host_devices(n: int) -> dict[str, str]:
    """Environment for a child process with `n` CPU devices (the count is fixed when JAX starts)."""
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{xla_flags()} --xla_force_host_platform_device_count={n}"}
