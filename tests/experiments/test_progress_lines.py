"""Runs that talk to a log: with its output going to a file (not a terminal), an experiment writes a
progress line per experiment, per sweep chunk and per task (cells done / total, time elapsed, an
estimate of the time left); at the end, and on a resumed run, how many cells it skipped, repaired
and computed. The experiment is the main job's first: the T2I Lens swept over blocks, on an organism.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from experiments import runs

TASKS = ["--colours", "red,yellow", "--objects", "circle", "--seeds", "0"]


def lens_to_a_file(out: Path, log: Path) -> str:
    """`python -m experiments.lens` (the main job's first experiment: all / padding / content positions
    swept over blocks) on the text-routed organism, stdout and stderr to `log`; returns the log."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "experiments.lens", "--model", "text-routed", "--blocks", "0:3",
                               "--chunk", "4", *TASKS, "--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": ""}, timeout=900)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    return text


def test_a_run_writes_progress_lines_to_a_log_and_a_resume_says_what_it_did(tmp_path):
    out = tmp_path / "lens-run"
    text = lens_to_a_file(out, tmp_path / "first.log")
    name = out.name
    assert f"{out.resolve()}: new run folder: model organism 'text-routed'" in text
    assert re.search(rf"^{name} lens: T2I Lens, input form .*, 2 tasks: 0 complete \(skipped\), 2 to compute$", text,
                     re.M), text
    # 3 blocks x 3 position sets = 9 cells per task, 4 per call: chunks of 4, 8, 9 cells.
    chunks = re.findall(rf"^{name} lens: task (\d)/2 \((\S+)\): sweep (\d)/9 cells, (.*) elapsed(.*)$", text, re.M)
    assert [(t, done) for t, _, done, *_ in chunks] == [("1", "4"), ("1", "8"), ("1", "9"), ("2", "4"), ("2", "8"),
                                                       ("2", "9")], text
    assert all(left.startswith(", about ") and left.endswith(" left") for *_, left in chunks[:-1])
    assert re.search(rf"^{name} lens: task 1/2 done \(solid_red_circle_s0\), \d+ s elapsed, about .* left$", text, re.M)
    assert re.search(rf"^{name} lens: 2/2 tasks complete, 2 computed in ", text, re.M)
    # baselines and lens cells of both tasks
    assert f"{out.resolve()}: new run folder: 0 cells skipped (complete and intact), 0 repaired (damaged, computed " \
           f"again), 4 computed" in text
    assert json.loads((out / "summary.json").read_text())["cells"] == {"skipped": 0, "repaired": 0, "computed": 4}

    # Damage one lens cell: the resumed run recomputes it alone and says so.
    damaged = next((out / "outputs" / "lens" / "solid_yellow_circle_s0").glob("*.png"))
    damaged.unlink()
    text = lens_to_a_file(out, tmp_path / "resumed.log")
    assert f"{out.resolve()}: resuming:" in text
    assert re.search(rf"^{name} lens: .*2 tasks: 1 complete \(skipped\), 1 to compute \(1 of them damaged, computed "
                     r"again\)$", text, re.M), text
    assert f"{out.resolve()}: resumed: 3 cells skipped (complete and intact), 1 repaired (damaged, computed again), " \
           f"0 computed" in text
    assert json.loads((out / "summary.json").read_text())["cells"] == {"skipped": 3, "repaired": 1, "computed": 0}


def test_progress_lines_keep_to_a_log(capsys):
    """On a terminal the bars draw and no line is written; off it, the lines; disabled, nothing."""
    lines = runs.ProgressLines("run lens", total=3, complete=1, enabled=True)
    lines.begin("T2I Lens")
    lines.chunk("a", 2, 4)
    lines.task_done("a")
    lines.task_done("b")
    lines.end()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "run lens: T2I Lens, 3 tasks: 1 complete (skipped), 2 to compute"
    assert err[1].startswith("run lens: task 2/3 (a): sweep 2/4 cells, ") and err[1].endswith(" left")
    assert err[2].startswith("run lens: task 2/3 done (a), ") and err[3].startswith("run lens: task 3/3 done (b), ")
    assert "left" not in err[3] and err[4].startswith("run lens: 3/3 tasks complete, 2 computed in ")
    runs.ProgressLines("quiet", total=2, enabled=False).begin()
    assert capsys.readouterr().err == ""
    assert runs.duration(42) == "42 s" and runs.duration(185) == "3 min 05 s" and runs.duration(3720) == "1 h 02 min"
    assert not runs.is_terminal(open(os.devnull, "w"))
