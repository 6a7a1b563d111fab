"""The study's task sets and sample sizes, counted without generating (`run_all --plan`): its style
and identity buckets laid out as in its repository, their pair-only tasks given apart
(`--pair-tasks`), the whole colour bucket by default on a model folder, and a non-colour bucket
without its task files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import run_all, tasks

SUBJECTS = [f"subject{i:02d}" for i in range(18)]  # the study's 18 style subjects
PROMPTS = [f"A photograph of the subject in this image, scene {j}" for j in range(5)]
HUMANS = (1, 2, 4, 7, 8, 10, 11, 15, 18, 19)  # its 10 DreamBench humans
HUMAN_PROMPTS = [f"A photo of the person in this image, setting {j}" for j in range(9)]
SLUGS = [f"slug{j}" for j in range(5)]


def _line(task_id: str, instruction: str, ref_dir: str, ref_name: str, source: str, metadata=None) -> str:
    return json.dumps({"edit_type": "customize", "height": 1024, "instruction": instruction, "metadata": metadata or {},
                       "noise_seed": tasks.default_noise_seed(task_id), "real_ref_dir": ref_dir,
                       "real_ref_name": ref_name, "ref_seed": None, "source": source, "source_caption": None,
                       "source_image_path": None, "task_id": task_id, "width": 1024}) + "\n"


def _write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A checkout of the study's repository as far as its style and identity buckets go: the same
    folders, file names and counts (18 subjects x 5 prompts x 5 seeds of style tasks and of their real
    counterparts in `manual`, 450 style -> real pairs; 10 humans x 9 prompts, and 10 x 5 shared-prompt
    tasks for 450 directed pairs), with this project's own ids and instructions."""
    root = tmp_path_factory.mktemp("i2i-interp")
    image = tasks.flat_image((90, 120, 150), 64)
    for name in SUBJECTS:
        tasks.atomic_save_image(root / "data" / "style_references" / "fictional" / f"{name}.png", image)
        tasks.atomic_save_image(root / "data" / "style_references" / "real" / f"{name}_real.png", image)
    for h in HUMANS:
        tasks.atomic_save_image(root / "data" / "tasks" / "customize" / "images" / f"human_{h:02d}.png", image)
    style = [_line(f"style_{s}_p{j}_s{i}", p, "data/style_references/fictional", s, "style")
             for s in SUBJECTS for j, p in enumerate(PROMPTS) for i in range(5)]
    manual = [_line(f"manual_free_{s}_real_p{j}_s{i}", p, "data/style_references/real", f"{s}_real", "manual")
              for s in SUBJECTS for j, p in enumerate(PROMPTS) for i in range(5)]
    pairs = [f"style_{s}_p{j}_s{i}\tmanual_free_{s}_real_p{j}_s{(i + 1) % 5}\n"
             for s in SUBJECTS for j in range(len(PROMPTS)) for i in range(5)]
    humans = [_line(f"dreambench_human_{h:02d}_p{j}", p, "data/tasks/customize/images", f"human_{h:02d}",
                    "dreambench_plus") for h in HUMANS for j, p in enumerate(HUMAN_PROMPTS)]
    shared = [_line(f"dreambench_shared_{slug}_{h:02d}", f"A photo of the person in this image, {slug}",
                    "data/tasks/customize/images", f"human_{h:02d}", "dreambench_plus",
                    {"shared_slug": slug, "human_idx": h}) for slug in SLUGS for h in HUMANS]
    human_pairs = [f"dreambench_shared_{slug}_{a:02d}\tdreambench_shared_{slug}_{b:02d}\n"
                   for slug in SLUGS for a in HUMANS for b in HUMANS if a != b]
    _write(root / "data" / "tasks" / "style" / "tasks.jsonl", style)
    _write(root / "data" / "tasks" / "manual" / "tasks.jsonl", manual)
    _write(root / "data" / "tasks" / "dreambench_humans" / "tasks.jsonl", humans)
    _write(root / "data" / "tasks" / "dreambench_humans_shared" / "tasks.jsonl", shared)
    folder = root / "experiments" / "i2i_to_i2i_patching" / "pairs"
    _write(folder / "mm7_4step_style_to_real.txt", pairs)
    _write(folder / "mm7_4step_dreambench_humans.txt", human_pairs)
    return root


def _plan(capsys, *argv) -> dict[str, str]:
    assert run_all.main([*argv, "--plan", "--no-progress"]) == 0
    out = capsys.readouterr().out
    return dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))


def test_the_style_and_identity_buckets_run_the_studys_n(study, tiny_model_folder, tmp_path, capsys):
    data, pairs = study / "data" / "tasks", study / "experiments" / "i2i_to_i2i_patching" / "pairs"
    style = _plan(capsys, "--study", "--bucket", "style", "--model", tiny_model_folder, "--out", str(tmp_path / "s"),
                  "--tasks", str(data / "style" / "tasks.jsonl"), "--pair-tasks", str(data / "manual" / "tasks.jsonl"),
                  "--pairs", str(pairs / "mm7_4step_style_to_real.txt"))
    assert style == {"lens": "450 tasks", "knockout": "450 tasks", "patching": "450 pairs"}
    identity = _plan(capsys, "--study", "--bucket", "identity", "--model", tiny_model_folder, "--out",
                     str(tmp_path / "i"), "--tasks", str(data / "dreambench_humans" / "tasks.jsonl"), "--pair-tasks",
                     str(data / "dreambench_humans_shared" / "tasks.jsonl"), "--pairs",
                     str(pairs / "mm7_4step_dreambench_humans.txt"))
    assert identity == {"lens": "90 tasks", "knockout": "90 tasks", "patching": "450 pairs"}
    assert not (tmp_path / "s").exists() and not (tmp_path / "i").exists()  # nothing generated
    # The pair-only tasks given as --tasks are run by the lens and the knockouts too: n = 900, not the study's.
    both = _plan(capsys, "--study", "--bucket", "style", "--model", tiny_model_folder, "--out", str(tmp_path / "b"),
                 "--tasks", str(data / "style" / "tasks.jsonl"), str(data / "manual" / "tasks.jsonl"),
                 "--pairs", str(pairs / "mm7_4step_style_to_real.txt"))
    assert both["lens"] == "900 tasks"


def test_a_bucket_other_than_colour_needs_its_task_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--study", "--bucket", "style", "--model", "text-routed", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks" in err and "style" in err
    assert not (tmp_path / "x").exists()


def test_a_model_folder_runs_the_whole_colour_bucket_by_default(tiny_model_folder, tmp_path, capsys):
    whole = _plan(capsys, "--study", "--model", tiny_model_folder, "--out", str(tmp_path / "w"))
    assert whole == {"lens": "320 tasks", "knockout": "320 tasks", "patching": "448 pairs"}
    quick = _plan(capsys, "--study", "--quick", "--model", tiny_model_folder, "--out", str(tmp_path / "q"))
    assert quick == {"lens": "4 tasks", "knockout": "4 tasks", "patching": "12 pairs"}
    # the organisms keep their subset: 4 colours x 2 shapes
    organism = _plan(capsys, "--study", "--model", "text-routed", "--out", str(tmp_path / "o"))
    assert organism == {"lens": "8 tasks", "knockout": "8 tasks", "patching": "24 pairs"}
    assert not any((tmp_path / name).exists() for name in "wqo")
