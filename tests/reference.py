"""Tiny random reference models built with diffusers, for parity tests.

The builders live in `flux2ref.models` (the demo uses them too); this module keeps the names the
tests import.
"""

from flux2ref.models import (  # noqa: F401
    BF16_RATIO,
    LATENT_TOL,
    TOL_GENERAL,
    TOL_T0,
    TINY,
    diffusers_kwargs,
    diffusers_transformer,
    inputs,
    pipeline_encoder,
    pipeline_tokens,
    randomize_,
    random_state,
    rel_err,
    run_diffusers,
    state_dict_numpy,
)
