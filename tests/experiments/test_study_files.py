"""The study's own task and pair files, laid out as in its repository (`ChrisG777/i2i-interp`), read
unchanged: paths relative to the repository root resolve with no flag, several task files load
together, and the generated colour pairs are the study's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import tasks

STUDY_OBJECTS = ("couch", "chair", "car", "ball", "vase", "pillow", "mug", "hat")  # its file's order


def _line(task_id: str, instruction: str, ref_dir: str, ref_name: str, source: str) -> str:
    """One line in the study's format (every field, null where unset, as its files hold them)."""
    return json.dumps({"edit_type": "customize", "height": 1024, "instruction": instruction, "metadata": {},
                       "noise_seed": tasks.default_noise_seed(task_id), "real_ref_dir": ref_dir,
                       "real_ref_name": ref_name, "ref_seed": None, "source": source, "source_caption": None,
                       "source_image_path": None, "task_id": task_id, "width": 1024}) + "\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A checkout of the study's repository, as far as these files go."""
    root = tmp_path_factory.mktemp("i2i-interp")
    for colour, rgb in tasks.COLOURS.items():
        tasks.atomic_save_image(root / "data" / "solid_colors" / f"solid_{colour}.png", tasks.flat_image(rgb, 16))
    lines = [_line(f"solid_{c}_{o}_s{s}", f"draw a {o} in this color", "data/solid_colors", f"solid_{c}",
                   "solid_color") for c in tasks.COLOURS for o in STUDY_OBJECTS for s in range(5)]
    (root / "data" / "tasks" / "solid_color").mkdir(parents=True)
    (root / "data" / "tasks" / "solid_color" / "tasks.jsonl").write_text("".join(lines))
    # The colour pair file, by the study's description: per object, every ordered pair of distinct
    # colours (alphabetical), the n-th with source slot n mod 5 and target slot (n + 1) mod 5.
    colours = sorted(tasks.COLOURS)
    pairs = [(f"solid_{a}_{o}_s{n % 5}", f"solid_{b}_{o}_s{(n + 1) % 5}") for o in sorted(STUDY_OBJECTS)
             for n, (a, b) in enumerate((a, b) for a in colours for b in colours if a != b)]
    folder = root / "experiments" / "i2i_to_i2i_patching" / "pairs"
    folder.mkdir(parents=True)
    (folder / "single9_4step_color.txt").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    # A style task and the real photograph it is paired with, in two buckets.
    for sub, name in (("fictional", "dog"), ("real", "dog_real")):
        path = root / "data" / "style_references" / sub / f"{name}.png"
        tasks.atomic_save_image(path, tasks.flat_image((9, 9, 9), 8))
    instruction = "A photograph of the dog in this image on a beach"
    (root / "data" / "tasks" / "style").mkdir(parents=True)
    (root / "data" / "tasks" / "style" / "tasks.jsonl").write_text(
        _line("style_dog_beach_s0", instruction, "data/style_references/fictional", "dog", "style"))
    (root / "data" / "tasks" / "manual").mkdir(parents=True)
    (root / "data" / "tasks" / "manual" / "tasks.jsonl").write_text(
        _line("manual_free_dog_real_beach_s1", instruction, "data/style_references/real", "dog_real", "manual"))
    (folder / "mm7_4step_style_to_real.txt").write_text("style_dog_beach_s0\tmanual_free_dog_real_beach_s1\n")
    return root


def test_the_studys_colour_files_load_with_no_flags(study, capsys):
    found = tasks.read_task_files([study / "data" / "tasks" / "solid_color" / "tasks.jsonl"])
    assert len(found) == 320
    assert found[0].reference == study / "data" / "solid_colors" / "solid_red.png"
    pairs = tasks.read_pairs(study / "experiments" / "i2i_to_i2i_patching" / "pairs" / "single9_4step_color.txt",
                             found)
    assert len(pairs) == 448
    # The generated pairs follow the same rule.
    assert {(a.task_id, b.task_id) for a, b in tasks.colour_pairs(found)} == {(a.task_id, b.task_id) for a, b in pairs}
    assert tasks.main(["check", str(study / "data" / "tasks" / "solid_color" / "tasks.jsonl"), "--pairs",
                       str(study / "experiments" / "i2i_to_i2i_patching" / "pairs" / "single9_4step_color.txt")]) == 0
    out = capsys.readouterr().out
    assert "320 tasks" in out and "448 pairs" in out


def test_a_style_to_real_pair_file_loads_with_both_task_files(study):
    files = [study / "data" / "tasks" / "style" / "tasks.jsonl", study / "data" / "tasks" / "manual" / "tasks.jsonl"]
    found = tasks.read_task_files(files)
    (pair,) = tasks.read_pairs(study / "experiments" / "i2i_to_i2i_patching" / "pairs" / "mm7_4step_style_to_real.txt",
                               found)
    assert [t.reference.name for t in pair] == ["dog.png", "dog_real.png"]
    with pytest.raises(tasks.TaskFileError, match="unknown target task id"):
        tasks.read_pairs(study / "experiments" / "i2i_to_i2i_patching" / "pairs" / "mm7_4step_style_to_real.txt",
                         found[:1])
    with pytest.raises(tasks.TaskFileError, match="in both"):
        tasks.read_task_files([files[0], files[0]])


def test_a_file_outside_any_checkout_still_reads_relative_to_its_folder(tmp_path):
    path = tasks.write_colour_bucket(tmp_path / "bucket", ["red"], ["mug"], [0], size=8)
    (task,) = tasks.read_task_files([path])
    assert task.reference == tmp_path / "bucket" / "references" / "solid_red.png"
