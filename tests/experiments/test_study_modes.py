"""The study's modes this project runs besides its table's cells: the knockout sweep in the study's
index and step count, its literal setting names, the image-category T2I Lens, and the text length
of a model folder."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
from PIL import Image

from experiments import knockout, lens, models, run_all
from fluxjax.interventions import knockout as cut
from fluxjax.layout import TokenLayout

ORGANISM = ["--model", "text-routed", "--colours", "red,blue", "--objects", "circle", "--seeds", "0", "--no-progress"]


def test_the_studys_setting_names_are_its_edges():
    assert knockout.edges("image+text->ref") == ["image->ref", "text->ref"]
    assert knockout.edges("image+ref->text") == ["image->text", "ref->text"]
    assert knockout.edges("image<->ref") == ["image->ref", "ref->image"]
    assert knockout.edges("text[padding]+ref->image") == ["text[padding]->image", "ref->image"]
    assert knockout.edges("ref->text+ref->image") == ["ref->text", "ref->image"]  # this project's form
    with pytest.raises(ValueError, match="has no '->' destination"):
        knockout.edges("ref->text+image")
    config = models.inspect("text-routed").config
    s = {"settings": ["image+text->ref", "image<->ref", "text[padding]+ref->image"], "layers": ["all"], "sweep": [],
         "sweep_from": [], "sweep_mode": "suffix", "window": 3}
    knockout.validate(s, config)  # every one a knockout the model can run
    layout = TokenLayout(n_txt=4, img_grid=(1, 1), ref_grids=((1, 1),))
    content = np.array([True, True, False, False])
    both = cut(config, layout, content, knockout.edges("image<->ref"))
    one_way = cut(config, layout, content, ["ref->image"]) & cut(config, layout, content, ["image->ref"])
    np.testing.assert_array_equal(np.asarray(both.allowed), np.asarray(one_way.allowed))


def test_the_knockout_sweep_takes_the_studys_index_and_steps(tmp_path):
    """--sweep-mode prefix in the study's index: L = 0..n-1 cuts blocks 0..L (L = n-1: every block);
    this project's index: k = 0..n cuts blocks 0..k-1. The sweep runs --sweep-steps against a plain
    edit of the same steps, which its bundles show the judge."""
    n = models.inspect("text-routed").config.num_blocks
    study_s = {"sweep_mode": "prefix", "window": 3, "sweep_index": "study"}
    assert [knockout.sweep_cell(study_s, "ref->text", k, n)[0] for k in (0, n - 1)] == [range(0, 1), range(0, n)]
    assert knockout.sweep_cell(study_s, "ref->text", 2, n)[1] == "ref->text through 2"
    project = {"sweep_mode": "prefix", "window": 3}  # settings written before the index was a choice
    assert [knockout.sweep_cell(project, "ref->text", k, n)[0] for k in (0, n)] == [range(0, 0), range(0, n)]
    assert "the study's index" in knockout.sweep_axis_label(study_s) and "0..k" in knockout.sweep_axis_label(study_s)
    assert knockout.sweep_steps(None, "folder") == 1 and knockout.sweep_steps(None, "organism") is None
    assert knockout.sweep_steps(0, "folder") is None and knockout.sweep_steps(3, "organism") == 3

    out = tmp_path / "ko"
    assert knockout.main([*ORGANISM, "--settings", "ref->text", "--sweep", "--sweep-mode", "prefix",
                          "--sweep-steps", "4", "--out", str(out)]) == 0
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["sweep_index"] == "study" and settings["sweep_from"] == list(range(n))
    assert settings["sweep_steps"] == 4  # the organism's own are 8
    record = json.loads((out / "outputs" / "knockout" / "solid_red_circle_s0" / "DONE.json").read_text())["record"]
    swept = [r for r in record["rows"] if r["from_block"] is not None]
    assert [r["layers"] for r in swept] == [f"0:{k + 1}" for k in range(n)]
    assert all(r["sweep_steps"] == 4 and r["bundle"][1][1].endswith(knockout.SWEEP_EDIT) for r in swept)
    main = [r for r in record["rows"] if r["judge"] is not None and r["from_block"] is None]
    assert all(r["bundle"][1][1].endswith("baselines/solid_red_circle_s0/edit.png") for r in main)
    with open(out / "knockout-sweep-pass-rates.csv", newline="") as f:
        rates = {r["setting"]: r for r in csv.DictReader(f)}
    assert rates["no knockout (edit, 4 step sweep)"]["n_absolute"] == "2"
    assert {"rate_low", "rate_high", "vs_control"} <= set(rates[f"ref->text through {n - 1}"])


def test_the_image_category_lens(tmp_path):
    """--categories image carries the source's noisy-image stream (diagonal form only) beside the text cells."""
    out = tmp_path / "lens"
    assert lens.main([*ORGANISM, "--categories", "text", "image", "--form", "diagonal", "--target-steps", "8",
                      "--blocks", "0,2", "--out", str(out)]) == 0
    with open(out / "lens-pass-rates.csv", newline="") as f:
        rates = {r["setting"]: r for r in csv.DictReader(f)}
    assert {"image b0", "image b2", "padding b2"} <= set(rates)
    assert rates["image b0"]["n"] == "2" and rates["image b0"]["rate_low"] != ""
    cell = out / "outputs" / "lens" / "solid_red_circle_s0"
    image, plain = (np.asarray(Image.open(cell / name)) for name in ("image-b0.png", "unconditional.png"))
    assert np.abs(image.astype(int) - plain.astype(int)).max() > 0  # the carried-over image stream changes it
    with pytest.raises(SystemExit) as e:
        lens.main([*ORGANISM, "--categories", "image", "--out", str(tmp_path / "input")])
    assert e.value.code == 2 and not (tmp_path / "input").exists()


def test_the_text_length_of_a_model_folder(tiny_model_folder, tmp_path, capsys):
    """--text-length pads every prompt to that many tokens (the study's implicit capacity
    hyperparameter); the run config records it. An organism's is fixed by its training."""
    args = argparse.Namespace(model=tiny_model_folder, dtype=None, cache=str(tmp_path / "cache"), no_progress=True,
                              text_length=64)
    model, record = models.load(args)
    assert record["text_length"] == 64
    text = model.encode_prompts(["draw a ball in this color"])
    assert np.shape(text.embeds)[1] == 64 and np.shape(text.content_mask) == (1, 64)
    assert np.asarray(text.content_mask).sum() > 0
    capsys.readouterr()  # the loading's progress bars
    with pytest.raises(SystemExit) as e:
        run_all.main(["--model", "text-routed", "--text-length", "64", "--plan", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "organisms.train --text-length" in err
