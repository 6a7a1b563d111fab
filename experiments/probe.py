"""Linear probes: where (block, position group, step) is a task's reference property linearly decodable?

Reads activation stores (`experiments.collect`, `experiments.store`) and, for every site, kept step
and position group, fits ridge-regression probes and scores them on held-out tasks:

    colour class   one-vs-rest ridge regression on one-hot labels, predicted class the largest
                   output: the held-out accuracy, with its 95 % Wilson interval over the tasks
    colour (Lab)   ridge regression on the reference's CIELAB values: held-out R^2

Position groups of the text stream: `content` (the mean over the instruction's own tokens),
`padding` (the mean over every other text position) at every kept step, and each position alone
(`p0`, `p1`, ...; `--positions`) at the first and the last (`--position-steps`): at the first
step the noisy image holds nothing of the reference yet, so what the text holds there came from
the reference, not from the picture drawn so far. Another stream's sites give one group, `all` (the mean over its tokens).

Held out: k-fold cross-validation over the tasks (`--folds`, folds stratified by class, seeded),
so every task is predicted once by a probe that never saw it, and n is the number of tasks.
Features are standardised with the training fold's mean and deviation; the ridge penalty is
`--ridge` x the number of features (the probe is solved in its dual form, n x n).

Controls: the same probes on labels shuffled among the tasks (at chance when the probe finds
nothing the labels do not put there), and, with `--baseline STORE`, the same probes on a store of
the same tasks collected without the reference (`collect --no-reference`: text-to-image from the
instruction alone), where the colour cannot be in the activations.

    python -m experiments.probe runs/collect/text-routed --baseline runs/collect/text-routed-t2i \
        --out runs/probe/text-routed

Writes `--out`/probe.csv (every probe), probe.md (content and padding at the last kept step),
heatmaps (block x position group, per store) and report.html.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from experiments import store as storelib

DEFAULT_FOLDS = 5
DEFAULT_RIDGE = 0.1  # the penalty per feature: the features are standardised, so a sample's squared norm is ~ D
SHUFFLE_SEED = 1  # the labels' permutation of the shuffled control (the folds use --seed)


@dataclasses.dataclass(frozen=True)
class Labels:
    """The targets of the probes, one row per task."""

    classes: tuple[str, ...]  # class names, index order
    y: np.ndarray  # int [n]: class index per task
    lab: np.ndarray | None  # float [n, 3]: the reference's CIELAB per task, where every task gives it

    def shuffled(self, seed: int, draws: int = 100) -> "Labels":
        """The same labels permuted among the tasks (the class and Lab of a task move together): of
        `draws` seeded permutations, the one that leaves the fewest tasks their own class (at a
        few tasks a random permutation may give every task its class back)."""
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(self.y)) for _ in range(draws)]
        order = min(orders, key=lambda o: int((self.y[o] == self.y).sum()))
        return Labels(self.classes, self.y[order], None if self.lab is None else self.lab[order])


def labels_of(store: storelib.Store, rows: Sequence[int], label: str = "colour") -> Labels:
    """The `label` (a key of the store's task labels, e.g. colour) and Lab of the tasks at `rows`."""
    by_task = store.attrs["labels"]
    tasks = [store.tasks[i] for i in rows]
    missing = [t for t in tasks if label not in by_task.get(t, {})]
    if missing:
        raise ValueError(f"{store.path}: tasks {missing[:3]} have no {label!r} label; probe a label every task "
                         f"gives (the colour bucket's tasks give colour and object)")
    names = [by_task[t][label] for t in tasks]
    classes = tuple(sorted(set(names)))
    y = np.asarray([classes.index(v) for v in names], np.int32)
    lab = None
    if all("lab" in by_task[t] for t in tasks):
        lab = np.asarray([by_task[t]["lab"] for t in tasks], np.float32)
    return Labels(classes, y, lab)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """int [n]: each task's fold, every class spread over the folds as evenly as it allows (seeded)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int32)
    start = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return fold


@functools.partial(jax.jit, static_argnames=("folds",))
def _held_out(x, targets, fold, ridge, *, folds):
    """Held-out predictions of ridge probes: x [G, n, D] features of G position groups, targets
    [n, K], fold int [n] -> [G, n, K], each task predicted by the probe of its own fold's complement.

    Per fold, the training rows are standardised by their own mean and deviation and the centred
    targets fitted by ridge regression, W = (X^T X + ridge D I)^-1 X^T Y, or in its dual form
    X^T (X X^T + ridge D I)^-1 Y where there are fewer tasks than features (the same W, the smaller
    system); the test rows are predicted as X_test W + mean. Test rows enter as zero rows (masks,
    not slices), so every fold has the same shapes."""
    n, d = x.shape[1], x.shape[2]
    penalty = ridge * d

    def solve(gram, rhs):  # gram is symmetric positive definite (the penalty's diagonal)
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), rhs)

    def one_fold(xg, f):
        train = (fold != f).astype(jnp.float32)[:, None]  # [n, 1]
        count = train.sum()
        mean = (xg * train).sum(0) / count
        centred = xg - mean
        std = jnp.sqrt(((centred * train) ** 2).sum(0) / count)
        xs = centred / jnp.where(std > 0, std, 1.0)  # a constant feature stays 0
        t_mean = (targets * train).sum(0) / count
        xt, yt = xs * train, (targets - t_mean) * train  # zero on the test rows
        if d <= n:
            w = solve(xt.T @ xt + penalty * jnp.eye(d, dtype=xg.dtype), xt.T @ yt)
        else:
            w = xt.T @ solve(xt @ xt.T + penalty * jnp.eye(n, dtype=xg.dtype), yt)
        return xs @ w + t_mean

    def group(xg):
        per_fold = jax.vmap(lambda f: one_fold(xg, f))(jnp.arange(folds))  # [F, n, K]
        return jnp.take_along_axis(per_fold, fold[None, :, None], axis=0)[0]

    return jax.lax.map(group, x)


def position_features(values: np.ndarray, content: np.ndarray, positions: Sequence[int] | None
                      ) -> tuple[list[str], np.ndarray]:
    """(group names, float32 [G, n, D]) of the text stream's values [n, T, D] at one step: the content
    mean, the padding mean, then each position in `positions` alone."""
    values = values.astype(np.float32)
    weights = content.astype(np.float32)
    names, feats = [], []
    for name, w in (("content", weights), ("padding", 1.0 - weights)):
        if (w.sum(1) == 0).any():
            continue  # some task has no position of this group
        names.append(name)
        feats.append((values * w[:, :, None]).sum(1) / w.sum(1)[:, None])
    for p in positions or ():
        names.append(f"p{p}")
        feats.append(values[:, p])
    return names, np.stack(feats)


def accuracy(predicted: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """(correct, n) of class predictions."""
    return int((predicted == y).sum()), len(y)


def r_squared(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST over every channel of held-out predictions."""
    return float(1.0 - ((predicted - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def probe_store(store: storelib.Store, *, name: str, label: str = "colour", folds: int = DEFAULT_FOLDS,
                seed: int = 0, ridge: float = DEFAULT_RIDGE, positions: str = "all",
                steps: Sequence[int] | None = None, position_steps: str = "first,last") -> list[dict]:
    """Every probe of a store: one row per site, kept step and position group (module docstring),
    with its shuffled-label control. name: the store's name in the rows (e.g. edit, t2i).
    positions: the single positions probed ('all', 'none', 'a:b' or 'a,b'), at the steps
    `position_steps` names ('all', or step indices and 'first' / 'last', comma-separated). steps:
    which kept steps (the sampler's step indices; default all kept)."""
    from fluxjax.metrics import wilson_interval

    rows_written = np.flatnonzero(store.written())
    if len(rows_written) == 0:
        raise ValueError(f"{store.path}: no task written yet; finish the collection first")
    labels = labels_of(store, rows_written, label)
    shuffled = labels.shuffled(SHUFFLE_SEED)
    n, classes = len(rows_written), len(labels.classes)
    if classes < 2:
        raise ValueError(f"{store.path}: every task has the {label} {labels.classes[0]!r}; a probe needs two classes")
    folds = min(folds, int(np.bincount(labels.y).max()), n)
    if folds < 2:
        raise ValueError(f"{store.path}: {n} tasks are too few for held-out probes (two folds at least)")
    content = store.text_content()[rows_written]
    content_share = content.mean(0)  # per text position: the share of tasks in which it is the instruction's
    kept = store.steps
    chosen = kept if steps is None else [s for s in kept if s in steps]
    text_tokens = store.attrs["tokens"]["text"]
    single = parse_positions(positions, text_tokens)
    at_positions = chosen if position_steps == "all" else [
        {"first": chosen[0], "last": chosen[-1]}.get(v.strip()) if v.strip() in ("first", "last") else int(v)
        for v in position_steps.split(",") if v.strip()]
    out = []
    for site in store.sites:
        block, stream, point = _site_parts(site)
        for step in chosen:  # one site and step in memory at a time: [n, token, D]
            at = store.read(site, rows_written, [kept.index(step)])[:, 0]
            if stream == "text":
                groups, x = position_features(at, content, single if step in at_positions else ())
            else:
                groups, x = ["all"], at.astype(np.float32).mean(1)[None]
            runs = {"": labels, "shuffled_": shuffled}
            results = {}
            for prefix, lab in runs.items():
                fold = jnp.asarray(stratified_folds(lab.y, folds, seed))
                onehot = np.eye(classes, dtype=np.float32)[lab.y]
                targets = onehot if lab.lab is None else np.concatenate([onehot, lab.lab], axis=1)
                pred = np.asarray(_held_out(jnp.asarray(x), jnp.asarray(targets), fold, ridge, folds=folds))
                results[prefix] = (lab, pred)
            for g, group in enumerate(groups):
                row = {"store": name, "site": site, "block": block, "stream": stream, "point": point, "step": step,
                       "group": group, "n": n, "classes": classes, "chance": 1.0 / classes,
                       "content_share": float(content_share[int(group[1:])]) if group[0] == "p" and
                       group[1:].isdigit() and stream == "text" else None}
                for prefix, (lab, pred) in results.items():
                    correct, total = accuracy(pred[g, :, :classes].argmax(-1), lab.y)
                    low, high = wilson_interval(correct, total)
                    row.update({f"{prefix}correct": correct, f"{prefix}accuracy": correct / total,
                                f"{prefix}low": low, f"{prefix}high": high})
                    if lab.lab is not None:
                        row[f"{prefix}lab_r2"] = r_squared(pred[g, :, classes:], lab.lab)
                out.append(row)
    return out


def parse_positions(spec: str, tokens: int) -> list[int]:
    """The single text positions of `--positions`: 'all', 'none', 'a:b' (a..b-1) or 'a,b,c'."""
    if spec == "all":
        return list(range(tokens))
    if spec == "none":
        return []
    if ":" in spec:
        a, b = spec.split(":", 1)
        chosen = list(range(int(a or 0), int(b or tokens)))
    else:
        chosen = [int(v) for v in spec.split(",") if v.strip()]
    bad = [p for p in chosen if not 0 <= p < tokens]
    if bad:
        raise ValueError(f"--positions {spec}: positions {bad} out of 0..{tokens - 1}")
    return chosen


def _site_parts(name: str) -> tuple[int, str, str]:
    """(block, stream, point) of a site name, read without fluxjax (-1 for the input projections)."""
    head, stream, point = name.split(".")
    return (-1 if head == "embed" else int(head[1:])), stream, point


# ---------------------------------------------------------------------------------------------
# the report


def _interval(row: Mapping, prefix: str = "") -> str:
    return f"{100 * row[prefix + 'accuracy']:.0f} % [{100 * row[prefix + 'low']:.0f}, {100 * row[prefix + 'high']:.0f}]"


def summary_rows(rows: Sequence[Mapping], step: int, groups: Sequence[str] = ("content", "padding")) -> list[dict]:
    """The rows of the text stream's `groups` at `step`, with their intervals as text."""
    out = []
    for r in rows:
        if r["step"] == step and r["group"] in groups:
            out.append({"store": r["store"], "site": r["site"], "group": r["group"], "n": r["n"],
                        "accuracy": _interval(r), "shuffled labels": _interval(r, "shuffled_"),
                        "Lab R2": r.get("lab_r2"), "chance": r["chance"]})
    return out


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _membership(share: float) -> str:
    return "content" if share == 1 else "padding" if share == 0 else f"content in {100 * share:.0f} %"


def heatmap_sections(folder: Path, rows: Sequence[Mapping], store_names: Sequence[str], num_double_blocks=None):
    """Figures: per store, block x position group (every group) at each step whose positions were
    probed, and block x (step, content / padding)."""
    from experiments import report
    from fluxjax.files import atomic_write_bytes

    figures = []
    for name in store_names:
        mine = [r for r in rows if r["store"] == name and r["stream"] == "text" and r["block"] >= 0]
        if not mine:
            continue
        blocks = sorted({r["block"] for r in mine})
        point = mine[0]["point"]
        mine = [r for r in mine if r["point"] == point]
        steps = sorted({r["step"] for r in mine})
        value = {(r["block"], r["step"], r["group"]): r["accuracy"] for r in mine}
        groups = list(dict.fromkeys(r["group"] for r in mine))
        share = {r["group"]: r["content_share"] for r in mine if r.get("content_share") not in (None, "")}
        labels = [f"{g} ({_membership(float(share[g]))})" if g in share else f"{g} mean" for g in groups]
        for step in [s for s in steps if any(g in share for (_, at, g) in value if at == s)] or steps[-1:]:
            png = report.heatmap_plot(blocks, labels, [[value.get((b, step, g)) for b in blocks] for g in groups],
                                      colour_label="held-out accuracy", vmin=0.0, vmax=1.0, ylabel="position group",
                                      title=f"{name}: colour probe, text {point}, step {step}",
                                      num_double_blocks=num_double_blocks)
            path = atomic_write_bytes(folder / "plots" / f"probe-{name}-groups-step{step}.png", png)
            figures.append(report.Figure(path=path, caption=f"{name}: held-out accuracy per block and position group "
                                                            f"(content mean, padding mean, each position) at step "
                                                            f"{step}"))
        rows_steps = [(s, g) for s in steps for g in ("content", "padding") if (blocks[0], s, g) in value]
        png = report.heatmap_plot(blocks, [f"step {s} {g}" for s, g in rows_steps],
                                  [[value.get((b, s, g)) for b in blocks] for s, g in rows_steps],
                                  colour_label="held-out accuracy", vmin=0.0, vmax=1.0, ylabel="step, group",
                                  title=f"{name}: content and padding by step", num_double_blocks=num_double_blocks)
        path = atomic_write_bytes(folder / "plots" / f"probe-{name}-steps.png", png)
        figures.append(report.Figure(path=path, caption=f"{name}: held-out accuracy of the content and padding means "
                                                        "per block and step"))
    return figures


def section(folder: str | os.PathLike, rows: Sequence[Mapping], store_names: Sequence[str], *, notes: str = "",
            num_double_blocks=None, title: str = "Linear probes of the reference colour"):
    """The report section of `rows` (`probe_store`'s, of the stores `store_names`), its files
    written in `folder`: probe.csv (every probe), probe.md (the content and padding means at the
    last step) and the heatmaps under plots/."""
    from experiments import report
    from fluxjax import metrics
    from fluxjax.files import atomic_write_text

    folder = Path(folder).resolve()  # the figures' paths must lie inside the report's folder as resolved
    atomic_write_text(folder / "probe.csv", metrics.rows_to_csv(list(rows)))
    last = max(r["step"] for r in rows)
    summary = summary_rows(rows, last)
    columns = ["store", "site", "group", "n", "accuracy", "shuffled labels", "Lab R2"]
    atomic_write_text(folder / "probe.md", f"Colour probes at step {last}: held-out accuracy [95 % Wilson interval]\n\n"
                      + markdown_table(summary, columns))
    chance = rows[0]["chance"]
    return report.Section(title, [
        report.Text(f"Ridge probes of the reference colour ({rows[0]['classes']} classes, chance "
                    f"{100 * chance:.1f} %), {rows[0]['n']} tasks, held out by cross-validation over the tasks; "
                    f"95 % Wilson intervals. Controls: the same probes on shuffled labels, and (t2i) on the same tasks "
                    f"collected without the reference, where given. Decodable is not used: the knockouts and the "
                    f"lens say which positions the model reads. {notes}"),
        *heatmap_sections(folder, rows, store_names, num_double_blocks),
        report.Table(title=f"Content and padding means at step {last}", columns=columns, rows=summary,
                     formats={"Lab R2": "{:.2f}"}),
        report.Text("Every probe (each position, each step): probe.csv.")])


def write_outputs(folder: str | os.PathLike, rows: Sequence[Mapping], store_names: Sequence[str], *,
                  command: str | None = None, notes: str = "", num_double_blocks=None) -> Path:
    """probe.csv, probe.md, the heatmaps and report.html in `folder`; returns the report's path."""
    from experiments import report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sections = [section(folder, rows, store_names, notes=notes, num_double_blocks=num_double_blocks, title="Probes")]
    return report.write_report(folder, "Linear probes of the reference colour", sections, command=command)


def _store_at(path: str | os.PathLike) -> storelib.Store:
    """A store given as its folder, or as the run folder of `experiments.collect` that holds it."""
    path = Path(path)
    if not (path / ".zattrs").exists() and (path / "collect.zarr" / ".zattrs").exists():
        path = path / "collect.zarr"
    return storelib.Store(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="an activation store, or the run folder of experiments.collect holding one")
    parser.add_argument("--baseline", default=None,
                        help="the store of the same tasks collected without the reference (collect --no-reference)")
    parser.add_argument("--out", default=None, help="output folder (default: <store's run folder>/probe)")
    parser.add_argument("--label", default="colour", help="the task label to predict (default colour)")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help=f"cross-validation folds (default "
                                                                          f"{DEFAULT_FOLDS})")
    parser.add_argument("--seed", type=int, default=0, help="the folds' seed (default 0)")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help=f"ridge penalty per feature (default {DEFAULT_RIDGE})")
    parser.add_argument("--positions", default="all",
                        help="single text positions probed: 'all', 'none', 'a:b' or 'a,b' (default all)")
    parser.add_argument("--position-steps", default="first,last",
                        help="steps at which single positions are probed: 'all', or step indices and first / last, "
                             "comma-separated (default first,last; the content and padding means are probed at every "
                             "step)")
    parser.add_argument("--steps", default=None, help="sampler steps probed, 'a,b' (default every kept step)")
    args = parser.parse_args(argv)
    try:
        stores = {"edit": _store_at(args.store)}
        if args.baseline is not None:
            stores["t2i"] = _store_at(args.baseline)
            if stores["t2i"].tasks != stores["edit"].tasks:
                raise ValueError(f"--baseline {args.baseline} holds other tasks than {args.store}; collect the same "
                                 "tasks with --no-reference")
        steps = None if args.steps is None else [int(v) for v in args.steps.split(",")]
        if args.folds < 2:
            raise ValueError(f"--folds {args.folds}: give at least 2")
    except (ValueError, KeyError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    rows = []
    for name, store in stores.items():
        rows += probe_store(store, name=name, label=args.label, folds=args.folds, seed=args.seed, ridge=args.ridge,
                            positions=args.positions, steps=steps, position_steps=args.position_steps)
    out = Path(args.out) if args.out else stores["edit"].path.parent / "probe"
    command = "python -m experiments.probe " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    depth = (stores["edit"].attrs.get("model") or {}).get("double_blocks")
    path = write_outputs(out, rows, list(stores), command=command, num_double_blocks=depth)
    print((out / "probe.md").read_text(), end="")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
