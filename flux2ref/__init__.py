"""Tiny random FLUX.2 reference models built with PyTorch (diffusers and transformers).

Not part of the `fluxjax` library, which never imports torch: these builders serve the parity
tests, the demonstration and the experiments' default model. Every builder is deterministic in
its seed.
"""
