"""Run folders verify themselves: a finished cell whose files are missing or damaged is found, said
in one line and recomputed by the next run (to the same bytes); `--verify` lists the damage without
computing; `--out` is refused in one line, before any model loads, when it cannot be this command's
run folder; a finished, intact run has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import cli, drop, knockout, models, runs
from experiments.context import Context

KEYS = ("task_a/edit", "task_b/edit", "task_c/edit")
CONFIG = {"experiment": "drop", "cells": list(KEYS)}


def work(root: Path, name: str = "exp") -> list[str]:
    """A deterministic run of three cells (an image, an array, a record each) -> the keys computed."""
    computed = []

    def compute(key):
        def fill(cell: runs.Cell) -> dict:
            computed.append(key)
            rng = np.random.default_rng(KEYS.index(key))
            cell.write_image("image.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            cell.write_array("latent.npy", rng.normal(size=(8, 8)))
            return {"rows": [{"key": key}]}
        return fill

    with runs.open_run(root, name, CONFIG) as run:
        ctx = Context(model=None, run=run, options=None)
        for key in KEYS:
            ctx.complete(key, compute(key))
        run.mark_finished()
    return computed


def cell_file(root: Path, key: str, name: str) -> Path:
    return root / "exp" / runs.OUTPUTS_DIR / key / name


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def outputs(root: Path) -> dict[str, bytes]:
    folder = root / "exp" / runs.OUTPUTS_DIR
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


DAMAGE = {  # name -> (damage(root), the phrase the repair line and --verify give)
    "image deleted": (lambda r: cell_file(r, KEYS[1], "image.png").unlink(), "image.png missing"),
    "image flipped, same size": (lambda r: flip(cell_file(r, KEYS[1], "image.png")), "image.png damaged"),
    "array flipped, same size": (lambda r: flip(cell_file(r, KEYS[1], "latent.npy")), "latent.npy damaged"),
    "array truncated": (lambda r: os.truncate(cell_file(r, KEYS[1], "latent.npy"), 10), "latent.npy has 10 bytes"),
    "marker garbled": (lambda r: cell_file(r, KEYS[1], runs.DONE_FILE).write_text("{"), "DONE.json unreadable"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_one_rerun_repairs_a_damaged_cell_to_the_same_bytes(tmp_path, case, capsys):
    assert work(tmp_path / "clean") == list(KEYS)
    assert work(tmp_path / "run") == list(KEYS)
    damage, phrase = DAMAGE[case]
    damage(tmp_path / "run")
    capsys.readouterr()

    check = runs.check_run(tmp_path / "run" / "exp")
    assert not check.ok and list(check.damaged) == [KEYS[1]] and check.intact == 2
    assert phrase in " ".join(check.damaged[KEYS[1]])

    assert work(tmp_path / "run") == [KEYS[1]]  # only the damaged cell is computed again
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and KEYS[1] in said[0] and phrase in said[0] and "computing it again" in said[0], said
    assert outputs(tmp_path / "run") == outputs(tmp_path / "clean")
    assert runs.check_run(tmp_path / "run" / "exp").ok
    assert work(tmp_path / "run") == []


def test_a_finished_intact_run_has_nothing_to_do_until_a_cell_is_damaged(tmp_path, capsys):
    work(tmp_path)
    with runs.open_run(tmp_path, "exp", CONFIG) as run:
        assert run.nothing_to_do() == len(KEYS)
    cell_file(tmp_path, KEYS[2], "image.png").unlink()
    with runs.open_run(tmp_path, "exp", CONFIG) as run:
        assert run.nothing_to_do() is None
    assert KEYS[2] in capsys.readouterr().err


def test_check_run_lists_unfinished_cells_and_folder_problems(tmp_path):
    work(tmp_path)
    partial = tmp_path / "exp" / runs.OUTPUTS_DIR / "task_d" / "edit"
    partial.mkdir(parents=True)
    (partial / "image.png").write_bytes(b"partial")
    check = runs.check_run(tmp_path / "exp")
    assert check.ok and check.unfinished == ["task_d/edit"] and check.intact == 3
    assert "unfinished cell task_d/edit" in "\n".join(check.lines())
    (tmp_path / "exp" / runs.CONFIG_FILE).unlink()
    assert not runs.check_run(tmp_path / "exp").ok
    assert runs.check_run(tmp_path / "nowhere").problems == ["no such run folder"]


def test_verify_option_computes_nothing_and_exits_1_on_damage(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", _no_model)
    work(tmp_path)
    for module in (drop, knockout):
        assert module.main(["--verify", "--out", str(tmp_path / "exp")]) == 0
    assert "intact: 3 finished cells intact" in capsys.readouterr().out
    flip(cell_file(tmp_path, KEYS[0], "image.png"))
    assert drop.main(["--verify", "--out", str(tmp_path / "exp")]) == 1
    out = capsys.readouterr().out
    assert f"damaged cell {KEYS[0]}: image.png damaged" in out and "DAMAGED" in out
    assert runs.check_run(tmp_path / "exp").damaged  # --verify repaired nothing


def test_run_all_verify_checks_each_models_folder(tmp_path, capsys, monkeypatch):
    from experiments import run_all

    monkeypatch.setattr(models, "load", _no_model)
    work(tmp_path / "main", "direct")
    assert run_all.main(["--verify", "--model", "direct,text-routed", "--out", str(tmp_path / "main")]) == 1
    out = capsys.readouterr().out
    assert "direct: intact" in out and "text-routed: no such run folder" in out


def _no_model(args):
    raise AssertionError("the model was loaded")


# --- --out is refused in one line before the model loads -------------------------------------------

def _file(root: Path) -> Path:
    (root / "out").write_text("mine")
    return root / "out"


def _foreign(root: Path) -> Path:
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("mine")
    return root / "out"


def _other_command(root: Path) -> Path:
    runs.open_run(root, "out", {"experiment": "knockout"}).close()
    return root / "out"


OUT_CASES = {  # --out -> the refusal's words
    "a file": (_file, "is a file, not a run folder"),
    "a folder that is not a run folder": (_foreign, "exists and is not a run folder"),
    "another command's run folder": (_other_command, "holds a run of `knockout`, not `drop`"),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_out_that_cannot_be_this_commands_run_folder_is_refused(tmp_path, case, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", _no_model)
    make, words = OUT_CASES[case]
    out = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        drop.main(["--model", "direct", "--out", str(out), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(out) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no NAME-2 beside it


def test_a_second_run_into_a_busy_out_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", _no_model)
    with runs.open_run(tmp_path, "out", {"experiment": "drop"}):  # this process holds the lock
        with pytest.raises(SystemExit) as exit_:
            drop.main(["--model", "direct", "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by process" in err[0], err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load", _no_model)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(SystemExit):
            drop.main(["--model", "direct", "--out", str(tmp_path / "ro" / "run"), "--no-progress"])
    finally:
        (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0], err


def test_an_empty_out_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    cli.check_out(tmp_path / "out", "drop")
    with runs.open_run(tmp_path, "out", CONFIG, on_conflict="refuse") as run:
        assert run.path == tmp_path / "out" and not run.resumed


def test_input_failing_validation_leaves_no_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        drop.main(["--model", "direct", "--colours", "red", "--objects", "circle", "--seeds", "0",
                   "--ids", "no-such-task", "--out", str(tmp_path / "run"), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-task" in err[0], err
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


def test_discard_keeps_a_folder_with_work_in_it(tmp_path):
    work(tmp_path)
    with runs.open_run(tmp_path, "exp", CONFIG) as run:
        run.discard()
    assert (tmp_path / "exp" / runs.CONFIG_FILE).is_file()
    shutil.rmtree(tmp_path / "exp" / runs.OUTPUTS_DIR)
    (tmp_path / "exp" / runs.OUTPUTS_DIR).mkdir()
    with runs.open_run(tmp_path, "exp", CONFIG) as run:
        assert run.resumed
        run.discard()  # resumed: not this invocation's to remove
    assert (tmp_path / "exp").is_dir()
    with runs.open_run(tmp_path, "new", CONFIG) as run:
        run.discard()
    assert not (tmp_path / "new").exists()
    assert json.loads((tmp_path / "exp" / runs.CONFIG_FILE).read_text()) == CONFIG


# --- end to end, on an organism -------------------------------------------------------------------

@pytest.mark.slow
def test_the_command_repairs_a_deleted_and_a_flipped_file_to_the_bytes_of_an_undamaged_run(tmp_path, capsys):
    """drop on the direct organism: delete a baseline image, flip a byte of a result image (same
    size); --verify lists both, one rerun recomputes both cells (a line each) to the bytes of the
    undamaged run, and the next rerun has nothing to do."""
    args = ["--model", "direct", "--colours", "red", "--objects", "circle", "--seeds", "0", "--block", "3",
            "--no-progress"]
    run = tmp_path / "run"
    assert drop.main([*args, "--out", str(run)]) == 0
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    task = "solid_red_circle_s0"
    (run / "outputs" / "baselines" / task / "edit.png").unlink()
    flip(run / "outputs" / "drop" / task / "mask-k3.png")
    capsys.readouterr()

    assert drop.main(["--verify", "--out", str(run)]) == 1
    listed = capsys.readouterr().out
    assert f"damaged cell baselines/{task}: edit.png missing" in listed
    assert f"damaged cell drop/{task}: mask-k3.png damaged" in listed

    assert drop.main([*args, "--out", str(run)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "computing it again" in line]
    assert len(said) == 2, said

    def cells(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "outputs").rglob("*"))
                if p.is_file()}

    assert cells(run) == cells(clean)
    assert drop.main([*args, "--out", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
