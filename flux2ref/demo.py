"""`python -m flux2ref.demo`: the parity claim, end to end, on a fresh machine.

Builds a random tiny diffusers FLUX.2 transformer (every tensor randomised), saves it with
diffusers' `save_pretrained`, converts it with the real converter, loads it with
`fluxjax.load_transformer` and runs both on the same inputs (two reference images, batch 2).
Prints the relative L2 errors against diffusers fp32 with their bars; exits 1 if a bar is missed.
Needs the reference extra (torch, diffusers).
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fluxjax.checkpoint import load_transformer
from fluxjax.layout import TokenLayout
from fluxjax.model import forward
from flux2ref.models import (BF16_RATIO, TINY, TOL_GENERAL, TOL_T0, diffusers_transformer, inputs, rel_err,
                             run_diffusers)


def main() -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from fluxjax.conversion.convert import convert_transformer

    diffusers_logging.set_verbosity_error()  # its advice on casting with `to()` does not apply to a random model

    config = TINY
    layout = TokenLayout(n_txt=8, img_grid=(4, 6), ref_grids=((3, 5), (4, 4)))
    model = diffusers_transformer(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "diffusers"))
        convert_transformer(os.path.join(tmp, "diffusers"), os.path.join(tmp, "native"))
        loaded, params = load_transformer(os.path.join(tmp, "native"))
        _, params16 = load_transformer(os.path.join(tmp, "native"), dtype=jnp.bfloat16)
    assert loaded == config
    model16 = diffusers_transformer(config, seed=0).to(torch.bfloat16)
    compiled = jax.jit(forward, static_argnums=1)

    def run(*args):
        return compiled(*args)[0]  # forward returns (output, captures)

    img, txt = inputs(config, layout, batch=2, seed=1)
    ids = layout.img_ids(), layout.txt_ids()
    print(f"random tiny FLUX.2 (D={config.hidden_size}, {config.depth} double + {config.depth_single_blocks} single "
          f"blocks): diffusers save_pretrained -> convert_transformer -> load_transformer")
    print(f"inputs: batch 2, {layout.n_img} image + {layout.n_ref} tokens of 2 references + {layout.n_txt} text tokens")
    ok = True

    def report(label, err, bar):
        nonlocal ok
        ok &= err <= bar
        print(f"  {label:<44} {err:.2e}  (bar {bar:g})  {'ok' if err <= bar else 'FAIL'}")

    t0 = np.zeros(2, np.float32)
    report("fp32, t=0, no guidance: rel err", rel_err(run(params, config, img, txt, t0, *ids),
                                                      run_diffusers(model, img, txt, t0, layout)), TOL_T0)
    t, g = np.full(2, 0.6, np.float32), np.full(2, 4.0, np.float32)
    want = run_diffusers(model, img, txt, t, layout, g)
    report("fp32, t=0.6, guidance 4: rel err", rel_err(run(params, config, img, txt, t, *ids, g), want), TOL_GENERAL)
    ours16 = run(params16, config, jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), t, *ids, g)
    err16 = rel_err(np.asarray(ours16, np.float32), want)
    ref16 = rel_err(run_diffusers(model16, img, txt, t, layout, g, dtype=torch.bfloat16), want)
    print(f"  bf16, t=0.6, guidance 4: fluxjax {err16:.2e}, diffusers {ref16:.2e} (both against diffusers fp32)")
    report("bf16 error ratio fluxjax / diffusers", err16 / ref16, BF16_RATIO)
    print("parity holds" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
