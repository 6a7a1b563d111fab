"""Train a model organism.

    python -m organisms.train --organism direct --out runs/direct --minutes 60 --seed 0
    python -m organisms.train --organism text-routed --out runs/text-routed --minutes 60 --seed 0

Objective: rectified flow on the noisy-image tokens only. For a clean target x0 (codec tokens),
noise eps ~ N(0, 1) and t ~ logit-normal (t = sigmoid(u), u ~ N(0, 1): SD3's choice, which puts
most training time in the middle of the path, where a uniform t would spend much on the easy
ends), x_t = (1 - t) x0 + t eps, and the loss is the mean squared error between the predicted
velocity and eps - x0. The reference tokens are context, as in FLUX.2: they enter clean and no
loss is taken on them. Every step holds `round(batch * t2i_share)` text-to-image examples (one
forward, no reference) and the rest edits (one forward with the reference; swatch with
probability p_swatch, else recolour); the loss is the per-sample mean.

Optimiser: AdamW (b1 0.9, b2 0.99, weight decay on every parameter) after global-norm clipping;
linear warmup to peak_lr, then cosine decay to end_lr_ratio * peak_lr at `steps`. An exponential
moving average of the parameters (decay min(ema_decay, (1 + step) / (10 + step))) is what gets
exported.

Determinism: the initial parameters come from the seed; the data of step s, its noise and its
timesteps are a pure function of (seed, s), drawn on the host with numpy (see organisms.data). The
run folder keeps checkpoints (params, EMA, optimiser state, step; the JSON side holds the
loss history and the data stream's state) every `checkpoint_every` steps; rerunning the command
on the same folder resumes from the last one and recomputes the same steps. A checkpoint is a
folder `checkpoints/<step>/` (the state through `fluxjax.checkpoint`'s one tree path, the JSON
side in meta.json), renamed into place when complete. A folder made with
other settings is refused. `--minutes` caps the total training time over all resumes; the
schedule depends on `--steps` only, so a capped run is the prefix of the uncapped one.

The run folder, when the run ends:

    train_settings.json   the settings (fixed when the folder is made)
    checkpoints/<step>/   state/ (Orbax pytree) and meta.json, the last two kept
    loss.csv, loss.png    the loss curve
    summary.json          steps done, steps/s, final losses, whether the time cap stopped it
    organism/             the exported organism (EMA parameters; organisms.checkpoint)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from fluxjax.checkpoint import expected_leaves, read_tree, write_tree
from fluxjax.files import atomic_directory
from fluxjax.options import RuntimeOptions
from fluxjax.trees import named_leaves
from organisms import codec
from organisms.checkpoint import save_organism
from organisms.data import DESIGN, INSTRUCTIONS, SceneDesign, edit_kind, train_example, train_noise
from organisms.model import ENCODER, ORGANISMS, Organism, OrganismParams, init_organism, organism_interventions, \
    velocity


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    organism: Organism
    seed: int = 0
    steps: int = 2000  # length of the schedule
    batch_size: int = 32
    t2i_share: float = 0.25
    p_swatch: float = 2 / 3
    peak_lr: float = 1e-3
    warmup_steps: int = 200
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    attn_impl: str = "xla"  # the attention kernel (`fluxjax.RuntimeOptions.attention`): fastest here for these short
    #                         sequences; a runtime choice, kept in the settings for determinism
    # training regimes (docs/organisms.md, "Does the route emerge?"); none cuts an attention edge
    t2i_first_steps: int = 0  # the first steps are text-to-image only (FLUX.2's order: T2I, then editing)
    frozen_text_encoder: bool = False  # the text encoder keeps its initial weights (FLUX.2's is frozen)

    def __post_init__(self):
        if not 0 < self.n_t2i < self.batch_size:
            raise ValueError(f"batch {self.batch_size} with t2i_share {self.t2i_share} leaves no text-to-image or "
                             f"no edit example; every step needs both")
        if self.steps <= 0 or self.checkpoint_every <= 0 or self.warmup_steps >= self.steps:
            raise ValueError("need steps > warmup_steps >= 0 and checkpoint_every > 0")
        if not 0 <= self.t2i_first_steps < self.steps:
            raise ValueError(f"t2i_first_steps {self.t2i_first_steps} must be in [0, steps {self.steps})")

    @property
    def n_t2i(self) -> int:
        return round(self.batch_size * self.t2i_share)

    def to_json(self) -> dict:
        """The settings as JSON; a regime setting left at its default is left out, so folders made
        before the regimes existed (the committed organisms') still match and resume."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        return {k: v for k, v in out.items() if k not in REGIME_DEFAULTS or v != REGIME_DEFAULTS[k]}

    def all_t2i(self, step: int) -> bool:
        """Step `step` holds text-to-image examples only."""
        return step < self.t2i_first_steps


REGIME_DEFAULTS = {"t2i_first_steps": 0, "frozen_text_encoder": False}
MIN_TEXT_LENGTH = 2 + max(len(t.split()) for t in INSTRUCTIONS.values())  # <start>, the longest instruction, <end>


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: OrganismParams
    ema: OrganismParams
    opt_state: optax.OptState


def optimizer(s: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.peak_lr, s.warmup_steps, s.steps, s.peak_lr * s.end_lr_ratio)
    adamw = optax.chain(optax.clip_by_global_norm(s.clip_norm),
                        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=s.weight_decay))
    if not s.frozen_text_encoder:
        return adamw
    # the encoder gets no update at all (no weight decay either); clipping sees the transformer's gradients only
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                 lambda p: OrganismParams(transformer=jax.tree_util.tree_map(lambda _: "train", p.transformer),
                                                          encoder=jax.tree_util.tree_map(lambda _: "frozen", p.encoder)))


def init_state(s: TrainSettings) -> TrainState:
    """The state before step 0, committed to the default device like a restored one (jit compiles
    committed and uncommitted arguments apart)."""
    params = init_organism(s.organism, s.seed)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params, opt_state=_opt_init(params, s=s))
    return jax.device_put(state, jax.devices()[0])


@functools.partial(jax.jit, static_argnames=("s",))
def _opt_init(params, *, s: TrainSettings):
    return optimizer(s).init(params)


# ---------------------------------------------------------------------------------------------
# data


def make_batch(s: TrainSettings, step: int, design: SceneDesign = DESIGN) -> tuple[dict, object]:
    """The arrays of training step `step` and the edit forward's interventions (the organism's cuts).

    design: the scenes' design (organisms.data.DESIGN; another one only for design probes). A step
    of the text-to-image-first phase (`s.all_t2i(step)`) has no edit part (batch["edit"] is None).
    """
    n_t2i = s.batch_size if s.all_t2i(step) else s.n_t2i
    t2i = [train_example(s.seed, step, j, "t2i", design) for j in range(n_t2i)]
    edits = [train_example(s.seed, step, j, edit_kind(s.seed, step, j, s.p_swatch), design)
             for j in range(n_t2i, s.batch_size)]
    t2i_tokens, _ = s.organism.tokenize([e.instruction for e in t2i])
    t2i_x0 = codec.images_to_tokens(np.stack([e.target for e in t2i]))
    if not edits:
        (t2i_eps,), (t2i_t,) = train_noise(s.seed, step, (t2i_x0.shape,))
        return {"t2i": {"x0": t2i_x0, "refs": None, "tokens": t2i_tokens, "eps": t2i_eps, "t": t2i_t},
                "edit": None}, None
    edit_tokens, edit_content = s.organism.tokenize([e.instruction for e in edits])
    edit_x0 = codec.images_to_tokens(np.stack([e.target for e in edits]))
    (t2i_eps, edit_eps), (t2i_t, edit_t) = train_noise(s.seed, step, (t2i_x0.shape, edit_x0.shape))
    batch = {
        "t2i": {"x0": t2i_x0, "refs": None, "tokens": t2i_tokens, "eps": t2i_eps, "t": t2i_t},
        "edit": {"x0": edit_x0, "refs": codec.images_to_tokens(np.stack([e.reference for e in edits])),
                 "tokens": edit_tokens, "eps": edit_eps, "t": edit_t},
    }
    return batch, organism_interventions(s.organism, s.organism.layout(refs=True), edit_content)


# ---------------------------------------------------------------------------------------------
# the step


def flow_loss(params, s: TrainSettings, part, interventions):
    """Per-sample rectified-flow loss [B]: |v(x_t, t) - (eps - x0)|^2 averaged over tokens and channels."""
    x0, eps, t = part["x0"], part["eps"], part["t"]
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v, _ = velocity(params, s.organism, xt, part["refs"], part["tokens"], t, interventions,
                    runtime=RuntimeOptions(attention=s.attn_impl))
    return jnp.mean(jnp.square(v - (eps - x0)), axis=(1, 2))


def loss_fn(params, s: TrainSettings, batch, interventions):
    l_t2i = flow_loss(params, s, batch["t2i"], None)
    if batch["edit"] is None:  # a text-to-image-only step; its edit loss is reported as NaN
        return jnp.mean(l_t2i), (jnp.mean(l_t2i), jnp.full((), jnp.nan))
    l_edit = flow_loss(params, s, batch["edit"], interventions)
    return jnp.mean(jnp.concatenate([l_t2i, l_edit])), (jnp.mean(l_t2i), jnp.mean(l_edit))


@functools.partial(jax.jit, static_argnames=("s",))
def train_step(state: TrainState, batch, interventions, *, s: TrainSettings):
    (loss, (l_t2i, l_edit)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, s, batch, interventions)
    updates, opt_state = optimizer(s).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(s.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
    metrics = {"loss": loss, "loss_t2i": l_t2i, "loss_edit": l_edit, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------
# the run folder


LOSS_COLUMNS = ("step", "loss", "loss_t2i", "loss_edit", "grad_norm")


@dataclasses.dataclass
class RunResult:
    started_at: int  # the step this invocation started from (0, or the checkpoint it resumed)
    steps_done: int
    losses: list[dict]  # one row per step, LOSS_COLUMNS
    finished: bool  # all `steps` done (else stopped by the time cap or stop_at)
    steps_per_s: float | None  # this invocation, compile excluded
    organism_dir: Path | None


CHECKPOINTS_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
STATE_DIR = "state"
META_FILE = "meta.json"


def _latest_step(out: Path) -> int | None:
    """The step of the newest checkpoint in the run folder (folders appear only when complete)."""
    return max(_checkpoint_steps(out), default=None)


def _checkpoint_steps(out: Path) -> list[int]:
    folder = out / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _settings_file(out: Path, s: TrainSettings) -> None:
    path = out / "train_settings.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != s.to_json():
            changed = sorted(k for k in set(stored) | set(s.to_json()) if stored.get(k) != s.to_json().get(k))
            raise ValueError(f"{out} was made with other settings ({', '.join(changed)} differ); use a new --out "
                             f"folder or the same settings to resume")
    else:
        path.write_text(json.dumps(s.to_json(), indent=1))


def _save(out: Path, state: TrainState, meta: dict) -> None:
    """checkpoints/<step>/: the state through fluxjax's one tree path, the JSON side next to it;
    only the newest KEEP_CHECKPOINTS are kept."""
    with atomic_directory(out / CHECKPOINTS_DIR / str(int(state.step)), replace=True) as tmp:
        write_tree(tmp / STATE_DIR, named_leaves(state), expected_leaves(state), one_dtype=False)
        (tmp / META_FILE).write_text(json.dumps(meta))
    for step in _checkpoint_steps(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(out / CHECKPOINTS_DIR / str(step))


def _restore(out: Path, s: TrainSettings) -> tuple[TrainState, dict]:
    step = _latest_step(out)
    if step is None:
        return init_state(s), {"losses": [], "train_seconds": 0.0}
    folder = out / CHECKPOINTS_DIR / str(step)
    if not (folder / META_FILE).is_file():  # folders appear only when complete: this is another layout
        raise ValueError(f"{folder} has no {META_FILE}: the run folder was made by an older organisms.train; "
                         f"use a new --out folder")
    state = read_tree(folder / STATE_DIR, jax.eval_shape(functools.partial(init_state, s=s)),
                      what="training state of these settings")
    meta = json.loads((folder / META_FILE).read_text())
    if meta["data"] != {"seed": s.seed, "next_step": step} or len(meta["losses"]) != step:
        raise ValueError(f"checkpoint {folder} is inconsistent with its loss history")
    return state, meta


def write_curve(out: Path, losses: list[dict]) -> None:
    """loss.csv and loss.png (loss per step, log scale, with a moving average over up to 50 steps)."""
    lines = [",".join(LOSS_COLUMNS)] + [",".join(repr(r[c]) for c in LOSS_COLUMNS) for r in losses]
    (out / "loss.csv").write_text("\n".join(lines) + "\n")
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in losses])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, colour in (("loss", "C0"), ("loss_t2i", "C1"), ("loss_edit", "C2")):
        y = np.array([r[key] for r in losses])
        ax.plot(steps, y, color=colour, alpha=0.25, lw=0.8)
        k = max(1, min(50, len(y) // 10))
        ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), color=colour, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def train(out, s: TrainSettings, *, minutes: float | None = None, stop_at: int | None = None,
          progress: bool = True, export: bool = True) -> RunResult:
    """Train (or resume) in the run folder `out` until `s.steps`, `stop_at` or the time cap.

    The organism is exported (EMA parameters) when the run ends by finishing or by the time cap;
    `stop_at` stops without exporting (it stands for a kill after the last checkpoint).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _settings_file(out, s)
    state, meta = _restore(out, s)
    losses, train_seconds = list(meta["losses"]), float(meta["train_seconds"])
    start = int(state.step)
    last = s.steps if stop_at is None else min(stop_at, s.steps)
    budget = None if minutes is None else minutes * 60.0

    def checkpoint(state):
        _save(out, state, {"losses": losses, "train_seconds": train_seconds,
                               "data": {"seed": s.seed, "next_step": int(state.step)}})

    bar = tqdm(total=s.steps, initial=start, desc=f"{s.organism.name}", disable=not progress, unit="step")
    timed_from, timed_steps = None, 0
    capped = budget is not None and train_seconds >= budget and start < s.steps
    if capped:
        last = start
    batch, iv = make_batch(s, start) if start < last else (None, None)
    clock = time.perf_counter()
    for step in range(start, last):
        state, metrics = train_step(state, batch, iv, s=s)
        if step + 1 < last:
            batch, iv = make_batch(s, step + 1)  # built while the step runs
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        losses.append(row)
        now = time.perf_counter()
        train_seconds += now - clock
        clock = now
        if step == start:
            timed_from = now  # the first step includes the compile
        else:
            timed_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        capped = budget is not None and train_seconds >= budget and step + 1 < s.steps
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == last or capped:
            checkpoint(state)
            clock = time.perf_counter()  # checkpoint time does not count as training time
        if capped:
            break
    bar.close()
    steps_per_s = timed_steps / (time.perf_counter() - timed_from) if timed_steps else None
    done = int(state.step)
    if done > start and _latest_step(out) != done:
        checkpoint(state)
    write_curve(out, losses)
    finished = done >= s.steps
    organism_dir = None
    if export and (finished or capped):
        organism_dir = save_organism(out / "organism", s.organism, state.ema, overwrite=True)
    summary = {"organism": s.organism.name, "steps_done": done, "steps": s.steps, "finished": finished,
               "stopped_by_time_cap": capped, "train_seconds": round(train_seconds, 1),
               "steps_per_s_this_invocation": steps_per_s,
               "final_loss_mean_last_50": float(np.mean([r["loss"] for r in losses[-50:]])) if losses else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(start, done, losses, finished, steps_per_s, organism_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organism", required=True, choices=sorted(ORGANISMS))
    parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=None, help="cap on total training time")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="schedule length")
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--checkpoint-every", type=int, default=TrainSettings.checkpoint_every)
    regimes = parser.add_argument_group("training regimes (no attention edge is cut by any of them)")
    regimes.add_argument("--t2i-first", type=int, default=0, metavar="STEPS",
                         help="the first STEPS steps are text-to-image only; edits join after them")
    regimes.add_argument("--text-length", type=int, default=ENCODER.length, metavar="T",
                         help=f"text positions (default {ENCODER.length}): a longer text has more padding positions")
    regimes.add_argument("--frozen-text-encoder", action="store_true",
                         help="train the transformer only; the text encoder keeps its initial weights")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} {value}: give a positive number" for name, value in
                (("steps", args.steps), ("batch_size", args.batch_size), ("checkpoint_every", args.checkpoint_every),
                 ("minutes", args.minutes)) if value is not None and value <= 0]
    if args.t2i_first < 0 or 0 < args.steps <= args.t2i_first:  # (a bad --steps is reported on its own)
        problems.append(f"--t2i-first {args.t2i_first}: give 0 <= STEPS < --steps {args.steps}")
    if args.text_length < MIN_TEXT_LENGTH:
        problems.append(f"--text-length {args.text_length}: the longest instruction needs {MIN_TEXT_LENGTH} positions")
    if problems:  # one line each, before anything is written
        parser.exit(2, "".join(f"{parser.prog}: error: {p}\n" for p in problems))
    organism = ORGANISMS[args.organism]
    if args.text_length != organism.text_length:
        organism = dataclasses.replace(organism, encoder=dataclasses.replace(organism.encoder, length=args.text_length))
    s = TrainSettings(organism=organism, seed=args.seed, steps=args.steps,
                      batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                      t2i_first_steps=args.t2i_first, frozen_text_encoder=args.frozen_text_encoder)
    result = train(args.out, s, minutes=args.minutes)
    state = "finished" if result.finished else "stopped by the time cap"
    print(f"{s.organism.name}: {result.steps_done}/{s.steps} steps, {state}; organism in {result.organism_dir}")


if __name__ == "__main__":
    main()
