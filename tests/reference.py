"""Tiny random reference models built with diffusers, for parity tests.

The builders live in `flux2ref.models` (the demo uses them too); this module keeps the names the
tests import.
"""

import jax
import jax.numpy as jnp
import numpy as np

import fluxjax
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


# Text spans whose content and padding interleave differently per sample, including a sample with
# no content at all (its text[content] group is empty: a segment part no query reads). The
# key-group attention tests and the flow tests share them.
GROUPS_LAYOUT = fluxjax.TokenLayout(n_txt=24, img_grid=(5, 6), ref_grids=((4, 5), (3, 3)))
GROUPS_CONTENT = np.zeros((3, GROUPS_LAYOUT.n_txt), bool)
GROUPS_CONTENT[0, 2:9] = True
GROUPS_CONTENT[1, [1, 4, 5, 13, 20]] = True


def groups_forward_case():
    """(params, (img, txt, timesteps, img_ids, txt_ids)) of TINY on GROUPS_LAYOUT, one sample per
    row of GROUPS_CONTENT."""
    params = fluxjax.init_params(TINY, jax.random.key(0))
    img, txt = inputs(TINY, GROUPS_LAYOUT, batch=GROUPS_CONTENT.shape[0], seed=1)
    data = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray([0.4, 0.9, 0.6], jnp.float32),
            jnp.asarray(GROUPS_LAYOUT.img_ids()), jnp.asarray(GROUPS_LAYOUT.txt_ids()))
    return params, data
