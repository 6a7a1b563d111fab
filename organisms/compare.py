"""Organisms side by side: one Markdown table of their training runs and evaluations.

    python -m organisms.compare NAME=RUN_DIR:EVAL_DIR [NAME=RUN_DIR:EVAL_DIR ...] [--out table.md]

RUN_DIR holds the training run's `summary.json` and `train_settings.json` (a run folder of
`organisms.train`, or a committed organism's folder); EVAL_DIR the `pass_rates.json` of
`organisms.evaluate`. Rows: steps and training time, the final loss, then every measure of the
evaluations in the order of the first one (`k/n = 62.5 % [30.6 %, 86.3 %]` each, the bracket its
95 % Wilson interval, in the reports' one format: `fluxjax.metrics.pass_rate_text`; a measure an
evaluation lacks is left blank). The regime settings of each run
(those `organisms.train` writes only when set) head its column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fluxjax.files import atomic_write_text
from fluxjax.metrics import pass_rate_text
from organisms.text import TEXT_LENGTH
from organisms.train import REGIME_DEFAULTS


def column(run_dir: Path, eval_dir: Path) -> dict:
    """What one organism's column shows: its regime, training figures and pass rates by measure."""
    summary = json.loads((run_dir / "summary.json").read_text())
    settings = json.loads((run_dir / "train_settings.json").read_text())
    regime = [f"{k} = {settings[k]}" for k in REGIME_DEFAULTS if k in settings]
    length = settings["organism"]["encoder"]["length"]
    if length != TEXT_LENGTH:
        regime.append(f"text length {length}")
    rates = json.loads((eval_dir / "pass_rates.json").read_text())
    return {"regime": ", ".join(regime) or "none (plain)", "cuts": ", ".join(settings["organism"]["cuts"]) or "none",
            "steps": f"{summary['steps_done']} of {summary['steps']}",
            "minutes": f"{summary['train_seconds'] / 60:.1f}",
            "loss": f"{summary['final_loss_mean_last_50']:.4f}",
            "rates": {r["setting"]: pass_rate_text(r["passed"], r["n"]) for r in rates}}


def table(columns: dict[str, dict]) -> str:
    names = list(columns)
    head = "| measure | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = [("training regime", "regime"), ("routing cuts in training", "cuts"), ("steps", "steps"),
            ("training time (min)", "minutes"), ("loss, mean of the last 50 steps", "loss")]
    body = "".join(f"| {label} | " + " | ".join(columns[n][key] for n in names) + " |\n" for label, key in rows)
    measures = []
    for c in columns.values():
        measures += [m for m in c["rates"] if m not in measures]
    body += "".join(f"| {m} | " + " | ".join(columns[n]["rates"].get(m, "") for n in names) + " |\n"
                    for m in measures)
    return head + body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m organisms.compare", description=__doc__.splitlines()[0])
    parser.add_argument("columns", nargs="+", metavar="NAME=RUN_DIR:EVAL_DIR")
    parser.add_argument("--out", default=None, help="write the table here too (Markdown)")
    args = parser.parse_args(argv)
    columns = {}
    for spec in args.columns:
        name, sep, dirs = spec.partition("=")
        run_dir, sep2, eval_dir = dirs.partition(":")
        if not (sep and sep2 and name):
            parser.error(f"{spec!r}: give NAME=RUN_DIR:EVAL_DIR")
        for d, what in ((Path(run_dir), "summary.json"), (Path(eval_dir), "pass_rates.json")):
            if not (d / what).is_file():
                parser.error(f"{spec!r}: {d / what} does not exist")
        columns[name] = column(Path(run_dir), Path(eval_dir))
    text = table(columns)
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
