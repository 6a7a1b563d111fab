"""Sites (`fluxjax.sites`) against PyTorch forward hooks on the same diffusers modules, fp32.

Every point (input, attn_out, mlp_out, output) of every stream (text, image, reference) of every
block of a tiny random model, and the input projections' output: captured in one forward on each
side, and substituted (random masks, replacing and adding) at every kind of site at once, block by
block, with every site captured again after the substitutions. The hooks are written from the
definitions in the `fluxjax.sites` docstring, on diffusers' own modules; they share no code with
fluxjax.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY, TOL_T0, diffusers_transformer, inputs, rel_err, state_dict_numpy

import fluxjax
from fluxjax.conversion.transformer import params_from_state
from fluxjax.sites import POINTS, STREAMS

pytestmark = pytest.mark.parity  # checked against a PyTorch model (diffusers); see pyproject.toml

NB, ND, D = TINY.num_blocks, TINY.depth, TINY.hidden_size  # 2 double (0, 1) + 3 single (2, 3, 4)
LAYOUT = fluxjax.TokenLayout(n_txt=8, img_grid=(3, 4), ref_grids=((2, 3), (2, 2)))
T, N_IMG = LAYOUT.n_txt, LAYOUT.n_img
EMBED_SITES = tuple(fluxjax.site(-1, s, "output") for s in STREAMS)
BLOCK_SITES = tuple(fluxjax.site(b, s, p) for b in range(NB) for s in STREAMS for p in POINTS)
EVERY_SITE = fluxjax.Capture(sites=EMBED_SITES + BLOCK_SITES)

fwd = jax.jit(fluxjax.forward, static_argnames=("config", "capture", "num_ref_tokens"))


@pytest.fixture(scope="module")
def model():
    m = diffusers_transformer(TINY, seed=0)
    img, txt = inputs(TINY, LAYOUT, batch=2, seed=5)
    return dict(module=m, params=params_from_state(state_dict_numpy(m), TINY, "diffusers"), img=img, txt=txt)


# ------------------------------------------------------------------------------------------------
# the reference: hooks on diffusers' modules


def _lane(stream, joint: bool) -> slice:
    """The tokens of `stream` in the joint sequence [text, image, refs] or in the image stream [image, refs]."""
    start = {"text": 0, "image": T, "reference": T + N_IMG}[stream] - (0 if joint else T)
    stop = {"text": T, "image": T + N_IMG, "reference": LAYOUT.total}[stream] - (0 if joint else T)
    return slice(start, stop)


class Hooks:
    """Forward hooks that apply `subs` ({site: (value, mask, keep)}, numpy) and record every site."""

    def __init__(self, module, subs=None):
        self.module, self.subs, self.seen = module, subs or {}, {}

    def _visit(self, block, point, parts):
        """parts: the tensors a module passes here, by what they hold: 'text', 'image_stream' (image
        tokens, then references) or 'joint' ([text, image, refs]). Applies this (block, point)'s
        substitutions to them, records its sites; returns the parts."""
        import torch
        for stream in STREAMS:
            if "joint" in parts:
                name, lane = "joint", _lane(stream, joint=True)
            elif stream == "text":
                name, lane = "text", slice(None)
            else:
                name, lane = "image_stream", _lane(stream, joint=False)
            if name not in parts:
                continue
            site = fluxjax.site(block, stream, point)
            if site in self.subs:
                value, mask, keep = (torch.as_tensor(np.asarray(a)) for a in self.subs[site])
                tensor = parts[name].clone()
                current = tensor[:, lane]
                tensor[:, lane] = torch.where(mask[..., None], value + keep * current, current)
                parts[name] = tensor
            self.seen[site] = parts[name][:, lane].detach().numpy().copy()
        return parts

    @contextlib.contextmanager
    def installed(self):
        m, handles = self.module, []

        def on(module, hook, pre=False):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if pre
                           else module.register_forward_hook(hook))

        on(m.context_embedder, lambda mod, a, out: self._visit(-1, "output", {"text": out})["text"])
        on(m.x_embedder, lambda mod, a, out: self._visit(-1, "output", {"image_stream": out})["image_stream"])
        for b, block in enumerate(m.transformer_blocks):
            on(block, self._double_input(b), pre=True)
            on(block.attn, self._double_pair(b, "attn_out", image_first=True))
            on(block.ff, lambda mod, a, out, b=b: self._visit(b, "mlp_out", {"image_stream": out})["image_stream"])
            on(block.ff_context, lambda mod, a, out, b=b: self._visit(b, "mlp_out", {"text": out})["text"])
            on(block, self._double_pair(b, "output", image_first=False))
        for j, block in enumerate(m.single_transformer_blocks):
            b = ND + j
            on(block, self._single_input(b), pre=True)
            on(block.attn.to_out, self._single_parts(b))
            on(block, lambda mod, a, out, b=b: self._visit(b, "output", {"joint": out})["joint"])
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _double_input(self, b):
        def hook(mod, args, kwargs):
            parts = self._visit(b, "input", {"text": kwargs["encoder_hidden_states"],
                                             "image_stream": kwargs["hidden_states"]})
            return args, dict(kwargs, encoder_hidden_states=parts["text"], hidden_states=parts["image_stream"])
        return hook

    def _double_pair(self, b, point, image_first):
        def hook(mod, args, out):  # block.attn returns (image stream, text); the block (text, image stream)
            img, txt = out if image_first else out[::-1]
            parts = self._visit(b, point, {"text": txt, "image_stream": img})
            pair = (parts["image_stream"], parts["text"])
            return pair if image_first else pair[::-1]
        return hook

    def _single_input(self, b):
        def hook(mod, args, kwargs):
            return args, dict(kwargs, hidden_states=self._visit(b, "input", {"joint": kwargs["hidden_states"]})["joint"])
        return hook

    def _single_parts(self, b):
        """to_out's input is [attention output | SwiGLU output]: its rows split the fused projection."""
        import torch
        def hook(mod, args, out):
            import torch
            x, w = args[0], mod.weight
            attn = torch.nn.functional.linear(x[..., :D], w[:, :D])
            mlp = torch.nn.functional.linear(x[..., D:], w[:, D:])
            new_attn = self._visit(b, "attn_out", {"joint": attn})["joint"]
            new_mlp = self._visit(b, "mlp_out", {"joint": mlp})["joint"]
            changed = (new_attn != attn) | (new_mlp != mlp)
            return torch.where(changed, new_attn + new_mlp, out)
        return hook


def theirs(model, subs=None):
    import torch
    hooks = Hooks(model["module"], subs)
    with hooks.installed(), torch.no_grad():
        out = model["module"](torch.as_tensor(model["img"]), torch.as_tensor(model["txt"]), torch.zeros(2),
                              torch.as_tensor(LAYOUT.img_ids()), torch.as_tensor(LAYOUT.txt_ids())).sample.numpy()
    return out, hooks.seen


def ours(model, iv=None):
    out, caps = fwd(model["params"], TINY, jnp.asarray(model["img"]), jnp.asarray(model["txt"]), jnp.zeros(2),
                    LAYOUT.img_ids(), LAYOUT.txt_ids(), interventions=iv, capture=EVERY_SITE,
                    num_ref_tokens=LAYOUT.n_ref)
    return np.asarray(out), caps


def _compare(caps, seen):
    assert set(seen) == set(EMBED_SITES + BLOCK_SITES)
    worst = {site.name: rel_err(caps[site], seen[site]) for site in seen}
    assert max(worst.values()) <= TOL_T0, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


# ------------------------------------------------------------------------------------------------


def test_every_site_captured_matches_the_hooks(model):
    out, caps = ours(model)
    ref, seen = theirs(model)
    assert rel_err(out, ref) <= TOL_T0
    _compare(caps, seen)
    sizes = {"text": T, "image": N_IMG, "reference": LAYOUT.n_ref}
    for site in EVERY_SITE.sites:
        assert caps[site].shape == (2, sizes[site.stream], D)
    # the single blocks' two contributions add up to the fused projection
    z = caps["b3.text.attn_out"] + caps["b3.text.mlp_out"]
    assert rel_err(z, seen[fluxjax.site(3, "text", "attn_out")] + seen[fluxjax.site(3, "text", "mlp_out")]) <= TOL_T0


def _substitutions(block: int, seed: int):
    """One substitution at every kind of site of `block` (outputs only at -1), random masks, the
    keep weights alternating between replacing (0) and adding (1)."""
    rng = np.random.default_rng(seed)
    sizes = {"text": T, "image": N_IMG, "reference": LAYOUT.n_ref}
    subs = {}
    points = ("output",) if block == -1 else POINTS
    for i, (stream, point) in enumerate((s, p) for s in STREAMS for p in points):
        value = rng.standard_normal((2, sizes[stream], D)).astype(np.float32)
        mask = rng.random((2, sizes[stream])) < 0.5
        subs[fluxjax.site(block, stream, point)] = (value, mask, np.float32(i % 2))
    return subs


@pytest.mark.parametrize("blocks", [(-1,), tuple(range(NB))], ids=["embed", "every-block"])
def test_substitution_at_every_site_matches_the_hooks(model, blocks):
    """The substitutions of one structure at every block in turn (one compiled program), each against
    the hooks doing the same, with every site captured after them."""
    plain, _ = theirs(model)
    for block in blocks:
        subs = _substitutions(block, seed=10 + block)
        iv = fluxjax.Interventions(substitutions=tuple(
            fluxjax.substitution(site, value, mask, keep) for site, (value, mask, keep) in subs.items()))
        out, caps = ours(model, iv)
        ref, seen = theirs(model, subs)
        assert rel_err(out, ref) <= TOL_T0, block
        _compare(caps, seen)
        assert rel_err(ref, plain) > 1e-3  # the substitutions acted
