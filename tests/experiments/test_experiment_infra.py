"""The experiments' infrastructure: tasks, run folders, metrics, grids and reports."""

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import grids, report, runs, tasks
from fluxjax import files, metrics

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# tasks


def _line(**fields) -> str:
    return json.dumps(fields)


def _write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def ref_folder(tmp_path):
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "refs" / "solid_red.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "photo.jpg")
    return tmp_path


def test_read_tasks_in_the_studys_format(ref_folder):
    study_line = _line(edit_type="customize", height=1024, instruction="draw a couch in this color",
                       metadata={}, noise_seed=1635624438, real_ref_dir="refs", real_ref_name="solid_red",
                       ref_seed=None, source="solid_color", source_caption=None, source_image_path=None,
                       task_id="solid_red_couch_s0", width=1024)
    minimal = _line(task_id="mine", instruction="make it blue", source_image_path="photo.jpg")
    generated = _line(task_id="gen", instruction="add a hat", edit_type="add", ref_seed=7,
                      source_caption="a dog", width=512, height=256, unknown_field=1)
    path = _write(ref_folder / "tasks.jsonl", [study_line, "", minimal, generated])
    couch, mine, gen = tasks.read_tasks(path)

    assert couch.reference == ref_folder / "refs" / "solid_red.png"  # name given without extension
    assert couch.seed == 1635624438 and couch.source == "solid_color" and couch.metadata == {}
    assert json.loads(study_line) == couch.to_json()  # the line round-trips exactly
    assert mine.reference == ref_folder / "photo.jpg"
    assert (mine.edit_type, mine.width, mine.height, mine.noise_seed) == ("customize", 1024, 1024, None)
    assert mine.seed == zlib.crc32(b"mine")
    assert gen.reference is None and (gen.ref_seed, gen.source_caption) == (7, "a dog")
    assert (gen.width, gen.height, gen.edit_type) == (512, 256, "add")


def test_noise_seed_default_is_the_studys_crc32():
    # noise seeds printed in the study's data/tasks/solid_color/tasks.jsonl
    assert tasks.default_noise_seed("solid_red_couch_s0") == 1635624438
    assert tasks.default_noise_seed("solid_red_ball_s0") == 1193169464
    assert tasks.default_noise_seed("solid_orange_couch_s4") == 1708643777


def test_root_changes_where_relative_paths_start(ref_folder):
    sub = ref_folder / "data" / "tasks"
    sub.mkdir(parents=True)
    path = _write(sub / "tasks.jsonl", [_line(task_id="a", instruction="x", source_image_path="photo.jpg")])
    # By default the root is the nearest folder upwards where the path exists (a study checkout's root).
    assert tasks.read_tasks(path)[0].reference == ref_folder / "photo.jpg"
    assert tasks.read_tasks(path, root=ref_folder)[0].reference == ref_folder / "photo.jpg"
    with pytest.raises(tasks.TaskFileError, match="line 1, field 'source_image_path'"):
        tasks.read_tasks(path, root=sub)
    assert tasks.read_tasks(path, root=sub, check_files=False)[0].reference == sub / "photo.jpg"
    absolute = _write(sub / "abs.jsonl", [_line(task_id="a", instruction="x",
                                                source_image_path=str(ref_folder / "photo.jpg"))])
    assert tasks.read_tasks(absolute)[0].reference == ref_folder / "photo.jpg"


GOOD = dict(task_id="t1", instruction="draw", source_image_path="photo.jpg")


@pytest.mark.parametrize("line, field", [
    ("{not json", None),
    ("[1, 2]", None),
    (_line(instruction="draw", source_image_path="photo.jpg"), "task_id"),
    (_line(**{**GOOD, "task_id": "has space"}), "task_id"),
    (_line(**{**GOOD, "task_id": "../escape"}), "task_id"),
    (_line(task_id="t1", source_image_path="photo.jpg"), "instruction"),
    (_line(**{**GOOD, "instruction": "  "}), "instruction"),
    (_line(**{**GOOD, "edit_type": "recolour"}), "edit_type"),
    (_line(**{**GOOD, "width": -16}), "width"),
    (_line(**{**GOOD, "height": "1024"}), "height"),
    (_line(**{**GOOD, "noise_seed": True}), "noise_seed"),
    (_line(**{**GOOD, "noise_seed": -1}), "noise_seed"),
    (_line(**{**GOOD, "noise_seed": 2**32}), "noise_seed"),
    (_line(**{**GOOD, "metadata": [1]}), "metadata"),
    (_line(task_id="t1", instruction="draw", real_ref_dir="refs"), "real_ref_name"),
    (_line(task_id="t1", instruction="draw", real_ref_name="solid_red"), "real_ref_dir"),
    (_line(**GOOD, real_ref_dir="refs", real_ref_name="solid_red"), "source_image_path"),
    (_line(task_id="t1", instruction="draw", real_ref_dir="refs", real_ref_name="solid_blue"), "real_ref_name"),
    (_line(task_id="t1", instruction="draw", source_image_path="nowhere.png"), "source_image_path"),
    (_line(task_id="t1", instruction="draw", ref_seed=3), "source_caption"),
    (_line(task_id="t1", instruction="draw"), None),
])
def test_malformed_lines_are_named_by_line_and_field(ref_folder, line, field):
    path = _write(ref_folder / "tasks.jsonl", [_line(**{**GOOD, "task_id": "t0"}), "", line])
    expected = re.escape(f"tasks.jsonl, line 3" + (f", field {field!r}" if field else "") + ":")
    with pytest.raises(tasks.TaskFileError, match=expected):
        tasks.read_tasks(path)


def test_duplicate_ids_and_empty_files_are_errors(ref_folder):
    path = _write(ref_folder / "tasks.jsonl", [_line(**GOOD), _line(**GOOD)])
    with pytest.raises(tasks.TaskFileError, match="line 2, field 'task_id'.*already used on line 1"):
        tasks.read_tasks(path)
    with pytest.raises(tasks.TaskFileError, match="no tasks"):
        tasks.read_tasks(_write(ref_folder / "empty.jsonl", ["", "  "]))
    with pytest.raises(tasks.TaskFileError, match="cannot read"):
        tasks.read_tasks(ref_folder / "absent.jsonl")


def test_pair_files(ref_folder):
    lines = [_line(task_id=f"t{i}", instruction="same" if i < 3 else "other", source_image_path="photo.jpg")
             for i in range(4)]
    task_list = tasks.read_tasks(_write(ref_folder / "tasks.jsonl", lines))
    pairs = tasks.read_pairs(_write(ref_folder / "pairs.txt", ["# source\ttarget", "t0\tt1", "", "t2 t0"]), task_list)
    assert [(s.task_id, t.task_id) for s, t in pairs] == [("t0", "t1"), ("t2", "t0")]

    with pytest.raises(tasks.TaskFileError, match=r"pairs.txt, line 2: unknown target task id 'nope'"):
        tasks.read_pairs(_write(ref_folder / "pairs.txt", ["t0\tt1", "t0\tnope"]), task_list)
    with pytest.raises(tasks.TaskFileError, match=r"line 1: expected two task ids .* got 3 fields"):
        tasks.read_pairs(_write(ref_folder / "pairs.txt", ["t0\tt1\tt2"]), task_list)
    with pytest.raises(tasks.TaskFileError, match=r"line 1: source and target instructions differ"):
        tasks.read_pairs(_write(ref_folder / "pairs.txt", ["t0\tt3"]), task_list)
    assert len(tasks.read_pairs(ref_folder / "pairs.txt", task_list, require_same_instruction=False)) == 1
    with pytest.raises(tasks.TaskFileError, match="no pairs"):
        tasks.read_pairs(_write(ref_folder / "pairs.txt", ["# nothing"]), task_list)


def test_colour_bucket_has_the_studys_320_tasks():
    bucket = tasks.colour_bucket()
    assert len(bucket) == 320 == len({t.task_id for t in bucket})
    for t in bucket:
        colour, obj, seed = tasks.parse_colour_task_id(t.task_id)
        assert t.task_id == f"solid_{colour}_{obj}_s{seed}"
        assert t.instruction == f"draw a {obj} in this color"
        assert t.noise_seed == zlib.crc32(t.task_id.encode()) == t.seed
        assert t.real_ref_name == f"solid_{colour}" and (t.width, t.height) == (1024, 1024)
    assert {tasks.parse_colour_task_id(t.task_id)[0] for t in bucket} == set(tasks.COLOURS)
    assert {tasks.parse_colour_task_id(t.task_id)[1] for t in bucket} == set(tasks.OBJECTS)
    assert tasks.COLOURS["brown"] == (120, 75, 45) and tasks.COLOURS["pink"] == (230, 120, 170)
    assert tasks.parse_colour_task_id("customize_style_s0") is None


def test_colour_bucket_subset_written_and_read_back(tmp_path):
    path = tasks.write_colour_bucket(tmp_path / "b", ["red", "blue"], ["ball"], [0, 3], size=16)
    first = {p: p.read_bytes() for p in sorted((tmp_path / "b").rglob("*")) if p.is_file()}
    read = tasks.read_tasks(path)
    assert [t.task_id for t in read] == ["solid_red_ball_s0", "solid_red_ball_s3",
                                         "solid_blue_ball_s0", "solid_blue_ball_s3"]
    assert read == tasks.colour_bucket(["red", "blue"], ["ball"], [0, 3], size=16)
    for t in read:
        pixels = np.asarray(Image.open(t.reference))
        assert pixels.shape == (16, 16, 3)
        assert (pixels == tasks.COLOURS[t.metadata["colour"]]).all()
    tasks.write_colour_bucket(tmp_path / "b", ["red", "blue"], ["ball"], [0, 3], size=16)
    assert first == {p: p.read_bytes() for p in sorted((tmp_path / "b").rglob("*")) if p.is_file()}
    assert [t.task_id for t in tasks.select(read, ["solid_blue_ball_s0", "solid_red_ball_s3"])] == \
        ["solid_red_ball_s3", "solid_blue_ball_s0"]  # file order kept
    assert len(tasks.select(read, limit=3)) == 3
    with pytest.raises(KeyError, match="unknown task ids: solid_red_car_s0"):
        tasks.select(read, ["solid_red_car_s0"])
    with pytest.raises(ValueError, match="unknown colours teal"):
        tasks.colour_bucket(["teal"])
    with pytest.raises(ValueError, match="unknown seeds 5"):
        tasks.colour_bucket(seeds=[5])


def test_colour_bucket_command_line(tmp_path, capsys):
    assert tasks.main(["colour-bucket", str(tmp_path / "c"), "--size", "8", "--colours", "green",
                       "--objects", "mug,vase", "--seeds", "1"]) == 0
    assert [t.task_id for t in tasks.read_tasks(tmp_path / "c" / "tasks.jsonl")] == \
        ["solid_green_mug_s1", "solid_green_vase_s1"]
    with pytest.raises(SystemExit):
        tasks.main(["colour-bucket", str(tmp_path / "d"), "--objects", "boat"])
    assert "unknown objects boat" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# run folders


def test_run_folder_records_config_code_and_invocations(tmp_path):
    with runs.open_run(tmp_path, "exp", {"blocks": (7, 17), "model": Path("m")}, argv=["x"]) as run:
        assert not run.resumed and run.path == tmp_path / "exp"
        assert json.loads((run.path / "config.json").read_text()) == {"blocks": [7, 17], "model": "m"}
        version = json.loads((run.path / "code_version.json").read_text())
        assert set(version) in ({"git_commit", "git_dirty"}, {"package_version"})
        assert json.loads((run.path / "invocations" / "0001.json").read_text())["argv"] == ["x"]
        assert (run.path / "run.lock").exists()
    assert not (run.path / "run.lock").exists()
    with runs.open_run(tmp_path, "exp", {"model": "m", "blocks": [7, 17]}) as again:  # same config: resume
        assert again.resumed and again.path == run.path
        assert (run.path / "invocations" / "0002.json").exists()


def test_a_different_config_never_reuses_a_folder(tmp_path):
    runs.open_run(tmp_path, "exp", {"steps": 4}).close()
    with runs.open_run(tmp_path, "exp", {"steps": 1}) as other:
        assert other.path == tmp_path / "exp-2" and not other.resumed
    with runs.open_run(tmp_path, "exp", {"steps": 1}) as same:
        assert same.path == tmp_path / "exp-2" and same.resumed
    with pytest.raises(runs.RunError, match=r"(?s)different config.*steps: 4 in the folder, 1 asked for"):
        runs.open_run(tmp_path, "exp", {"steps": 1}, on_conflict="refuse")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(runs.RunError, match="not a run folder"):
        runs.open_run(tmp_path, "foreign", {}, on_conflict="refuse")
    assert runs.open_run(tmp_path, "foreign", {}).path == tmp_path / "foreign-2"
    assert json.loads((tmp_path / "exp" / "config.json").read_text()) == {"steps": 4}


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = runs.open_run(tmp_path, "exp", {})
    with pytest.raises(runs.RunError, match="in use by process"):
        runs.open_run(tmp_path, "exp", {})
    run.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "exp" / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    runs.open_run(tmp_path, "exp", {}).close()


def test_cells_complete_only_with_their_marker_and_are_never_overwritten(tmp_path):
    with runs.open_run(tmp_path, "exp", {}) as run:
        cell = run.cell("task_a/knockout/ref-text")
        assert not cell.done and run.pending(["task_a/knockout/ref-text"]) == ["task_a/knockout/ref-text"]
        cell.write_image("image.png", np.full((4, 4, 3), 7, np.uint8))
        cell.write_array("latent.npy", np.arange(6.0))
        assert not cell.done
        cell.finish({"mad": 1.5})
        assert cell.done and cell.record() == {"mad": 1.5}
        assert np.array_equal(cell.load_array("latent.npy"), np.arange(6.0))
        assert np.asarray(cell.load_image("image.png")).max() == 7
        with pytest.raises(runs.RunError, match="never overwritten"):
            cell.write_image("image.png", np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(runs.RunError, match="already complete"):
            cell.finish()
        assert [c.key for c in run.cells()] == ["task_a/knockout/ref-text"]
        (cell.path / "latent.npy").unlink()  # a listed file gone: the cell is no longer complete
        assert not cell.done and run.pending([cell.key]) == [cell.key]
        for bad in ("", "../up", "/abs", "a/../b", "a b"):
            with pytest.raises(ValueError, match="cell key"):
                run.cell(bad)
        with pytest.raises(TypeError, match="uint8"):
            run.cell("x").write_image("f.png", np.zeros((2, 2, 3), np.float32))
        with pytest.raises(ValueError, match="not a derived file"):
            run.write_derived("config.json", "{}")
        with pytest.raises(ValueError, match="NaN"):
            run.cell("y").finish({"value": float("nan")})


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    runs.atomic_write_json(target, {"v": 1})

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_writer_killed_midway_leaves_no_torn_file(tmp_path):
    runs.open_run(tmp_path, "exp", {}).close()
    target = tmp_path / "exp" / "outputs" / "c" / "big.bin"
    script = textwrap.dedent(f"""
        import os, signal
        from fluxjax import files
        files.atomic_write_bytes({str(target)!r}, b"old")
        def killed(*a):  # the new content is on disk in the temporary file; die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        files.os.replace = killed
        files.atomic_write_bytes({str(target)!r}, b"new" * 1000)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert target.read_bytes() == b"old"
    assert any(files.TMP_MARK in p.name for p in target.parent.iterdir())
    runs.open_run(tmp_path, "exp", {}).close()  # resuming clears what the killed writer left
    assert [p.name for p in target.parent.iterdir()] == ["big.bin"]


_WORKER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from experiments import runs

    root, log, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
    keys = [f"task_{i}/edit" for i in range(6)]
    with runs.open_run(root, "sweep", {"cells": keys}) as run:
        bar = runs.progress(total=len(keys), desc="tasks", enabled=False)
        for key in keys:
            cell = run.cell(key)
            if cell.done:
                bar.update()
                continue
            with open(log, "a") as f:
                f.write(key + "\\n")
            rng = np.random.default_rng(int(key[5]))
            cell.write_image("image.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            if key == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            cell.write_array("latent.npy", rng.normal(size=(4, 4)))
            cell.finish({"mean": float(np.asarray(cell.load_image("image.png")).mean())})
            bar.update()
        run.write_summary({c.key: c.record() for c in run.cells()})
""")


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_run_resumes_to_the_same_outputs_without_recomputing(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)

    def run(root, kill_at):
        log = tmp_path / f"{root}.log"
        proc = subprocess.run([sys.executable, str(worker), str(tmp_path / root), str(log), kill_at],
                              cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        return proc.returncode, log

    code, _ = run("whole", kill_at="none")
    assert code == 0
    code, log = run("killed", kill_at="task_3/edit")
    assert code == -signal.SIGKILL
    killed = tmp_path / "killed" / "sweep"
    assert not (killed / "summary.json").exists()
    assert (killed / "outputs" / "task_3" / "edit" / "image.png").exists()  # partial cell, no marker
    before = {k: (killed / "outputs" / f"task_{k}" / "edit" / "DONE.json").stat().st_mtime_ns for k in range(3)}

    code, _ = run("killed", kill_at="none")  # restart
    assert code == 0
    assert log.read_text().split() == [f"task_{i}/edit" for i in (0, 1, 2, 3, 3, 4, 5)]  # 0-2 not recomputed
    assert before == {k: (killed / "outputs" / f"task_{k}" / "edit" / "DONE.json").stat().st_mtime_ns
                      for k in range(3)}
    whole = tmp_path / "whole" / "sweep"
    assert _tree(killed / "outputs") == _tree(whole / "outputs")
    assert (killed / "summary.json").read_bytes() == (whole / "summary.json").read_bytes()
    assert len(list((killed / "invocations").glob("*.json"))) == 2


# ---------------------------------------------------------------------------------------------
# metrics

# Sharma, Wu and Dalal (2005), Table 1: L1, a1, b1, L2, a2, b2, CIEDE2000.
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def test_ciede2000_matches_sharma_2005_table_1():
    data = np.array(SHARMA_2005)
    got = metrics.ciede2000(data[:, 0:3], data[:, 3:6])  # vectorised over the 34 pairs
    assert np.round(got, 4).tolist() == data[:, 6].tolist()
    assert np.allclose(metrics.ciede2000(data[:, 3:6], data[:, 0:3]), got, atol=1e-12, rtol=0)  # symmetric
    for row in SHARMA_2005[:3]:  # and one pair at a time
        assert round(float(metrics.ciede2000(row[0:3], row[3:6])), 4) == row[6]


def test_srgb_to_lab_d65():
    assert np.allclose(metrics.srgb_to_lab([255, 255, 255]), [100.0, 0.0, 0.0], atol=1e-4)
    assert np.allclose(metrics.srgb_to_lab([0, 0, 0]), [0.0, 0.0, 0.0], atol=1e-12)
    # sRGB primaries under D65 (Lindbloom's tables; other sources differ in the second decimal)
    assert np.allclose(metrics.srgb_to_lab([255, 0, 0]), [53.2408, 80.0925, 67.2032], atol=0.02)
    assert np.allclose(metrics.srgb_to_lab([0, 255, 0]), [87.7347, -86.1827, 83.1793], atol=0.02)
    assert np.allclose(metrics.srgb_to_lab([0, 0, 255]), [32.2970, 79.1875, -107.8602], atol=0.02)
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3))
    assert np.allclose(metrics.lab_to_srgb(metrics.srgb_to_lab(rgb)), rgb, atol=1e-6)


BACKGROUNDS = ["white", "light grey", "light noise", "off-white"]


def _background(kind: str, shape, rng) -> np.ndarray:
    if kind == "light noise":
        return rng.integers(222, 250, (*shape, 3)).astype(np.uint8)
    value = {"white": (255, 255, 255), "light grey": (215, 215, 215), "off-white": (250, 244, 232)}[kind]
    return np.broadcast_to(np.array(value, np.uint8), (*shape, 3)).copy()


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_dominant_colour_recovers_each_reference_colour_within_2_delta_e(background):
    rng = np.random.default_rng(1)
    for i, (name, rgb) in enumerate(tasks.COLOURS.items()):
        shape = [(96, 96), (240, 320), (64, 48), (300, 300)][i % 4]  # square, wide, tall, downsampled
        image = _background(background, shape, rng)
        h, w = shape
        yy, xx = np.mgrid[:h, :w]
        patch = (yy - 0.45 * h) ** 2 / (0.3 * h) ** 2 + (xx - 0.55 * w) ** 2 / (0.25 * w) ** 2 < 1  # off-centre disc
        image[patch] = rgb
        error = metrics.colour_error(image, metrics.srgb_to_lab(rgb))
        assert error < 2.0, (name, background, error)
        reference = metrics.reference_colour(tasks.flat_image(rgb, 32))
        assert float(metrics.ciede2000(reference, metrics.srgb_to_lab(rgb))) < 1e-6


def test_colour_metric_tells_the_bucket_colours_apart():
    labs = {n: metrics.srgb_to_lab(rgb) for n, rgb in tasks.COLOURS.items()}
    closest = min(float(metrics.ciede2000(labs[a], labs[b])) for a, b in itertools.combinations(labs, 2))
    assert closest > metrics.COLOUR_MATCH_DE00  # the threshold's justification holds
    for drawn, reference in itertools.permutations(tasks.COLOURS, 2):
        image = np.full((48, 48, 3), 245, np.uint8)
        image[12:36, 10:40] = tasks.COLOURS[drawn]
        assert metrics.colour_error(image, labs[reference]) > metrics.COLOUR_MATCH_DE00
        assert metrics.nearest_colour(metrics.dominant_colour(image).lab, tasks.COLOURS)[0] == drawn
        closer, d_src, d_tgt = metrics.closer_to_source(image, labs[drawn], labs[reference])
        assert closer and d_src < 2.0 < d_tgt


def test_dominant_colour_of_shaded_objects_and_full_bleed_images():
    rgb = np.array(tasks.COLOURS["green"], np.float64)
    image = np.full((64, 64, 3), 240, np.uint8)
    shade = np.linspace(0.8, 1.1, 40)[None, :, None]  # a left-to-right lighting gradient
    image[12:52, 12:52] = np.clip(rgb * shade, 0, 255).astype(np.uint8)
    assert metrics.colour_error(image, metrics.srgb_to_lab(rgb)) < metrics.COLOUR_MATCH_DE00
    flat = tasks.flat_image(tasks.COLOURS["purple"], 40)
    found = metrics.dominant_colour(flat)
    assert found.foreground == 1.0 and found.rgb == tasks.COLOURS["purple"]


def test_mean_abs_diff_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(40, 200, (40, 48, 3)).astype(np.uint8)
    assert metrics.mean_abs_diff(a, a) == 0.0
    assert metrics.mean_abs_diff(a, a + 10) == 10.0
    assert metrics.mean_abs_diff(Image.fromarray(a), a + 3) == 3.0
    with pytest.raises(ValueError, match="differ in size"):
        metrics.mean_abs_diff(a, a[:-1])

    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    c = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    assert 1.0 > metrics.ssim(a, b) > metrics.ssim(a, c) > 0.0

    # flat images: no variance, so SSIM is the luminance term (2 x y + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 100.0, 160.0, (0.01 * 255) ** 2
    flat = metrics.ssim(np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 160, np.uint8))
    assert flat == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-9)

    # one window computed directly from eq. 13 with the 2-D Gaussian weights
    i, j, ch = 5, 17, 1
    g = np.arange(11) - 5.0
    w = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    pa, pb = a[i:i + 11, j:j + 11, ch].astype(float), c[i:i + 11, j:j + 11, ch].astype(float)
    ma, mb = (w * pa).sum(), (w * pb).sum()
    va, vb, cov = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum(), (w * (pa - ma) * (pb - mb)).sum()
    c2 = (0.03 * 255) ** 2
    direct = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    smap = metrics.ssim_map(a, c)
    assert smap.shape == (30, 38, 3)
    assert smap[i, j, ch] == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(a[:10], a[:10])


def test_pass_rates_as_csv(tmp_path):
    records = [{"setting": "ref->text", "pass": True}, {"setting": "ref->image", "pass": False},
               {"setting": "ref->text", "pass": False}, {"setting": "ref->text", "pass": np.bool_(True)}]
    rates = metrics.pass_rates(records, criterion="colour lost", threshold=15.0)
    assert [(r.setting, r.n, r.passed) for r in rates] == [("ref->text", 3, 2), ("ref->image", 1, 0)]
    path = metrics.write_pass_rates_csv(tmp_path / "pass_rates.csv", rates)
    rows = path.read_text().splitlines()
    assert rows[0] == "setting,criterion,threshold,n,passed,rate,low,high"  # low, high: the 95 % Wilson interval
    assert rows[1] == "ref->text,colour lost,15.0000,3,2,0.6667,0.2077,0.9385"
    with pytest.raises(TypeError, match="must be a bool"):
        metrics.pass_rates([{"setting": "s", "pass": 1}], criterion="c", threshold=None)


# ---------------------------------------------------------------------------------------------
# grids and report


def _ball(rgb, n=32):
    image = np.full((n, n, 3), 240, np.uint8)
    yy, xx = np.mgrid[:n, :n]
    image[(yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 3) ** 2] = rgb
    return image


def test_grid_and_report_in_a_run_folder(tmp_path):
    with runs.open_run(tmp_path, "exp", {"steps": 4}) as run:
        reference = tasks.flat_image(tasks.COLOURS["blue"], 32)
        image = grids.grid([[
            grids.Panel("reference", reference), grids.Panel("baseline edit", _ball((40, 90, 220)), "dE00 0.0"),
            grids.Panel("text-to-image", _ball((200, 60, 60))),
            grids.Panel("knockout ref->text", _ball((150, 150, 150)), "dE00 40"),
            grids.Panel("knockout ref->image", None)]], title="solid_blue_ball_s0: draw a ball in this color", cell=96)
        assert image.width == 5 * (96 + grids.PAD) + grids.PAD  # reference, 2 baselines, 2 interventions
        pixels = np.asarray(image).reshape(-1, 3)
        for rgb in [(40, 90, 220), (200, 60, 60), (150, 150, 150), grids.MISSING]:
            assert (pixels == rgb).all(axis=1).any(), rgb
        grid_path = run.write_derived("grids/solid_blue_ball_s0.png", runs.encode_image(image))

        plot_path = run.write_derived("plots/lens.png", report.sweep_plot(
            list(range(8)), {"all": [50, 40, 30, None, 10, 8, 7, 6], "padding": [55] * 8}, ylabel="CIEDE2000",
            threshold=15.0, num_double_blocks=3))
        with Image.open(plot_path) as plot:
            assert plot.format == "PNG" and plot.width > 400
        with pytest.raises(ValueError, match="has 2 values for 8 blocks"):
            report.sweep_plot(list(range(8)), {"x": [1, 2]}, ylabel="y")

        sections = [report.Section("Knockout", [
            report.Text("Colour is lost when ref->text is cut.\n\nSecond paragraph with <html>."),
            report.Table("Per task", ["task", "dE00", "rate"], [{"task": "t", "dE00": 3.14159, "rate": 0.5}],
                         formats={"rate": "{:.0%}"}, note="lost <b>"),
            report.Figure(grid_path, "grid"), report.Figure(Path("plots/lens.png"), "sweep")])]
        page = report.write_run_report(run, "Colour bucket", sections)

    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert sources == ["grids/solid_blue_ball_s0.png", "plots/lens.png"]
    assert all((run.path / s).is_file() for s in sources)
    assert str(tmp_path) not in text  # relative paths only: the folder is self-contained
    assert "&lt;html&gt;" in text and "lost &lt;b&gt;" in text and "<td class=\"num\">3.142</td>" in text
    assert "50%" in text and '"steps": 4' in text
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (2, 2)).save(outside)
    with pytest.raises(ValueError, match="outside the report folder"):
        report.render_html(run.path, "t", [report.Section("s", [report.Figure(outside)])])
    with pytest.raises(ValueError, match="at least one panel"):
        grids.grid([[]])


def test_the_package_imports_no_torch_jax_or_matplotlib():
    code = ("import sys, experiments.tasks, experiments.runs, experiments.judge, "
            "experiments.grids, experiments.report; "
            "print([m for m in ('torch', 'diffusers', 'jax', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_folder_from_a_relative_root_has_absolute_paths(tmp_path, monkeypatch):
    """Figures referenced by the report are found whatever the working directory (`--out runs/x`)."""
    monkeypatch.chdir(tmp_path)
    run = runs.open_run("relative-root", "demo", {"a": 1})
    try:
        assert run.path.is_absolute() and run.path == tmp_path / "relative-root" / "demo"
        figure = run.write_derived("plots/x.png", b"png")
        assert Path(figure).is_file()
        html = report.render_html(run.path, "t", [report.Section("s", [report.Figure(str(figure), "x")])])
        assert "plots/x.png" in html
    finally:
        run.close()
