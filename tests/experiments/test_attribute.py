"""experiments.attribute: the rank figures, the cells it checks, the differentiable colour metric,
and the command on a committed organism (slow)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import attribute


def test_ranks_and_spearman():
    assert attribute.ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert attribute.spearman(x, x ** 3) == pytest.approx(1.0)
    assert attribute.spearman(x, -x) == pytest.approx(-1.0)
    # ranks (1 4 2 5 3) vs (5 4 1 3 2): d^2 = 16 + 0 + 1 + 4 + 1 = 22, rho = 1 - 6 * 22 / (5 * 24) = -0.1
    assert attribute.spearman(x, np.array([5.0, 4.0, 1.0, 3.0, 2.0])) == pytest.approx(-0.1)
    assert attribute.spearman(x[:2], x[:2]) is None and attribute.spearman(x, np.ones(5)) is None


def test_top_overlap_and_checked_cells():
    exact = np.array([9.0, -8.0, 0.1, 7.0, 0.2, 6.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    estimate = np.array([1.0, 0.0, 0.0, 0.9, 0.0, 0.0, -0.8, 0.0, 0.0, 0.0, 0.0, 0.0])  # finds 0, 3, 6 of 0 1 3 5 6
    assert attribute.top_overlap(estimate, exact, 5, 3) == 3
    assert attribute.top_overlap(exact, exact) == 5
    picked = attribute.checked_cells(estimate, False, top_k=3, control=4)
    assert picked["top"] == [0, 3, 6]
    assert len(picked["control"]) == 4 and not set(picked["control"]) & {0, 3, 6}
    assert picked == attribute.checked_cells(estimate, False, top_k=3, control=4)  # seeded
    assert attribute.checked_cells(estimate, True, 3, 4) == {"all": list(range(12))}


def test_colour_metric_is_the_distance_of_the_objects_mean_colour():
    pixels = np.full((1, 4, 4, 3), -1.0, np.float32)  # black background
    pixels[0, 1:3, 1:3] = [1.0, 0.0, -1.0]  # an orange object: (255, 127.5, 0)
    foreground = np.zeros((4, 4), bool)
    foreground[1:3, 1:3] = True
    m = attribute.colour_metric(lambda x: x, foreground, (255.0, 127.5, 40.0))
    assert float(m(jnp.asarray(pixels))) == pytest.approx(40.0, rel=1e-5)
    grad = np.asarray(jax.grad(m)(jnp.asarray(pixels)))
    assert np.all(grad[0, 0] == 0)  # the background does not count
    assert grad[0, 1, 1, 2] == pytest.approx(-127.5 / 4, rel=1e-4)  # d|mean - c|/d mean_blue = -1, d mean/dx = 127.5 / 4


@pytest.mark.slow
def test_command_on_an_organism(tmp_path, monkeypatch):
    """One sampler step of the text-routed organism: every kind and method, the top 3 and 3 control
    cells run exactly; its trained cuts are no cells. The output folder given relative to the working
    directory, as on a command line."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "attr"
    assert attribute.main(["--model", "text-routed", "--steps", "1", "--top-k", "3", "--control", "3",
                           "--ig-points", "2", "--attn-impl", "xla", "--out", "attr"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["kinds"]) == {"patches", "edges"}
    assert set(summary["kinds"]["patches"]["methods"]) == {"atp", "ig"}
    assert set(summary["kinds"]["edges"]["methods"]) == {"atp", "fix"}
    assert summary["kinds"]["patches"]["cells"] == 32 * 6
    assert summary["kinds"]["edges"]["cells"] == 6 * (16 - 2)  # ref->image and ref->text[content] are cut
    cells = (out / "cells.csv").read_text()
    assert "ref[0]->image" not in cells and "ref[0]->text[content]" not in cells
    assert (out / "scatter-edges.png").stat().st_size > 0 and (out / "report.html").exists()


@pytest.mark.slow
def test_docs_attribution_commands(tmp_path):
    """docs/attribution.md's commands as written, shrunk to one sampler step, the top 3 and 3 control
    cells (--exact all -> --exact sample), no wait for a quiet machine, and an output folder in
    tmp_path."""
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "docs" / "attribution.md").read_text()
    block = re.search(r"^```sh\n(.*?)^```", text, re.S | re.M).group(1)
    commands = [line for line in block.splitlines() if line.startswith("python -m experiments.attribute")]
    assert len(commands) >= 2
    for i, command in enumerate(commands):
        args = shlex.split(command.replace("--exact all", "--exact sample"))[3:]
        if "--wait-quiet" in args:  # the timing command: timed at tiny size, without waiting for a quiet machine
            at = args.index("--wait-quiet")
            del args[at:at + 2]
        args = [a for a in args if a != "--out"] if "--out" not in args else args[:args.index("--out")] + \
            args[args.index("--out") + 2:]
        args += ["--steps", "1", "--top-k", "3", "--control", "3", "--ig-points", "2", "--out", str(tmp_path / str(i))]
        subprocess.run([sys.executable, "-m", "experiments.attribute", *args], cwd=repo, check=True)
        assert json.loads((tmp_path / str(i) / "summary.json").read_text())["kinds"]
