"""The benchmarks' quiet-machine guard, fed fake load and CPU-time readings."""

from __future__ import annotations

import pytest

from benchmarks import common


class FakeMachine:
    """A clock, this process's CPU time and the machine's busy time, advanced by the fake calls."""

    def __init__(self, load=0.1):
        self.load, self.now, self.own, self.busy = load, 0.0, 0.0, 0.0

    def guard(self, **kw):
        return common.LoadGuard(cpu_count=2, read_load=lambda: self.load, read_system_busy=lambda: self.busy,
                                read_own=lambda: self.own, clock=lambda: self.now, sleep=self.wait, **kw)

    def wait(self, s):
        self.now += s
        self.load = max(0.0, self.load - 1.0)  # the load decays while we wait

    def call(self, wall, own, others):
        def run():
            self.now += wall
            self.own += own
            self.busy += own + others
        return run


def test_quiet_machine_is_recorded():
    m = FakeMachine(load=0.2)
    g = m.guard()
    assert g.wait_quiet() == 0.2
    times = common.alternate({"a": m.call(1.0, 1.9, 0.05), "b": m.call(2.0, 3.8, 0.1)}, reps=3, guard=g)
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3}
    v = g.enforce()
    assert v["quiet"] and v["reasons"] == [] and common.busy_banner(v) == ""
    assert v["sides"]["a"]["calls"] == 3 and v["sides"]["a"]["own_cpu_per_wall_s"] == pytest.approx(1.9)
    assert v["sides"]["b"]["others_share"] == pytest.approx(0.1 / 4)


def test_high_load_before_the_run_refuses():
    m = FakeMachine(load=6.0)
    g = m.guard()
    assert g.wait_quiet(timeout_s=2, poll_s=1) == 4.0  # waited 2 s, the load fell by 2 and stayed high
    g.measure("a", m.call(1.0, 2.0, 0.0))
    with pytest.raises(common.MachineBusy, match="load average 4.00 before the run"):
        g.enforce()
    v = g.enforce(allow_busy=True)
    assert not v["quiet"] and "NOT A RESULT" in common.busy_banner(v)


def test_waiting_for_the_load_to_fall():
    m = FakeMachine(load=3.0)
    g = m.guard()
    assert g.wait_quiet(timeout_s=60, poll_s=5) == 0.0 and m.now == 15.0


def test_others_taking_cpu_during_one_side_refuses():
    m = FakeMachine()
    g = m.guard()
    g.wait_quiet()
    common.alternate({"fluxjax": m.call(1.0, 2.0, 0.0), "torch": m.call(1.0, 1.0, 1.0)}, reps=2, guard=g)
    v = g.verdict()
    assert not v["quiet"] and len(v["reasons"]) == 1 and "'torch'" in v["reasons"][0]
    assert v["sides"]["torch"]["others_share"] == pytest.approx(0.5)
    with pytest.raises(common.MachineBusy, match="50 %"):
        g.enforce()


def test_unchecked_load_is_not_quiet():
    m = FakeMachine()
    g = m.guard()
    g.measure("a", m.call(1.0, 1.0, 0.0))
    assert not g.verdict()["quiet"]


def test_real_readers_work_here():
    g = common.LoadGuard()
    g.wait_quiet()
    wall, out = g.measure("sum", lambda: sum(range(10000)))
    assert out == sum(range(10000)) and wall >= 0
    side = g.verdict()["sides"]["sum"]
    assert side["calls"] == 1 and side["others_share"] >= 0


def test_components_benchmark_runs_and_reads_xla_dot_types(tmp_path):
    """The per-component benchmark end to end at a tiny shape (figures flagged, not a result), and
    its reading of the element type XLA:CPU computes a bf16 dot in."""
    import json

    from benchmarks import components

    stem = tmp_path / "components"
    assert components.main(["--hidden", "64", "--heads", "1", "--text", "8", "--image", "8", "--ref", "8",
                            "--layers", "2", "--reps", "1", "--allow-busy", "--wait-quiet", "0", "--out", str(stem)]) == 0
    record = json.loads(stem.with_suffix(".json").read_text())
    components_seen = {r["component"] for r in record["rows"]}
    assert {"dense fp32", "dense bf16", "attention", "elementwise"} <= components_seen
    assert all(r["median_s"] > 0 for r in record["rows"])
    types = record["notes"]["bf16 dot element types in XLA:CPU's optimised program"]
    assert types and set(types) <= {"bf16", "f32"}
    assert components.bf16_dot_types("%d = f32[4,8]{1,0} dot(%a, %b)\n%e = bf16[2]{0} dot(%c, %d)") == {"bf16": 1, "f32": 1}
