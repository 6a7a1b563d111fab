"""Model organisms: small FLUX.2-architecture editors trained here on synthetic scenes, whose routing
of reference information is known by construction.

    organisms.data      32 x 32 scenes and the three tasks (t2i, swatch, recolour), seeded; held-out split
    organisms.text      word-level tokenizer (32 positions, content mask) and the small text encoder
    organisms.codec     4 x 4 patchify: the VAE's part, exact
    organisms.model     the organisms (direct, text-routed): fluxjax configs, routing cuts, generate
    organisms.train     `python -m organisms.train --organism direct|text-routed --out DIR`
    organisms.checkpoint  an organism folder (native fluxjax transformer + encoder + organism.json)
    organisms.shapes    the rule-based shape classifier
    organisms.evaluate  quality and the routing experiments on held-out seeds

Nothing here imports torch.
"""
