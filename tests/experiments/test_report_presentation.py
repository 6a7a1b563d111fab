"""What a report says beside its numbers: the command that wrote it, the study's n, one percent
format, links, control rows as controls, coinciding lines apart, and knockouts that are no finding
(an edge cut in training, an image destroyed)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import judge, judges, knockout, report, study, tables


def test_one_percent_format():
    assert [report.percent(v) for v in (0.86, 0.125, 0.004, 1.0, 0.0, None, "0.7680")] == \
        ["86 %", "12.5 %", "0.4 %", "100 %", "0 %", "n/a", "76.8 %"]


def test_coinciding_lines_are_drawn_apart_and_named():
    styles = report.line_styles({"ref->text": [3, 1, 0], "ref->image": [0, 0, 0], "ref->text[content]": [0, 0, 0],
                                 "gap": [None, 1, 0], "gap too": [None, 1, 0]})
    by = {s["name"]: s for s in styles}
    assert by["ref->image"]["label"] == "ref->image" and by["ref->image"]["shift"] == 0
    assert by["ref->text[content]"]["label"] == "ref->text[content] (coincides with ref->image)"
    assert by["ref->text[content]"]["shift"] > 0 and by["ref->text[content]"]["linestyle"] == "--"
    assert by["gap too"]["label"] == "gap too (coincides with gap)"
    near = report.line_styles({"a": [20.0, 1.0, 0.0], "b": [20.0, 1.1, 0.1], "c": [20.0, 5.0, 0.0]})
    assert [s["label"] for s in near] == ["a", "b (overlaps a)", "c"]  # 0.1 of a 20 span: on top of each other
    assert len({s["marker"] for s in styles}) == len(styles)
    assert report.sweep_plot([0, 1, 2], {"a": [1, 2, 3], "b": [1, 2, 3]}, ylabel="y")[:4] == b"\x89PNG"


def test_a_report_names_its_command_links_and_distinct_sections(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.html").write_text("x")
    sections = [report.Section("A", [report.Links("see:", [("the other", "other/report.html#a-b")])]),
                report.Section("B", []), report.Section("C", [])]
    html = report.render_html(tmp_path, "T", sections, command="python -m experiments.run_all --study")
    assert "Written by <code>python -m experiments.run_all --study</code>" in html
    assert '<a href="other/report.html#a-b">the other</a>' in html and '<h2 id="b">B</h2>' in html
    assert '<a href="#c">C</a>' in html
    with pytest.raises(ValueError, match="share a heading"):
        report.render_html(tmp_path, "T", [report.Section("A", []), report.Section("A", [])])
    with pytest.raises(FileNotFoundError):
        report.render_html(tmp_path, "T", [report.Section("A", [report.Links("x", [("gone", "gone.html")])])])


def rows(setting, judge_kind, passes, **fields):
    return [{"setting": setting, "judge": judge_kind, "pass": p, "pass_absolute": p, **fields} for p in passes]


def test_control_rows_show_what_they_are_and_caveats_say_why():
    rates = tables.pass_rates(
        rows("no knockout (edit)", None, [True, True]) +
        rows("ref->image @ all", "kept", [True, True], trained_cut=True, destroyed=False) +
        rows("text->image @ all", "lost", [True, True], trained_cut=False, destroyed=True) +
        rows("ref->text @ all", "lost", [True, False], trained_cut=False, destroyed=False))
    table = tables.rate_table("rates", rates)
    shown = {r["setting"]: r for r in table.rows}
    control = shown["no knockout (edit)"]
    assert control["judge"] == tables.CONTROL and "n" not in control and "passed" not in control
    assert control["absolute [95% CI]"].startswith("100 % [")
    assert shown["ref->image @ all"]["caveat"].startswith("cut in training")
    assert shown["text->image @ all"]["caveat"].startswith("2 of 2 images destroyed")
    assert shown["ref->text @ all"]["caveat"] == "" and "caveat" in table.columns
    assert shown["ref->text @ all"]["rate [95% CI]"].startswith("50 % [")  # the reports' one percent format
    # The rates themselves are the rows' rates, whatever the caveat.
    assert {r["setting"]: r["rate"] for r in rates}["text->image @ all"] == 1.0


def test_the_study_table_gives_the_study_n_and_marks_a_cut_edge(tmp_path):
    from fluxjax import metrics

    ko = tables.pass_rates(
        rows("ref->image @ all", "kept", [True] * 8, trained_cut=True, destroyed=False) +
        rows("ref->text @ all", "lost", [True] * 7 + [False], trained_cut=False, destroyed=False))
    (tmp_path / "knockout-pass-rates.csv").write_text(metrics.rows_to_csv(ko))
    settings = study.plan(knockout_config(), "colour", "organism", None)
    found = {r["cell"]: r for r in study.rows(tmp_path, settings)}
    kept = found["Knockout ref->image, every block"]
    assert kept["study"] == "87 % kept (n = 320)"
    assert kept["this run"].startswith("100 % kept [") and kept["this run"].endswith(
        "(n = 8): cut in training: not a finding")
    assert found["Knockout ref->text, every block"]["this run"].startswith("87.5 % lost [")
    assert found["I2I -> I2I patching, all positions, block 3"]["study"] == "92 % (n = 448)"


def knockout_config():
    from organisms.model import TRANSFORMER

    return TRANSFORMER


def test_knockouts_of_trained_cuts_and_destroyed_images_are_recognised():
    cuts = ("ref->image", "ref->text[content]")
    config = knockout_config()
    assert knockout.cut_in_training("ref->image", config, cuts)
    assert knockout.cut_in_training("ref->image+ref->text[content]", config, cuts)
    assert not knockout.cut_in_training("ref->text", config, cuts)  # its padding half is open
    assert not knockout.cut_in_training("ref->image", config, ())
    flat = np.full((32, 32, 3), 200, np.uint8)  # nothing drawn
    scene = flat.copy()
    scene[8:24, 8:24] = (40, 90, 220)
    assert tables.destroyed(flat, edit_mad=10.0, t2i_mad=30.0)
    assert not tables.destroyed(scene, edit_mad=25.0, t2i_mad=30.0)
    assert tables.destroyed(scene, edit_mad=80.0, t2i_mad=30.0)  # far beyond removing the reference


def test_the_judge_takes_either_spelling_and_refuses_others_in_one_line(tmp_path, capsys):
    assert isinstance(judges.make_judge("color"), judges.ColourJudge) and judges.name_of("color") == "colour"
    assert judge.main([str(tmp_path), "--judge", "colr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown judge 'colr'" in err and "Traceback" not in err
