"""experiments.collect and its store: what it writes is what a forward captures, bit for bit; an
interrupted collection resumes to the same bytes; the store opens with TensorStore alone."""

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

from experiments import collect
from experiments import store as storelib

REPO = Path(__file__).resolve().parents[2]
STEPS = (0, 7)  # of the organism's 8
ARGS = ["--model", "text-routed", "--colours", "red,blue,green", "--objects", "circle", "--seeds", "0", "--chunk-tasks",
        "2", "--blocks", "1,4", "--kinds", "text.output,image.attn_out", "--sites", "embed.text.output",
        "--keep-steps", ",".join(map(str, STEPS)), "--no-progress"]
SITES = ["b1.text.output", "b1.image.attn_out", "b4.text.output", "b4.image.attn_out", "embed.text.output"]


def arrays(path: Path) -> dict[str, np.ndarray]:
    store = storelib.Store(path)
    return {name: store.read(name) for name in [*store.sites, storelib.TEXT_CONTENT, storelib.WRITTEN]}


def assert_same_bytes(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """An undisturbed collection: 3 tasks of the text-routed organism, chunks of 2 and 1."""
    out = tmp_path_factory.mktemp("collect") / "run"
    assert collect.main([*ARGS, "--out", str(out)]) == 0
    return out


def test_store_equals_the_captures_of_a_direct_forward(collected):
    import fluxjax
    from experiments import load_model, tasks as tasklib

    store = storelib.Store(collected / "collect.zarr")
    assert store.sites == SITES and store.steps == list(STEPS) and store.written().all()
    assert [c.start for c in store.chunks()] == [0, 2]
    model = load_model("text-routed")
    found = tasklib.read_tasks(collected / "tasks" / "tasks.jsonl")
    assert [t.task_id for t in found] == store.tasks
    content = store.text_content()
    for i, task in enumerate(found):
        edit = model.prepare(task.instruction, task.reference, seed=task.seed, height=task.height, width=task.width)
        caps = model.edit(edit, capture=fluxjax.Capture(sites=tuple(SITES))).captures
        for site in SITES:
            expected = np.asarray(caps[site])[list(STEPS), 0]
            got = store.read(site, [i])[0]
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (task.task_id, site)
        np.testing.assert_array_equal(content[i], np.asarray(edit.content_mask)[0])
    labels = store.attrs["labels"]
    assert labels["solid_red_circle_s0"]["colour"] == "red" and len(labels["solid_red_circle_s0"]["lab"]) == 3
    assert store.attrs["tokens"] == {"text": 32, "image": 64, "reference": 64}


def test_store_opens_with_plain_tensorstore(collected, tmp_path):
    """A reader with json, numpy and tensorstore alone (no fluxjax, no jax) gets the same arrays."""
    script = """
import json, sys
import numpy as np, tensorstore as ts
root = sys.argv[1]
attrs = json.load(open(f"{root}/.zattrs"))
out = {}
for name in attrs["sites"] + ["text_content", "written"]:
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": f"{root}/{name}"}}).result()
    out[name] = array.read().result()
np.savez(sys.argv[2], **out)
assert not [m for m in sys.modules if m.split(".")[0] in ("fluxjax", "jax", "experiments")]
print(len(attrs["tasks"]), attrs["steps"], attrs["format"])
"""
    saved = tmp_path / "plain.npz"
    done = subprocess.run([sys.executable, "-c", script, str(collected / "collect.zarr"), str(saved)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "[0,", "7]", "fluxjax-activations"]
    plain = dict(np.load(saved))
    assert_same_bytes(plain, arrays(collected / "collect.zarr"))


def test_interrupted_collection_resumes_to_the_same_bytes(collected, tmp_path, monkeypatch, capsys):
    """Stopped in the second chunk after one of its arrays is written: that chunk stays unwritten,
    and the rerun computes it alone, ending with the undisturbed collection's bytes."""
    out = tmp_path / "run"
    write = storelib.Store.write_chunk

    def stop_in_chunk_1(self, index, values, content):
        if index == 1:
            first = self.sites[0]
            self.array(first)[2:3].write(values[first]).result()
            raise KeyboardInterrupt("stopped mid-chunk")
        return write(self, index, values, content)

    monkeypatch.setattr(storelib.Store, "write_chunk", stop_in_chunk_1)
    with pytest.raises(KeyboardInterrupt):
        collect.main([*ARGS, "--out", str(out)])
    assert storelib.Store(out / "collect.zarr").written().tolist() == [True, True, False]
    assert (out / "outputs" / "collect" / "chunk-00000" / "DONE.json").exists()
    assert not (out / "outputs" / "collect" / "chunk-00001" / "DONE.json").exists()
    monkeypatch.setattr(storelib.Store, "write_chunk", write)
    capsys.readouterr()
    assert collect.main([*ARGS, "--out", str(out)]) == 0
    assert "1 cells skipped (complete and intact), 0 repaired (damaged, computed again), 1 computed" in \
        capsys.readouterr().out
    assert_same_bytes(arrays(out / "collect.zarr"), arrays(collected / "collect.zarr"))


def test_store_refuses_another_collection(tmp_path):
    layout = dict(tasks=["a", "b"], sites={"b0.text.output": (4, 3)}, steps=[0], dtype=np.float32, text_tokens=4,
                  chunk_tasks=1, attrs={"labels": {}})
    storelib.create(tmp_path / "s", **layout)
    storelib.create(tmp_path / "s", **layout)  # the same layout opens
    with pytest.raises(ValueError, match="another collection.*sites"):
        storelib.create(tmp_path / "s", **{**layout, "sites": {"b1.text.output": (4, 3)}})
    with pytest.raises(ValueError, match="lacks the sites"):
        storelib.Store(tmp_path / "s").write_chunk(0, {}, np.zeros((1, 4), bool))


def test_collect_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        collect.main(["--model", "text-routed", "--blocks", "9", "--out", str(tmp_path / "x"), "--check"])
    assert stopped.value.code == 2 and "--blocks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        collect.main(["--model", "text-routed", "--no-reference", "--kinds", "reference.output", "--check",
                      "--out", str(tmp_path / "x")])
    assert "no reference stream" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_collection_resumes_to_an_undisturbed_one(tmp_path):
    """A real SIGKILL of `python -m experiments.collect` after its first chunk; the same command run
    again finishes the store, equal bit for bit to an undisturbed collection's."""
    args = [sys.executable, "-m", "experiments.collect", *ARGS[:-1], "--chunk-tasks", "1", "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "outputs" / "collect" / "chunk-00000" / "DONE.json"
    deadline = time.monotonic() + 600
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert first.exists() and killed.returncode == -signal.SIGKILL
    written = storelib.Store(tmp_path / "killed" / "collect.zarr").written()
    assert written[0] and not written.all()
    again = subprocess.run([*args, "--out", str(tmp_path / "killed")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "cells skipped" in again.stdout and " 0 cells skipped" not in again.stdout
    assert_same_bytes(arrays(tmp_path / "killed" / "collect.zarr"), arrays(tmp_path / "whole" / "collect.zarr"))
    assert json.loads((tmp_path / "killed" / "collect.zarr" / ".zattrs").read_text()) == \
        json.loads((tmp_path / "whole" / "collect.zarr" / ".zattrs").read_text())


def test_run_all_plans_the_probes(capsys):
    from experiments import run_all

    assert run_all.main(["--model", "text-routed", "--probe", "--plan"]) == 0
    assert "  probe: 8 tasks collected with and without the reference" in capsys.readouterr().out
    assert run_all.probe_plan(type("C", (), {"num_blocks": 3})(), "organism")["collect_t2i"] == {
        "sites": ["b0.text.output", "b1.text.output", "b2.text.output"], "keep_steps": "all", "chunk_tasks": 16,
        "knockout": None, "knockout_layers": "all", "reference": False}


@pytest.mark.slow
def test_run_all_probe_adds_the_probes_to_the_main_job(tmp_path):
    from experiments import run_all

    out = tmp_path / "main"
    assert run_all.main(["--model", "text-routed", "--blocks", "0,3", "--colours", "red,blue", "--objects", "circle",
                         "--seeds", "0,1", "--probe", "--no-progress", "--out", str(out)]) == 0
    assert storelib.Store(out / "collect.zarr").written().all() and storelib.Store(out / "collect-t2i.zarr").written().all()
    assert "Linear probes of the reference colour" in (out / "report.html").read_text()
    assert (out / "probe.csv").is_file() and (out / "plots" / "probe-edit-groups-step0.png").is_file()
