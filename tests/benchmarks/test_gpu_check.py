"""The GPU commands A (`benchmarks.gpu_check`) and B (`benchmarks.gpu_rehearsal`) rehearsed on CPU
with `--tiny`: end to end (slow set), killed part way (their finished rows stay), out of budget
(steps skipped, said so), and the memory plan of both at klein-9B size (`benchmarks.gpu_plan`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import common, gpu_check, gpu_plan, gpu_rehearsal

REPO = Path(__file__).resolve().parents[2]
# float32 and shared weights: fluxjax and diffusers differ by float32 rounding orders only (7.6e-7
# to 1.1e-6 measured on the tiny model; the timestep sinusoid's floor, 5e-5, bounds it).
TINY_PARITY = 5e-5
# The sweep's no-cut cell runs the key-group attention path with an all-allowed table, the plain
# edit the plain path: the same softmax summed per segment, float32 rounding (1.1e-7 measured).
TINY_PATHS = 1e-5


def _steps(rows):
    return [r["step"] for r in rows]


@pytest.mark.slow
def test_command_a_end_to_end(tmp_path):
    rows = gpu_check.main(["--tiny", "--reps", "1", "--out", str(tmp_path)])
    assert rows == common.read_rows(tmp_path / "gpu_check.jsonl")
    assert _steps(rows) == ["setup", "weights", "weights", "compile", "compile", "parity", "parity", "parity",
                            "released", "compile", "compile", "steady", "sweep", "done"]
    parity = {r["forward"]: r["rel_l2"] for r in rows if r["step"] == "parity"}
    assert len(parity) == 3 and all(v <= TINY_PARITY for v in parity.values()), parity
    forwards = next(r for r in rows if r["step"] == "steady")["forwards"]
    assert len(forwards) == 4 and all(f["median_s"] > 0 and f["temp_bytes"] > 0 for f in forwards.values())
    sweep = next(r for r in rows if r["step"] == "sweep")
    assert sweep["no_cut_cell_vs_plain_edit"] <= TINY_PATHS < sweep["cells_differ"]
    assert rows[-1]["seconds"] < gpu_check.BUDGET_S  # the tiny rehearsal fits the command's budget
    assert "total" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_command_b_end_to_end(tmp_path):
    rows = gpu_rehearsal.main(["--tiny", "--diffusers-cells", "4", "--out", str(tmp_path)])
    assert rows == common.read_rows(tmp_path / "gpu_rehearsal.jsonl")
    cells = len(rows[0]["cells"])
    assert cells == 12
    by = lambda command, step: [r for r in rows if r["command"] == command and r["step"] == step]  # noqa: E731
    assert len(by("B/fluxjax", "sample")) == 3  # the task's baselines: edit, t2i, next-seed t2i
    sweeps = by("B/fluxjax", "sweep call")
    assert [r["cells"] for r in sweeps] == [4, 4, 4] and all(r["seconds"] > 0 for r in sweeps)
    assert by("B/fluxjax", "fluxjax")[0]["cells"] == cells
    assert len(by("B/diffusers", "pipeline call")) == 1 + 4  # a warm-up, then one call per cell asked for
    assert [r["exit_status"] for r in by("B", "process")] == [0, 0]
    done = rows[-1]
    assert by("B/diffusers", "diffusers")[0]["cells"] == 4
    assert done["step"] == "done" and done["cells"] == cells and done["ratio"] > 0  # 4 calls' median x 12 cells
    assert done["seconds"] < gpu_rehearsal.BUDGET_S
    assert len(list((tmp_path / "run").rglob("knockout/**/*.png"))) >= cells  # the cells' images


def _kill_when(command: str, out: Path, step: str, timeout_s: float = 240):
    """Start `python -m benchmarks.<command> --tiny` in its own process group, kill the group the
    moment a row `step` is in its file, and return the rows read afterwards."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{command}", "--tiny", "--out", str(out)], cwd=REPO,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = out / f"{command}.jsonl"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and any(json.loads(line)["step"] == step for line in path.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line whole


@pytest.mark.parametrize("command, step, prefix", [
    ("gpu_check", "weights", ["setup", "weights"]),
    ("gpu_rehearsal", "text encoder", ["setup", "text encoder"]),
], ids=["A", "B"])
def test_killed_command_keeps_its_finished_rows(tmp_path, command, step, prefix):
    rows = _kill_when(command, tmp_path, step)
    assert _steps(rows)[:len(prefix)] == prefix and "done" not in _steps(rows)
    module = gpu_check if command == "gpu_check" else gpu_rehearsal
    assert "did not finish" in module.summary(rows)


def test_out_of_budget_steps_are_skipped_and_said(tmp_path):
    rows = gpu_check.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path / "a")])
    assert _steps(rows) == ["setup", "weights", "done"] and "skipped" in rows[1]
    rows = gpu_rehearsal.main(["--tiny", "--budget-s", "0", "--out", str(tmp_path / "b")])
    assert _steps(rows) == ["setup", "fluxjax", "diffusers", "done"] and all("skipped" in r for r in rows[1:3])
    assert "skipped" in (tmp_path / "b" / "gpu_rehearsal.md").read_text()


def test_memory_plan_at_klein_9b_fits():
    """The committed plan (`python -m benchmarks.gpu_plan`): every phase of both commands under the limit."""
    record = json.loads((REPO / "benchmarks" / "results" / "gpu_plan.json").read_text())
    assert record["shapes"] == "klein-9B"
    assert {(p["command"], p["phase"]) for p in record["phases"]} == {
        (p["command"], p["phase"]) for p in gpu_plan.phases(gpu_plan.gpu_models.KLEIN_9B, record["weights"],
                                                             record["programs"], record["chunk"], record["cells"])}
    assert all(p["total"] < gpu_plan.LIMIT_GIB * gpu_plan.GIB for p in record["phases"])


@pytest.mark.slow
def test_memory_plan_tiny(tmp_path):
    record = gpu_plan.main(["--tiny", "--out", str(tmp_path / "plan")])
    assert all(v["temp"] > 0 for v in record["programs"].values())
    assert (tmp_path / "plan.md").exists()
