"""docs/tour.py, the notebook-shaped walk through the five experiments, runs top to bottom."""

import runpy
from pathlib import Path

import pytest
from PIL import Image

TOUR = Path(__file__).resolve().parents[2] / "docs" / "tour.py"


@pytest.mark.slow  # 40 s on 2 cores; the experiments it walks through are tested in test_experiments.py
def test_the_tour_runs_and_shows_a_grid_per_experiment():
    text = TOUR.read_text()
    assert text.startswith("# ---\n# jupyter:") and text.count("# %%") >= 10  # jupytext's percent format
    namespace = runpy.run_path(str(TOUR), run_name="tour")
    runs = namespace["RUNS"]
    for run, prefix, name in ((namespace["lens_runs"]["diagonal"], "lens", "solid_red_circle_s0"),
                              (namespace["ko_runs"]["text-routed"], "knockout", "solid_red_circle_s0"),
                              (namespace["drop_run"], "drop", "solid_red_circle_s0"),
                              (namespace["patch_run"], "patching", "solid_blue_circle_s0__solid_red_circle_s0")):
        assert Path(run).parent == runs and (run / "report.html").is_file()
        assert isinstance(namespace["grid"](run, prefix, name), Image.Image)
    # What the tour tells the reader, checked: the padding carries the colour at block 2, the content does not.
    lens_rates = namespace["rates"](namespace["lens_runs"]["diagonal"], "lens")
    assert float(lens_rates["padding b2"][0]) == 1.0 and float(lens_rates["content b2"][0]) == 0.0
    assert float(lens_rates["all b5"][1]) == 0.0
