"""The T2I Lens one text position at a time and under a knockout, on the text-routed organism
against its known routing (docs/organisms.md): its reference reaches the image only through the
text padding positions (`ref->image` and `ref->text[content]` are cut in every block), and at
block 2 the padding already holds the colour (tests/experiments/test_study_protocol.py)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from experiments import lens, sweep

TASK = "solid_red_circle_s0"
BLOCKS = (2, 5)  # the padding holds the colour at 2; 5 is the last block (tests/experiments/test_study_protocol.py)
POSITIONS = range(9)  # the grid's positions: <start>, the six instruction words, <end>, one <pad>
# Cells per vmapped call: (3 groups + 9 positions) x 2 blocks = 24 cells take 4 calls of one program,
# the knockout runs' 3 groups x 2 blocks one call of the same width (and so of the same program).
CHUNK = 6
PIXEL_TOL = 1  # as tests/experiments/test_experiments.py: a vmapped cell may land one uint8 level away


def _lens(out, *extra):
    assert lens.main(["--model", "text-routed", "--blocks", ",".join(map(str, BLOCKS)), "--colours", "red",
                      "--objects", "circle", "--seeds", "0", "--chunk", str(CHUNK), "--no-progress", "--out",
                      str(out), *extra]) == 0
    return out


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rates(out):
    return {r["setting"]: r for r in _csv(out / "lens-pass-rates.csv")}


def _image(out, name):
    return np.asarray(Image.open(out / "outputs" / "lens" / TASK / name).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """Positions 0..8 x blocks 2 and 5, in both forms, counting the vmapped calls and the programs
    compiled for them."""
    out, calls, compiled = {}, {}, {}
    real = sweep._sample_many
    with pytest.MonkeyPatch.context() as mp:
        for form in lens.FORMS:
            seen = []
            mp.setattr(sweep, "_sample_many", lambda *a, seen=seen, **k: seen.append(1) or real(*a, **k))
            before = real._cache_size()
            # The diagonal target runs the organism's own steps (one Euler step draws nothing).
            out[form] = _lens(tmp_path_factory.mktemp("grid") / form, "--form", form, "--target-steps", "8",
                              "--per-position", "all", "--position-range", f"0:{len(POSITIONS)}")
            calls[form], compiled[form] = len(seen), real._cache_size() - before
    return out, calls, compiled


def _grid(out):
    return {(int(g["position"]), int(g["block"])): g for g in _csv(out / "lens-positions.csv")}


@pytest.mark.parametrize("form", lens.FORMS)
def test_one_position_at_a_time_finds_the_colour_in_the_padding_and_never_in_the_content(grids, form):
    out = grids[0][form]
    grid = _grid(out)
    assert sorted(grid) == [(p, k) for p in POSITIONS for k in BLOCKS]
    groups = {p: g["group"] for (p, _), g in grid.items()}
    assert [p for p in POSITIONS if groups[p] == "content"] == list(range(1, 7))  # "draw a circle in this color"
    passed = [p for p in POSITIONS if float(grid[(p, 2)]["rate"]) == 1.0]
    assert passed and all(groups[p] == "padding" for p in passed)
    assert float(_rates(out)["padding b2"]["rate"]) == 1.0  # the whole padding, a cell of the same sweep
    if form == "diagonal":  # the text after the last block is read by nothing, one position or many
        assert all(float(grid[(p, 5)]["rate_absolute"]) == 0.0 for p in POSITIONS)
    md = (out / "lens-positions.md").read_text().splitlines()
    assert md[0] == "| position | group | b2 | b5 |" and len(md) == 2 + len(POSITIONS)
    for name in ("pass-rate", "colour-distance"):
        assert (out / "plots" / f"lens-positions-{name}.png").is_file()
    assert (out / "grids" / "lens" / f"{TASK}-positions.png").is_file()
    assert "one text position at a time" in (out / "report.html").read_text()


@pytest.mark.parametrize("form", lens.FORMS)
def test_a_position_grid_is_one_compiled_program_over_its_chunks(grids, form):
    _, calls, compiled = grids
    cells = (3 + len(POSITIONS)) * len(BLOCKS)
    assert calls[form] == -(-cells // CHUNK) > 1
    assert compiled[form] <= 1  # 0 when an earlier run in this process compiled the same program


def test_position_range_and_content_pick_the_grid(tmp_path):
    from experiments.lens import single_positions

    content = np.zeros((1, 32), bool)
    content[0, 1:7] = True
    assert single_positions({"per_position": "content"}, content) == list(range(1, 7))
    assert single_positions({"per_position": "padding", "position_range": "5:9"}, content) == [7, 8]
    assert single_positions({"per_position": "all", "position_range": "0,3,31"}, content) == [0, 3, 31]
    assert single_positions({}, content) == []
    with pytest.raises(ValueError, match="position-range"):
        single_positions({"per_position": "all", "position_range": "30:40"}, content)
    with pytest.raises(SystemExit):  # a range without --per-position is refused before any work
        lens.main(["--model", "text-routed", "--position-range", "0:4", "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------------------------------------
# the lens under a knockout


@pytest.fixture(scope="module")
def knocked(tmp_path_factory):
    root = tmp_path_factory.mktemp("knocked")
    runs = {"source ref->text": ("--knockout", "ref->text", "--knockout-on", "source"),
            "both ref->text": ("--knockout", "ref->text", "--knockout-on", "both"),
            "source ref->text[content]": ("--knockout", "ref->text[content]", "--knockout-on", "source"),
            "target text->image": ("--knockout", "text->image", "--knockout-on", "target")}
    out, real = {}, sweep._sample_many
    with pytest.MonkeyPatch.context() as mp:
        for i, (name, extra) in enumerate(runs.items()):
            seen = []
            mp.setattr(sweep, "_sample_many", lambda *a, seen=seen, **k: seen.append(1) or real(*a, **k))
            out[name] = _lens(root / f"run{i}", *extra)
            assert len(seen) == 1  # 3 position groups x 2 blocks, the knockout in every cell: one call
    return out


def test_a_knockout_on_the_source_cuts_the_route_into_the_kept_text(knocked, grids):
    """ref->text on the source: the padding never sees the reference, so it holds no colour."""
    for run in ("source ref->text", "both ref->text"):
        assert float(_rates(knocked[run])["padding b2"]["rate"]) == 0.0
    # ref->text[content] is cut by the organism already: the source, and so the lens, are unchanged.
    assert float(_rates(knocked["source ref->text[content]"])["padding b2"]["rate"]) == 1.0
    assert np.abs(_image(knocked["source ref->text[content]"], "padding-b2.png")
                  - _image(grids[0]["input"], "padding-b2.png")).max() <= PIXEL_TOL


def test_a_knockout_on_the_target_acts_only_on_the_target_s_own_edges(knocked, grids):
    """The target has no reference: with ref->text on both sides only the source is cut, so the
    lens equals the source-only knockout; text->image leaves the target's image nothing of the text."""
    assert np.abs(_image(knocked["both ref->text"], "padding-b2.png")
                  - _image(knocked["source ref->text"], "padding-b2.png")).max() <= PIXEL_TOL
    blind = _rates(knocked["target text->image"])
    assert float(blind["padding b2"]["rate_absolute"]) == 0.0
    assert "unconditional, knockout on target" in blind
    assert (knocked["target text->image"] / "outputs" / "lens" / TASK / "unconditional-knockout.png").is_file()


def test_a_lens_knockout_is_refused_without_its_side_or_with_a_missing_group(tmp_path):
    base = ["--model", "text-routed", "--no-progress", "--colours", "red", "--objects", "circle", "--seeds", "0"]
    for extra in (["--knockout", "ref->text"], ["--knockout-on", "source"],
                  ["--knockout", "ref[1]->text", "--knockout-on", "source"],
                  ["--knockout", "ref->text", "--knockout-on", "target"]):  # cuts nothing: the target has no ref
        with pytest.raises(SystemExit):
            lens.main([*base, *extra, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_heatmap_draws_a_grid_with_missing_cells_and_refuses_a_misshapen_one():
    from experiments import report

    png = report.heatmap_plot([0, 1, 2], ["0 (padding)", "1 (content)"], [[0.0, None, 1.0], [0.5, 0.5, None]],
                              colour_label="share passing", vmin=0.0, vmax=1.0, num_double_blocks=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 rows x 3 blocks"):
        report.heatmap_plot([0, 1, 2], ["a", "b"], [[0.0, 1.0]], colour_label="x")
