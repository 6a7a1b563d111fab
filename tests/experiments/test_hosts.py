"""Sweeps over several devices and several processes (experiments.hosts) give the outputs of one
device in one process.

Every run here is the knockout experiment on the committed `direct` organism (ARGS: 6 tasks, 2
edges x 2 layer modes = 4 swept cells a task, one denoising step), started as its own process:
this module run as a script (`worker`, the `__main__` block at the bottom) calls the command's
`main` and records, beside the run folder, the cells this process finished and the devices of
each vmapped sweep call. Several processes are several such workers joined by JAX's distributed
runtime on a localhost coordinator (`benchmarks.processes.launch`; CPU collectives over gloo).

The reference is one process on one CPU device. "The same outputs" is byte for byte: every file
of the cells, the grids, plots and tables (`benchmarks.processes.outputs`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.processes import launch, outputs, wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (this module runs as a worker too)
from testenv import host_devices  # noqa: E402

ARGS = ["knockout", "--model", "direct", "--colours", "red,blue,green", "--objects", "circle,triangle",
        "--seeds", "0", "--settings", "ref->image", "ref->text", "--layers", "all", ":2", "--steps", "1",
        "--chunk", "1", "--no-progress"]
TASKS = 6
SWEPT = 4  # cells of each task's knockout sweep
RUN_TIMEOUT_S = 600
ONE_DEVICE = host_devices(1)
TWO_DEVICES = host_devices(2)
FOUR_DEVICES = host_devices(4)
PAUSE_ENV = "FLUXJAX_TEST_PAUSE_AFTER_CELL"  # seconds a worker sleeps after finishing each cell
PIXEL_TOL = 1  # of 255: fsdp-split matmuls sum in another order, so an occasional pixel rounds one level away
SHARDED_TOL = 1e-6  # fp32: the fsdp-split matmuls sum in another order; test_sharding measured ~5e-7 in one process
WORKER = [sys.executable, os.path.abspath(__file__), "worker"]


def run_one(folder: Path, *extra: str, env=ONE_DEVICE) -> subprocess.Popen:
    """One worker process (no distributed runtime) running ARGS into `folder`."""
    log = folder.parent / f"{folder.name}.log"
    return subprocess.Popen([*WORKER, *ARGS, *extra, "--out", str(folder)], env={**os.environ, **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(procs, folder: Path, timeout=RUN_TIMEOUT_S) -> list[int]:
    codes = wait(procs, timeout)
    logs = sorted(folder.parent.glob(f"{folder.name}*.log")) + sorted((folder.parent / f"{folder.name}.logs").glob("*"))
    assert codes == [0] * len(procs), (codes, "".join(p.read_text()[-3000:] for p in logs))
    return codes


def records(folder: Path) -> list[dict]:
    """What each worker that ran to its end recorded (`worker`), by process index."""
    found = [json.loads(p.read_text()) for p in folder.parent.glob(f"{folder.name}.process-*.json")]
    return sorted(found, key=lambda r: r["process"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("reference") / "run"
    finish([run_one(folder)], folder)
    return outputs(folder)


# ---------------------------------------------------------------------------------------------
# the pieces, in this process


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_cells_are_dealt_out_in_order_evenly_and_each_to_one_process(n):
    from experiments.hosts import Hosts

    keys = [f"knockout/task{i}" for i in range(13)]
    shares = [Hosts(index=i, count=n).share(keys) for i in range(n)]
    assert sorted(k for share in shares for k in share) == sorted(keys)  # each key to exactly one process
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(share == [k for k in keys if k in share] for share in shares)  # in the sweep's order
    assert Hosts(index=1, count=n, sharded=True).share(keys) == keys  # one sharded model: every process, every cell


def test_a_call_holds_chunk_cells_per_replica():
    from experiments.sweep import call_size

    assert call_size(10, 2) == 2 and call_size(10, None) == 10 and call_size(1, 4) == 1
    assert call_size(10, 2, replicas=4) == 8  # two cells on each of four replicas
    assert call_size(4, 2, replicas=4) == 4  # never more per replica than the sweep needs
    assert call_size(5, None, replicas=4) == 8  # a whole sweep: two per replica, the last call padded


def test_a_joined_run_folder_writes_cells_but_not_the_runs_own_files(tmp_path):
    from experiments import runs

    config = {"experiment": "knockout", "x": 1}
    first = runs.open_run(tmp_path, "run", config)
    joined = runs.join_run(first.path, config)
    assert (first.path / runs.LOCK_FILE).is_file() and joined.writes_cells and not joined.writes_run_files
    cell = joined.cell("knockout/a")
    cell.write_json("row.json", {"v": 1})
    joined.finish(cell, {"rows": []})
    assert first.intact("knockout/a")  # a cell another process wrote is a cell like any other
    assert joined.write_derived("knockout-metrics.csv", "a,b\n") == first.path / "knockout-metrics.csv"
    joined.mark_finished()
    assert not (first.path / "knockout-metrics.csv").exists() and not (first.path / runs.FINISHED_FILE).exists()
    follower = runs.join_run(first.path, config, write_cells=False)  # one sharded model: process 0 writes
    assert follower.cell("knockout/b").write_image("x.png", np.zeros((2, 2, 3), np.uint8)).name == "x.png"
    assert not (first.path / "outputs" / "knockout" / "b").exists()
    follower.cell("knockout/a").write_image("late.png", np.zeros((2, 2, 3), np.uint8))  # written meanwhile: no refusal
    assert not (first.path / "outputs" / "knockout" / "a" / "late.png").exists()
    first.adopt(["knockout/a", "knockout/b"])  # the complete one among them counts as checked
    first.mark_finished()
    assert json.loads((first.path / runs.FINISHED_FILE).read_text())["cells"] == ["knockout/a"]
    with pytest.raises(runs.RunError, match="another config"):
        runs.join_run(first.path, {**config, "x": 2})
    first.close()


def test_process_options_are_checked_before_anything_starts():
    import argparse

    from experiments import hosts

    parser = argparse.ArgumentParser()
    hosts.add_arguments(parser)
    assert hosts.check_arguments(parser.parse_args([])) == []
    assert hosts.check_arguments(parser.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id",
                                                    "1", "--fsdp", "2", "--devices", "4"])) == []
    problems = hosts.check_arguments(parser.parse_args(["--num-processes", "2", "--fsdp", "0", "--devices", "0"]))
    assert len(problems) == 3 and "go together" in problems[2]
    assert "give 0..1" in hosts.check_arguments(parser.parse_args(
        ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"]))[0]


def test_placing_and_gathering_on_a_mesh_of_this_process():
    import jax

    from experiments import hosts
    from fluxjax import sharding

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    mesh = sharding.global_mesh(data=1)  # one process: its own devices
    placed = sharding.put({"a": x, "b": x[0]}, sharding.replicated(mesh))
    assert isinstance(placed["a"], jax.Array) and placed["a"].sharding == sharding.replicated(mesh)
    back = sharding.to_host(placed)
    assert isinstance(back["a"], np.ndarray) and np.array_equal(back["a"], x) and np.array_equal(back["b"], x[0])
    with pytest.raises(ValueError, match="mesh needs"):
        sharding.global_mesh(data=2, fsdp=3)
    assert hosts.placement(object(), hosts.Hosts()) is None  # one device: the plain single-device path


@pytest.mark.slow
def test_the_chunk_that_fits_is_the_same_on_a_one_device_placement():
    """The memory plan read through a placement (what a multi-device run reads) is the plain one on one device."""
    import argparse
    import dataclasses

    from experiments import models, sweep
    from experiments.sweep import AutoChunk, Placement
    from fluxjax import sharding
    from fluxjax.interventions import Interventions, knockout

    model = models.load(argparse.Namespace(model="direct", dtype=None, cache=None, no_progress=True))[0]
    edit = sweep.prepare(model, model.encode_prompts(["draw a circle in this color"]), seed=0,
                         height=32, width=32)
    cells = [Interventions(knockout=knockout(model.config, edit.layout, edit.content_mask, ["text->image"],
                                             range(k, model.config.num_blocks), allow_empty=True)) for k in range(6)]
    mesh = sharding.make_mesh(data=1, fsdp=1)
    placement = Placement(mesh=mesh, params=sharding.put_params(model.params, mesh))
    options = dataclasses.replace(model.options, num_steps=1)
    free = 3 << 20  # between the plans of one cell (about 1.9 MiB) and of six
    plain = sweep.fitting_chunk(model, edit, options, cells, AutoChunk(fallback=1), free_bytes=free)
    placed = sweep.fitting_chunk(model, edit, options, cells, AutoChunk(fallback=1), free_bytes=free,
                                 placement=placement)
    assert placed == plain and 1 < plain < len(cells)


# ---------------------------------------------------------------------------------------------
# several devices in one process


@pytest.mark.slow
def test_four_local_devices_give_the_outputs_of_one_with_the_same_chunk_per_device(tmp_path, reference):
    one, four = tmp_path / "one", tmp_path / "four"
    finish([run_one(one, "--devices", "1", env=FOUR_DEVICES), run_one(four, env=FOUR_DEVICES)], one)
    assert outputs(one) == outputs(four) == reference
    [single], [spread] = records(one), records(four)
    # One device: a call per swept cell. Four: one call for a task's four cells, one on each device.
    assert [c["devices"] for c in single["calls"]] == [[0]] * (TASKS * SWEPT)
    assert [c["devices"] for c in spread["calls"]] == [[0, 1, 2, 3]] * TASKS
    assert all(sorted(c["shards"]) == [[1, 1, *c["shape"][2:]]] * 4 for c in spread["calls"])


REPLICAS = """
import argparse, jax
from experiments import hosts, models
model = models.load(argparse.Namespace(model="direct", dtype=None, cache=None, no_progress=True))[0]
placement = hosts.placement(model, hosts.Hosts())
own, placed = model.params.img_in, placement.params.img_in
print(len(placed.sharding.device_set), own.unsafe_buffer_pointer() == next(
    s.data.unsafe_buffer_pointer() for s in placed.addressable_shards if s.device in own.devices()))
"""


@pytest.mark.slow
def test_whole_replicas_reuse_the_models_own_arrays_on_their_device():
    """Four devices, one model each: the model's arrays are the replica of their device (no second copy there)."""
    done = subprocess.run([sys.executable, "-c", REPLICAS], env={**os.environ, **FOUR_DEVICES}, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.stdout.split() == ["4", "True"], done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# several processes, one run folder


@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_processes_split_the_cells_and_write_the_outputs_of_one_process(tmp_path, reference, n):
    folder = tmp_path / "run"
    finish(launch([*ARGS, "--out", str(folder)], n, env=ONE_DEVICE, logs=tmp_path / "run.logs",
                  python=[*WORKER]), folder)
    assert outputs(folder) == reference
    done = records(folder)
    assert [r["process"] for r in done] == list(range(n))
    cells = [set(r["finished"]) for r in done]
    every = {f"{prefix}/{p.name}" for prefix in ("baselines", "knockout")
             for p in (folder / "outputs" / prefix).iterdir()}
    assert len(every) == 2 * TASKS and set().union(*cells) == every  # every cell by some process ...
    assert sum(map(len, cells)) == len(every)  # ... and by one only
    for prefix in ("baselines", "knockout"):  # dealt out evenly: counts within one of each other
        counts = [sum(k.startswith(prefix + "/") for k in c) for c in cells]
        assert max(counts) - min(counts) <= 1 and sum(counts) == TASKS, counts
    run = json.loads((folder / "finished.json").read_text())
    assert sorted(run["cells"]) == sorted(every)  # process 0 records every process's cells
    summary = json.loads((folder / "summary.json").read_text())  # and counts them
    assert summary["cells"] == {"skipped": 0, "repaired": 0, "computed": len(every)}


@pytest.mark.slow
def test_a_killed_process_leaves_finished_cells_and_a_rerun_completes_the_folder(tmp_path, reference):
    folder = tmp_path / "run"
    procs = launch([*ARGS, "--out", str(folder)], 2, env={**ONE_DEVICE, PAUSE_ENV: "2"}, heartbeat_timeout=5,
                   logs=tmp_path / "first.logs", python=[*WORKER])
    try:
        tasks = _wait_for(lambda: _task_ids(folder), procs)
        first = folder / "outputs" / "baselines" / tasks[1] / "DONE.json"  # dealt to process 1
        _wait_for(first.is_file, procs)
        procs[1].send_signal(signal.SIGKILL)
        codes = wait(procs, RUN_TIMEOUT_S)
    finally:
        for p in procs:
            p.kill()
    assert codes[1] == -signal.SIGKILL and codes[0] != 0  # the runtime stops process 0 when 1 is gone
    assert not (folder / "finished.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in folder.glob("outputs/*/*/DONE.json")}
    assert first in finished and len(finished) < 2 * TASKS  # killed mid-sweep

    finish(launch([*ARGS, "--out", str(folder)], 2, env=ONE_DEVICE, logs=tmp_path / "rerun.logs",
                  python=[*WORKER]), folder)
    assert outputs(folder) == reference
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished cells kept, not recomputed
    redone = set().union(*(r["finished"] for r in records(folder)))
    assert len(redone) == 2 * TASKS - len(finished)


def _task_ids(folder: Path) -> list[str] | None:
    try:
        return [json.loads(line)["task_id"] for line in (folder / "tasks" / "tasks.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None


def _wait_for(condition, procs, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a process ended early: {[p.poll() for p in procs]}")
        time.sleep(0.2)
    pytest.fail("timed out")


# ---------------------------------------------------------------------------------------------
# one model over the devices of several processes


def test_a_global_mesh_with_fsdp_across_two_processes_gives_the_one_process_forward(tmp_path):
    import jax

    procs = launch(["forward", str(tmp_path)], 2, env=TWO_DEVICES, logs=tmp_path / "logs", python=[*WORKER])
    assert wait(procs, RUN_TIMEOUT_S) == [0, 0], "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert jax.device_count() == 1
    want = _forward(*_forward_case())
    facts = [json.loads((tmp_path / f"forward-{i}.json").read_text()) for i in range(2)]
    for i, f in enumerate(facts):
        assert f["devices"] == 4 and f["processes"] == [0, 1]  # the mesh spans both processes
        assert f["local_shards"] == 2 and f["shard_out"] == f["out"] // 4  # each holds a quarter of qkv's out axis
        got = np.load(tmp_path / f"forward-{i}.npy")
        err = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))
        assert err <= SHARDED_TOL, err


def _forward_case():
    import jax

    import fluxjax

    from reference import TINY

    layout = fluxjax.TokenLayout(12, (3, 4), ((2, 3),))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(np.asarray, fluxjax.init_params(TINY, jax.random.key(0)))
    img = rng.standard_normal((4, layout.n_image_stream, TINY.in_channels)).astype(np.float32)
    txt = rng.standard_normal((4, layout.n_txt, TINY.context_in_dim)).astype(np.float32)
    t = rng.uniform(0.1, 1.0, 4).astype(np.float32)
    guidance = np.full(4, 3.5, np.float32)
    return params, layout, img, txt, t, guidance


def _forward(params, layout, img, txt, t, guidance):
    import jax

    import fluxjax

    from reference import TINY

    out, _ = jax.jit(fluxjax.forward, static_argnums=1)(params, TINY, img, txt, t, layout.img_ids(),
                                                        layout.txt_ids(), guidance)
    return out


@pytest.mark.slow
def test_one_model_sharded_over_two_processes_gives_the_outputs_of_one_process(tmp_path, reference):
    """--shard-model: a (data 1, fsdp 4) mesh over 2 processes x 2 devices, every cell computed by
    both together and written by process 0."""
    folder = tmp_path / "run"
    finish(launch([*ARGS, "--out", str(folder), "--shard-model", "--fsdp", "4"], 2, env=TWO_DEVICES,
                  logs=tmp_path / "run.logs", python=[*WORKER]), folder)
    got = outputs(folder)
    assert set(got) == set(reference)
    for name in (n for n in got if n.startswith("outputs/") and n.endswith(".png")):
        assert np.abs(_pixels(got[name]) - _pixels(reference[name])).max() <= PIXEL_TOL, name
    first, second = records(folder)
    assert len(first["finished"]) == 2 * TASKS and second["finished"] == []  # process 0 writes every cell
    assert all(len(c["devices"]) == 4 for c in first["calls"] + second["calls"])  # each call on all four devices
    assert len(first["calls"]) == len(second["calls"]) == TASKS * SWEPT  # one replica: a call per cell


def _pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# the worker processes


def worker(argv: list[str]) -> None:
    """argv: an experiment and its options (the command's own, plus those `launch` adds)."""
    import importlib

    import jax

    from experiments import runs, sweep

    finished, calls = [], []
    pause = float(os.environ.get(PAUSE_ENV, "0"))
    real_finish, real_many = runs.Cell.finish, sweep._sample_many

    def finish_cell(self, record=None):
        real_finish(self, record)
        finished.append(self.key)
        time.sleep(pause)

    def sample_many(*args, **kwargs):
        out = real_many(*args, **kwargs)
        calls.append({"devices": sorted(d.id for d in out.sharding.device_set), "shape": list(out.shape),
                      "shards": [list(s.data.shape) for s in out.addressable_shards]})
        return out

    runs.Cell.finish, sweep._sample_many = finish_cell, sample_many
    status = importlib.import_module(f"experiments.{argv[0]}").main(argv[1:])
    out = Path(argv[argv.index("--out") + 1])
    record = {"process": jax.process_index(), "status": status, "finished": finished, "calls": calls}
    out.parent.joinpath(f"{out.name}.process-{jax.process_index()}.json").write_text(json.dumps(record))


def forward_worker(out_dir: str, coordinator: str, n: int, index: int) -> None:
    """A (data 1, fsdp 4) global mesh over 2 processes x 2 devices: the forward, written by each process."""
    import jax

    jax.distributed.initialize(coordinator, num_processes=n, process_id=index)
    from fluxjax import sharding

    params, layout, img, txt, t, guidance = _forward_case()
    mesh = sharding.global_mesh(data=1, fsdp=jax.device_count())
    placed = sharding.put_params(params, mesh)
    qkv = placed.double_blocks.img_attn.qkv
    out = sharding.to_host(_forward(placed, layout, img, txt, t, guidance))
    np.save(os.path.join(out_dir, f"forward-{index}.npy"), out)
    devices = qkv.sharding.device_set
    facts = {"devices": len(devices), "processes": sorted({d.process_index for d in devices}),
             "local_shards": len(qkv.addressable_shards), "out": qkv.shape[-1],
             "shard_out": qkv.addressable_shards[0].data.shape[-1]}
    with open(os.path.join(out_dir, f"forward-{index}.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    if sys.argv[2] == "forward":  # worker forward DIR --coordinator ADDR --num-processes N --process-id I
        a = sys.argv[3:]
        forward_worker(a[0], a[a.index("--coordinator") + 1], int(a[a.index("--num-processes") + 1]),
                       int(a[a.index("--process-id") + 1]))
    else:
        worker(sys.argv[2:])
