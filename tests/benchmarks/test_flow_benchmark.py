"""The attention-flow benchmark end to end at a tiny shape: memory from XLA's analysis, and the
timing path with its figures flagged (not a result)."""

from __future__ import annotations

import json

import pytest

from benchmarks import flow


@pytest.mark.slow  # three compiles and runs: about a minute on a loaded 2-core machine
def test_flow_benchmark_runs(tmp_path):
    stem = tmp_path / "flow"
    assert flow.main(["--memory", "--speed", "--hidden", "64", "--heads", "1", "--text", "8", "--image", "2", "2",
                      "--ref", "2", "2", "--reps", "1", "--allow-busy", "--wait-quiet", "0", "--out", str(stem)]) == 0
    record = json.loads(stem.with_suffix(".json").read_text())
    assert set(record["memory"]) == set(record["speed"]) == {"plain", "flow", "flow + carried + maps"}
    assert record["memory"]["plain"]["temp_ratio"] == 1.0 and record["memory"]["flow"]["temp"] > 0
    assert record["memory"]["flow + carried + maps"]["output"] > record["memory"]["plain"]["output"]
    assert all(s["median_s"] > 0 for s in record["speed"].values())
    assert record["config"]["tokens"]["total"] == 16
    assert "benchmarks.flow --memory --speed" in stem.with_suffix(".md").read_text()
