"""Attribution patching: every patch and every knockout edge estimated from one forward and one
backward pass, then checked against exact runs.

Replacing an activation a by a' changes a metric m by about (a' - a) . dm/da (Nanda 2023; AtP*,
Kramar et al. 2024). Here m is differentiable in the sampler's output: the colour distance of the
generated image's object to a colour (`colour_metric`: the mean RGB of the object's pixels, the
object being the clean edit's foreground, against the colour; 0..255 units). Two kinds of cells:

    patches  (text position j, block k): the target edit's text stream at the output of block k,
             position j, replaced at every sampler step by the source edit's (the I2I -> I2I
             patching of experiments.patching, one position at a time). m: the distance to the
             source reference's colour (a patch that moves the colour over lowers it).
             Estimate: sum over steps and width of (a_source - a_target) . dm/da at a_target, all
             cells from one backward pass (an additive zero substitution at every block).
    edges    (query group <- key group, block b [, head h]): the edge cut in that block (and head)
             at every step (the knockout of experiments.knockout). m: the distance to the edit's
             own reference colour (a cut that loses the colour raises it). Estimate: -dm/dgate at
             gate = 1 (`fluxjax.edge_gates`: gate 0 is the knockout), all cells from one backward.

The gradient runs through every sampler step (--steps 1: one step of the model's schedule).
Where linearising fails, AtP*'s remedies (--methods):

    atp      the plain estimate above
    fix      edges only: AtP*'s softmax (QK) fix: each query's attention change from the cut taken
             exactly, only what follows it linearised (`fluxjax.numerics.gated_attention`)
    ig       patches only: integrated gradients over the patch, per block: the gradient averaged
             over --ig-points patches alpha (a_source - a_target) of every position of the block at
             once (alpha at the midpoints of [0, 1]); points x blocks backward passes

Checks: exact runs of the top --top-k cells by |estimate| and of --control cells drawn at random
(seed 0), or of every cell (--exact all: the Spearman correlation over all cells, and how many of
the exact top 5 (by |effect|) are among the estimated top 10). The report (report.html, cells.csv,
summary.json) gives both and an estimate-against-exact scatter plot per kind and method.

    python -m experiments.attribute --model text-routed --exact all
    python -m experiments.attribute --model direct --kinds edges --heads --top-k 20 --control 20
    python -m experiments.attribute --model text-routed --exact all --time   # cost against the exact sweep

--time measures, after compiling, the estimate of each kind against the exact sweep of the same
cells (compile and run apart) and their ratio; run it on a quiet machine (--wait-quiet waits for
the load average to fall first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from experiments.backend import Edit, backend
from fluxjax import metrics
from fluxjax import sampler as samplerlib
from fluxjax.interventions import Capture, Interventions, Knockout, edge_gates, per_step, stack, substitution
from fluxjax.metrics import STUDY_COLOURS

KINDS = ("patches", "edges")
METHODS = {"patches": ("atp", "ig"), "edges": ("atp", "fix")}
TOP_FOR_OVERLAP = (5, 10)  # how many of the exact top 5 are among the estimated top 10


# ---------------------------------------------------------------------------------------------
# the metric


def colour_metric(decode: Callable, foreground: np.ndarray, colour_rgb: Sequence[float]) -> Callable:
    """m(latents [1, N_img, P]) -> scalar: the Euclidean distance (0..255 RGB units) between the mean
    colour of the `foreground` pixels of the decoded image and `colour_rgb`. decode: differentiable,
    latents -> pixels [1, H, W, 3] in [-1, 1]; foreground: bool [H, W] (the object, fixed)."""
    weights = jnp.asarray(foreground, jnp.float32)[None, :, :, None]
    weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    colour = jnp.asarray(colour_rgb, jnp.float32)

    def m(latents):
        pixels = (decode(latents).astype(jnp.float32) + 1.0) * 127.5
        mean = jnp.sum(pixels * weights, axis=(0, 1, 2))
        return jnp.sqrt(jnp.sum(jnp.square(mean - colour)) + 1e-6)

    return m


def differentiable_decode(model, edit: Edit) -> Callable:
    """latents [1, N_img, P] -> pixels [1, H, W, 3] in [-1, 1], differentiable: an organism's patch
    codec, or a FLUX.2 folder's VAE decoder."""
    model = backend(model)
    if hasattr(model, "organism"):
        from organisms import codec

        return lambda latents: codec.decode(latents, edit.layout.img_grid)
    from fluxjax import vae as vaelib

    inner = model.model  # a FLUX.2 folder's `Flux2Model`
    return lambda latents: vaelib.decode_tokens(inner.vae_params, inner.vae_config, latents, edit.height, edit.width)


# ---------------------------------------------------------------------------------------------
# running the sampler with a metric


@dataclasses.dataclass(frozen=True)
class Problem:
    """One edit, its sampler and its metric: what every estimate and exact run of one kind shares."""

    model: object
    edit: Edit
    options: samplerlib.SamplerOptions
    metric: Callable
    attn_impl: str | None = None  # the attention kernel (None: the backend's default)
    programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # name -> jitted function

    def program(self, name: str, make: Callable) -> Callable:
        """The jitted function `make()` under `name`, made once: a second call reuses its compiled program
        (so --time measures the run alone)."""
        if name not in self.programs:
            self.programs[name] = jax.jit(make())
        return self.programs[name]

    def latents(self, iv: Interventions | None, capture: Capture | None = None):
        """(latents [1, N_img, P], captures) of the edit under the model's cuts and `iv`."""
        model = backend(self.model)
        iv = model.with_cuts(self.edit.layout, self.edit.content_mask, iv)
        return samplerlib.sample(model.params, model.config, self.options, self.edit.txt, self.edit.txt_ids,
                                 self.edit.layout.img_ids(), noise=self.edit.noise, refs=self.edit.refs,
                                 uncond_txt=self.edit.uncond, interventions=iv, capture=capture,
                                 sigmas=model.sigmas(self.options.num_steps), attn_impl=self.attn_impl)

    def value(self, iv: Interventions | None = None):
        return self.metric(self.latents(iv)[0])

    def exact(self, cells: Sequence[Interventions], chunk: int = 32) -> np.ndarray:
        """m of every cell: vmapped sampler calls of `chunk` cells (the last padded)."""
        run = self.program("exact", lambda: jax.vmap(self.value))
        out = []
        for start in range(0, len(cells), chunk):
            part = list(cells[start:start + chunk])
            out.append(np.asarray(run(stack(part + [part[-1]] * (chunk - len(part)))))[:len(part)])
        return np.concatenate(out) if out else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# patches: (text position, block)


@dataclasses.dataclass(frozen=True)
class Patches:
    """The text stream of the source and target edits at the output of every block, every step."""

    problem: Problem
    source: jax.Array  # [S, n_blocks, 1, T, D]
    target: jax.Array  # [S, n_blocks, 1, T, D]

    @property
    def blocks(self) -> list[int]:
        return list(range(self.source.shape[1]))

    def labels(self) -> list[tuple[int, int]]:
        """(position, block) of every cell, block-major."""
        return [(j, k) for k in self.blocks for j in range(self.source.shape[3])]

    def cell(self, j: int, k: int) -> Interventions:
        mask = np.zeros((1, self.source.shape[3]), bool)
        mask[0, j] = True
        return Interventions(substitutions=(substitution(k, per_step(self.source[:, k]), mask),))

    def estimate(self, method: str, ig_points: int = 4) -> np.ndarray:
        """The estimated change of m per cell, in `labels` order."""
        delta = self.source - self.target  # [S, K, 1, T, D]
        if method == "atp":
            grads = self.problem.program("patches atp", lambda: jax.grad(self._added_everywhere))(jnp.zeros_like(delta))
        elif method == "ig":
            alphas = (np.arange(ig_points) + 0.5) / ig_points
            # block and alpha are values: one program
            grad_at = self.problem.program("patches ig", lambda: jax.grad(self._added_at, argnums=2))
            zeros = jnp.zeros_like(delta[:, 0])
            grads = jnp.stack([sum(grad_at(k, float(a), zeros) for a in alphas) / ig_points
                               for k in self.blocks], axis=1)
        else:
            raise ValueError(f"patch attribution method {method!r}: use one of {METHODS['patches']}")
        per_cell = jnp.sum(delta * grads, axis=(0, 2, 4))  # [K, T]
        return np.asarray(per_cell).reshape(-1)

    def _added_everywhere(self, zeros):
        """m with zeros[:, k] ([S, 1, T, D]) added to the text stream at every block k, every step."""
        subs = tuple(substitution(k, per_step(zeros[:, k]), keep=1.0) for k in self.blocks)
        return self.problem.value(Interventions(substitutions=subs))

    def _added_at(self, k, alpha, added):
        """m with alpha (source - target) + added ([S, 1, T, D]) added to the text stream at block k,
        every step: the integrated gradients' path; its gradient in `added` at 0 is the one at alpha."""
        value = alpha * (self.source[:, k] - self.target[:, k]) + added
        return self.problem.value(Interventions(substitutions=(substitution(k, per_step(value), keep=1.0),)))


def patches(model, options, source: Edit, target: Edit, metric, attn_impl: str | None = None) -> Patches:
    """The source and target edits' text streams at every block (one run each)."""
    sites = tuple(f"b{k}.text.output" for k in range(backend(model).config.num_blocks))
    capture = Capture(sites=sites)

    def streams(caps):  # [S, blocks, B, T, D]
        return jnp.stack([caps[s] for s in sites], axis=-4)

    problem = Problem(model, target, options, metric, attn_impl)
    src = streams(Problem(model, source, options, metric, attn_impl).latents(None, capture)[1])
    return Patches(problem=problem, source=src, target=streams(problem.latents(None, capture)[1]))


# ---------------------------------------------------------------------------------------------
# edges: (query group <- key group, block [, head])


@dataclasses.dataclass(frozen=True)
class Edges:
    problem: Problem
    heads: bool  # cells per head, else per block (every head)

    @property
    def layout(self):
        return self.problem.edit.layout

    def _open(self) -> np.ndarray:
        """bool [G, G]: edges the model's own cuts leave open (cutting another changes nothing)."""
        model = backend(self.problem.model)
        own = model.with_cuts(self.layout, self.problem.edit.content_mask, None)
        G = self.layout.num_groups
        if own is None or own.knockout is None:
            return np.ones((G, G), bool)
        return np.asarray(own.knockout.allowed).reshape(-1, G, G).all(axis=0)

    def labels(self) -> list[tuple]:
        """(query group, key group, block[, head]) of every cell whose edge is open, block-major."""
        cfg = backend(self.problem.model).config
        G, is_open = self.layout.num_groups, self._open()
        edges = [(gq, gk) for gq in range(G) for gk in range(G) if is_open[gq, gk]]
        heads = range(cfg.num_heads) if self.heads else [None]
        return [(gq, gk, b) + (() if h is None else (h,)) for b in range(cfg.num_blocks) for h in heads
                for gq, gk in edges]

    def name(self, label) -> str:
        names = self.layout.group_names
        head = f" h{label[3]}" if len(label) == 4 else ""
        return f"{names[label[1]]}->{names[label[0]]} b{label[2]}{head}"

    def cell(self, label) -> Interventions:
        cfg = backend(self.problem.model).config
        G = self.layout.num_groups
        shape = (cfg.num_blocks, cfg.num_heads, G, G) if self.heads else (cfg.num_blocks, G, G)
        allowed = np.ones(shape, bool)
        allowed[(label[2], label[3]) if self.heads else label[2]][label[0], label[1]] = False
        groups = self.layout.group_ids(self.problem.edit.content_mask)
        return Interventions(knockout=Knockout(allowed=jnp.asarray(allowed), groups=jnp.asarray(groups),
                                               stream_counts=(self.layout.n_img, *self.layout.ref_counts)))

    def estimate(self, method: str) -> np.ndarray:
        if method not in METHODS["edges"]:
            raise ValueError(f"edge attribution method {method!r}: use one of {METHODS['edges']}")
        cfg = backend(self.problem.model).config
        gates = edge_gates(cfg, self.layout, self.problem.edit.content_mask, per_head=self.heads,
                           softmax_fix=method == "fix")
        grad = self.problem.program(f"edges {method}", lambda: jax.grad(
            lambda g: self.problem.value(Interventions(gates=gates.replace(gate=g)))))(gates.gate)
        grad = np.asarray(grad)
        return np.asarray([-grad[(label[2], label[3]) if self.heads else label[2]][label[0], label[1]]
                           for label in self.labels()])


# ---------------------------------------------------------------------------------------------
# comparing estimates with exact runs


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 values or a constant side)."""
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(estimate, exact, exact_top: int = TOP_FOR_OVERLAP[0], estimate_top: int = TOP_FOR_OVERLAP[1]) -> int:
    """How many of the exact top `exact_top` cells (by |effect|) are among the estimated top `estimate_top`."""
    best = set(np.argsort(-np.abs(exact), kind="stable")[:exact_top])
    return len(best & set(np.argsort(-np.abs(estimate), kind="stable")[:estimate_top]))


def checked_cells(estimate: np.ndarray, exact_all: bool, top_k: int, control: int, seed: int = 0) -> dict:
    """Indices of the cells run exactly: every cell, or the top k by |estimate| and a random control
    sample of the rest ({'top': [...], 'control': [...]})."""
    n = len(estimate)
    if exact_all:
        return {"all": list(range(n))}
    top = [int(i) for i in np.argsort(-np.abs(estimate), kind="stable")[:top_k]]
    rest = np.setdiff1d(np.arange(n), top)
    rng = np.random.default_rng(seed)
    ctrl = sorted(int(i) for i in rng.choice(rest, size=min(control, len(rest)), replace=False))
    return {"top": top, "control": ctrl}


def scatter(series: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str) -> bytes:
    """A PNG: estimate (x) against exact (y) per method, with the diagonal."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    lo, hi = 0.0, 0.0
    for label, est, exact in series:
        ax.scatter(est, exact, s=12, alpha=0.7, label=label)
        lo, hi = min(lo, est.min(), exact.min()), max(hi, est.max(), exact.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("estimated change of m")
    ax.set_ylabel("exact change of m")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the command


@dataclasses.dataclass(frozen=True)
class Settings:
    kinds: tuple[str, ...] = KINDS
    methods: tuple[str, ...] = ("atp", "ig", "fix")
    obj: str | None = None  # default: the model's first object
    colour: str = "blue"  # the target edit's reference
    source_colour: str = "red"  # the patches' source edit's reference
    seed: int = 0
    steps: int | None = None  # sampler steps (None: the model's)
    exact_all: bool = False
    top_k: int = 10
    control: int = 10
    heads: bool = False
    ig_points: int = 4
    chunk: int = 32
    attn_impl: str | None = None


def _edit(model, colour: str, obj: str, seed: int) -> Edit:
    from PIL import Image

    from experiments.tasks import COLOUR_INSTRUCTION, flat_image

    model = backend(model)
    swatch = Image.fromarray(flat_image(STUDY_COLOURS[colour], model.default_size))
    return model.prepare(COLOUR_INSTRUCTION.format(object=obj), [swatch], seed=seed)


def _problem_parts(model, s: Settings):
    from experiments import models

    model = backend(model)
    obj = s.obj or models.objects("organism" if hasattr(model, "organism") else "folder")[0]
    options = model.options if s.steps is None else dataclasses.replace(model.options, num_steps=s.steps)
    target = _edit(model, s.colour, obj, s.seed)
    problem = Problem(model, target, options, lambda latents: jnp.zeros(()), s.attn_impl)
    decode = differentiable_decode(model, target)
    clean = np.asarray(model.decode(problem.latents(None)[0], target.height, target.width))[0]
    foreground = metrics.foreground_mask(clean)
    return model, obj, options, target, decode, clean, foreground


def attribute(model, s: Settings, *, timing: bool = False, log=print) -> tuple[dict, dict[str, bytes | str]]:
    """Estimates and exact checks of every kind and method of `s` on one edit: (the summary, the files
    to write: summary.json, cells.csv and a scatter plot per kind, by name)."""
    model, obj, options, target, decode, clean, foreground = _problem_parts(model, s)
    files = {}
    summary = {"object": obj, "colour": s.colour, "source_colour": s.source_colour, "seed": s.seed,
               "steps": options.num_steps, "foreground_pixels": int(foreground.sum()), "kinds": {}}
    rows = []
    for kind in s.kinds:
        if kind == "patches":
            metric = colour_metric(decode, foreground, STUDY_COLOURS[s.source_colour])
            cells = patches(model, options, _edit(model, s.source_colour, obj, s.seed), target, metric, s.attn_impl)
            labels = cells.labels()
            names = [f"pos {j} b{k}" for j, k in labels]
            make = [lambda lab=lab: cells.cell(*lab) for lab in labels]
            estimate = {m: (lambda m=m: cells.estimate(m, s.ig_points)) for m in s.methods if m in METHODS[kind]}
        elif kind == "edges":
            metric = colour_metric(decode, foreground, STUDY_COLOURS[s.colour])
            cells = Edges(Problem(model, target, options, metric, s.attn_impl), heads=s.heads)
            labels = cells.labels()
            names = [cells.name(lab) for lab in labels]
            make = [lambda lab=lab: cells.cell(lab) for lab in labels]
            estimate = {m: (lambda m=m: cells.estimate(m)) for m in s.methods if m in METHODS[kind]}
        else:
            raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
        problem = cells.problem
        base = float(problem.value(None))
        log(f"{kind}: {len(labels)} cells, m of the clean edit {base:.2f}")
        estimates, seconds = {}, {}
        for method, fn in estimate.items():
            t0 = time.perf_counter()
            estimates[method] = fn()
            seconds[method] = {"first": time.perf_counter() - t0}
            if timing:
                t0 = time.perf_counter()
                fn()
                seconds[method]["run"] = time.perf_counter() - t0
        picked = checked_cells(estimates[next(iter(estimates))], s.exact_all, s.top_k, s.control)
        if not s.exact_all:  # every method's own top k, and one control sample
            picked = {"control": picked["control"]}
            for method, est in estimates.items():
                picked[f"top ({method})"] = checked_cells(est, False, s.top_k, 0)["top"]
        run_idx = sorted({i for idx in picked.values() for i in idx})
        t0 = time.perf_counter()
        exact_values = problem.exact([make[i]() for i in run_idx], s.chunk) - base
        seconds["exact"] = {"first": time.perf_counter() - t0}
        if timing:
            t0 = time.perf_counter()
            problem.exact([make[i]() for i in run_idx], s.chunk)
            seconds["exact"]["run"] = time.perf_counter() - t0
        exact = dict(zip(run_idx, exact_values))
        result = {"cells": len(labels), "exact_runs": len(run_idx), "m_clean": base, "methods": {}}
        series = []
        for method, est in estimates.items():
            ex = np.asarray([exact[i] for i in run_idx])
            es = est[run_idx]
            figures = {"spearman": spearman(es, ex)}
            if s.exact_all:
                figures["exact_top5_in_estimated_top10"] = top_overlap(es, ex)
            else:
                top = picked[f"top ({method})"]
                figures["top_k_mean_abs_exact"] = float(np.mean([abs(exact[i]) for i in top]))
                figures["control_mean_abs_exact"] = float(np.mean([abs(exact[i]) for i in picked["control"]]))
            figures["seconds"] = seconds[method]
            result["methods"][method] = figures
            series.append((method, es, ex))
            log(f"  {method}: " + ", ".join(f"{k} {v}" for k, v in figures.items() if k != "seconds"))
        result["exact_seconds"] = seconds["exact"]
        if timing:  # the exact sweep of every cell: measured with --exact all, else scaled from the cells run
            sweep_seconds = seconds["exact"]["run"] * len(labels) / len(run_idx)
            result["exact_sweep_seconds"] = {"seconds": sweep_seconds, "measured": len(run_idx) == len(labels)}
            for method in estimates:
                result["methods"][method]["cost_ratio"] = seconds[method]["run"] / sweep_seconds
                log(f"  cost {method}: {seconds[method]['run']:.2f} s against the exact sweep's "
                    f"{sweep_seconds:.2f} s{'' if len(run_idx) == len(labels) else ' (scaled)'}: "
                    f"{result['methods'][method]['cost_ratio']:.3f}x")
        result["scatter"] = f"scatter-{kind}.png"
        files[result["scatter"]] = scatter(series, f"{kind}: estimate vs exact ({len(run_idx)} cells)")
        summary["kinds"][kind] = result
        for i in run_idx:
            rows.append({"kind": kind, "cell": names[i], "exact": float(exact[i]),
                         **{f"estimate_{m}": float(e[i]) for m, e in estimates.items()},
                         "checked_as": ",".join(k for k, idx in picked.items() if i in idx)})
    columns = ["kind", "cell", "exact", *[f"estimate_{m}" for m in ("atp", "ig", "fix")], "checked_as"]
    files["cells.csv"] = metrics.rows_to_csv(rows, columns)
    files["summary.json"] = json.dumps(summary, indent=2) + "\n"
    return summary, files


def sections(summary: dict, folder: Path, title: str = "Attribution patching") -> list[report.Section]:
    """The report's section of one model's attribution; `folder` holds its files."""
    rows = []
    for kind, res in summary["kinds"].items():
        for method, f in res["methods"].items():
            rows.append({"kind": kind, "method": method, "cells": res["cells"], "exact runs": res["exact_runs"],
                         "spearman": f.get("spearman"), "top5 in top10": f.get("exact_top5_in_estimated_top10"),
                         "cost": f.get("cost_ratio")})
    fmt = {"spearman": lambda v: "n/a" if v is None else f"{v:.3f}", "cost": lambda v: "" if v is None else f"{v:.3f}x",
           "top5 in top10": lambda v: "" if v is None else str(v)}
    items = [report.Text(f"Edit: '{summary['object']}' with a {summary['colour']} reference (seed {summary['seed']}, "
                         f"{summary['steps']} sampler steps); patches from the {summary['source_colour']} edit. "
                         "Estimates: attribution patching (experiments.attribute); exact: the interventions run."),
             report.Table("Estimate against exact", ["kind", "method", "cells", "exact runs", "spearman",
                                                     "top5 in top10", "cost"], rows, fmt),
             report.FigureRow([report.Figure(folder / res["scatter"], kind) for kind, res in summary["kinds"].items()])]
    return [report.Section(title, items)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="text-routed", help="an organism name or folder, or a FLUX.2 folder")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--methods", nargs="+", choices=("atp", "ig", "fix"), default=["atp", "ig", "fix"],
                        help="atp: plain; ig: integrated gradients (patches); fix: the softmax fix (edges)")
    parser.add_argument("--object", default=None, help="the edit's object (default: the model's first)")
    parser.add_argument("--colour", default="blue", choices=sorted(STUDY_COLOURS), help="the target's reference")
    parser.add_argument("--source-colour", default="red", choices=sorted(STUDY_COLOURS),
                        help="the patches' source edit's reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--exact", choices=("all", "sample"), default="sample",
                        help="all: every cell run exactly; sample: the top k and a random control (default)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--control", type=int, default=10)
    parser.add_argument("--heads", action="store_true", help="edge cells per head (default: per block, every head)")
    parser.add_argument("--ig-points", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=32, help="exact cells per vmapped call")
    parser.add_argument("--attn-impl", choices=("blocked", "xla", "cudnn", "pallas"), default=None,
                        help="the attention kernel of every run (default: the backend's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/attribution/<model>)")
    parser.add_argument("--time", action="store_true",
                        help="time each estimate and the exact sweep of the same cells after compiling (quiet machine)")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD",
                        help="with --time: wait until the 1-minute load average is below LOAD")


def settings_from_json(entry: dict) -> Settings:
    """Settings from their JSON form (a run config's)."""
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})


def settings_from(args) -> Settings:
    return Settings(kinds=tuple(args.kinds), methods=tuple(args.methods), obj=args.object, colour=args.colour,
                    source_colour=args.source_colour, seed=args.seed, steps=args.steps,
                    exact_all=args.exact == "all", top_k=args.top_k, control=args.control, heads=args.heads,
                    ig_points=args.ig_points, chunk=args.chunk, attn_impl=args.attn_impl)


def main(argv=None) -> int:
    from experiments import models

    parser = argparse.ArgumentParser(prog="python -m experiments.attribute", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.wait_quiet is not None:
        while os.getloadavg()[0] >= args.wait_quiet:
            print(f"load average {os.getloadavg()[0]:.1f} >= {args.wait_quiet}: waiting", flush=True)
            time.sleep(30)
    try:
        s = settings_from(args)
        model = models.load_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    out = Path(args.out or Path("runs/attribution") / models.name(args.model)).absolute()  # the report's links
    summary, files = attribute(model, s, timing=args.time)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    path = report.write_report(out, f"Attribution patching: {models.name(args.model)}", sections(summary, out),
                               config={"settings": dataclasses.asdict(s)}, command=" ".join(sys.argv))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
