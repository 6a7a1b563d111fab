"""95 % intervals on every pass rate: the Wilson interval against published values and its closed
forms, the paired interval of a rate against its control (Bonett and Price's adjusted Wald) by its
closed form at the extremes, its properties and its coverage, and the intervals in the pass-rate
CSVs, the report tables and the study's table (which marks whether the study's number lies inside
ours)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from experiments import report, runs, study, tables
from fluxjax import metrics

Z2 = metrics.Z95 ** 2


@pytest.mark.parametrize("passed, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in
    # Medicine 17: 857-872, Table II, method 3 (the score interval without continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_intervals_match_published_values(passed, n, low, high):
    got = metrics.wilson_interval(passed, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_intervals_at_the_ends_and_the_middle():
    for n in (1, 2, 8, 90, 450):
        assert metrics.wilson_interval(0, n) == pytest.approx((0.0, Z2 / (n + Z2)))  # 0 / n: [0, z^2 / (n + z^2)]
        assert metrics.wilson_interval(n, n) == pytest.approx((n / (n + Z2), 1.0))
        assert metrics.wilson_interval(0, n)[0] == 0.0 and metrics.wilson_interval(n, n)[1] == 1.0
    low, high = metrics.wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(0.5268, abs=1e-4)
    # at the organisms' n = 8, how wide: 8 / 8 is [68 %, 100 %], 4 / 8 is [22 %, 78 %]
    assert metrics.wilson_interval(8, 8)[0] == pytest.approx(0.6756, abs=1e-4)
    assert metrics.wilson_interval(4, 8) == pytest.approx((0.2152, 0.7848), abs=1e-4)
    assert metrics.wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="passes must lie"):
        metrics.wilson_interval(3, 2)


def test_the_paired_interval_of_a_rate_against_its_control():
    pairs = [(True, False)] * 6 + [(True, True)] * 2 + [(False, False)] * 2  # 8 / 10 against 2 / 10
    diff, low, high = metrics.paired_difference_interval(pairs)
    assert diff == pytest.approx(0.6) and low < 0.6 < high and -1 <= low and high <= 1
    # swapping the two measures mirrors the interval
    mirrored = metrics.paired_difference_interval([(b, a) for a, b in pairs])
    assert mirrored == pytest.approx((-diff, -high, -low))
    # no discordant pair: no difference, and an interval of width (one pseudo-pair of each kind of
    # disagreement): +-z sqrt(2 / (n + 2)^2)
    same = metrics.paired_difference_interval([(True, True)] * 5 + [(False, False)] * 5)
    assert same == pytest.approx((0.0, -metrics.Z95 * np.sqrt(2) / 12, metrics.Z95 * np.sqrt(2) / 12))
    # every pair disagrees one way (8 of 8 against 0 of 8): 0.8 -+ z sqrt((1 - 0.64) / 10), cut at 1
    d, lo, hi = metrics.paired_difference_interval([(True, False)] * 8)
    assert d == 1.0 and lo == pytest.approx(0.8 - metrics.Z95 * 0.6 / np.sqrt(10)) and hi == 1.0
    assert metrics.paired_difference_interval([]) is None


def test_the_paired_interval_covers_the_true_difference_95_times_in_100():
    """Correlated pairs (a rate and its control on the same tasks) with a known difference: the
    interval holds it in 95 % of samples, within the Monte Carlo error (coverage of 4000 samples
    has a standard error of 0.35 %), and is narrower than the unpaired one would be."""
    rng = np.random.default_rng(0)
    # joint probabilities of (first, second): both 0.45, first only 0.25, second only 0.05, neither 0.25
    p = np.array([0.45, 0.25, 0.05, 0.25])
    truth = (p[0] + p[1]) - (p[0] + p[2])
    covered = 0
    for _ in range(4000):
        cells = rng.choice(4, size=60, p=p)
        pairs = [(c in (0, 1), c in (0, 2)) for c in cells]
        _, low, high = metrics.paired_difference_interval(pairs)
        covered += low <= truth <= high
    assert 0.93 <= covered / 4000 <= 0.97


def _rows():
    """A knockout's rows on four tasks: the control (the baseline edit) and ref->text."""
    rows = []
    for task, edit_shows, lost in (("a", True, True), ("b", True, True), ("c", True, False), ("d", False, True)):
        rows.append({"task": task, "setting": "no knockout (edit)", "judge": None, "pass": None,
                     "pass_absolute": edit_shows, "baseline_misses": None})
        rows.append({"task": task, "setting": "ref->text @ all", "judge": "lost", "pass": lost and edit_shows,
                     "pass_absolute": lost, "baseline_misses": not edit_shows})
    return rows


def test_the_pass_rate_csv_and_report_table_show_every_interval(tmp_path):
    with runs.open_run(tmp_path, "run", {"test": "intervals"}, argv=["test"]) as run:
        items = tables.write_tables(run, "knockout", _rows(), ["pass_absolute"], text="t", rates_title="Rates",
                                    control="no knockout (edit)")
    with open(run.path / "knockout-pass-rates.csv", newline="") as f:
        rates = {r["setting"]: r for r in csv.DictReader(f)}
    cut = rates["ref->text @ all"]
    # the study's rule over every task: 2 / 4; the strict rule leaves task d out: 2 / 3
    assert (cut["n"], cut["passed"], cut["n_strict"], cut["passed_strict"], cut["excluded"]) == ("4", "2", "3", "2",
                                                                                                  "1")
    assert (float(cut["rate_low"]), float(cut["rate_high"])) == pytest.approx(metrics.wilson_interval(2, 4), abs=1e-4)
    assert (float(cut["rate_strict_low"]), float(cut["rate_strict_high"])) == \
        pytest.approx(metrics.wilson_interval(2, 3), abs=1e-4)
    # the output alone (colour absent in 3 of 4) against the edit (colour present in 3 of 4), paired by task
    pairs = [(False, True), (False, True), (True, True), (False, False)]  # (colour present under the cut, in the edit)
    diff = metrics.paired_difference_interval(pairs)
    assert float(cut["vs_control"]) == pytest.approx(diff[0]) and cut["control"] == "no knockout (edit)"
    assert (float(cut["vs_control_low"]), float(cut["vs_control_high"])) == pytest.approx(diff[1:], abs=1e-4)
    html = report.render_html(run.path, "t", [report.Section("s", items)])
    low, high = metrics.wilson_interval(2, 4)
    pct = report.percent  # every report's one percent format
    assert f"50 % [{pct(low)}, {pct(high)}]" in html  # the study's rule
    low, high = metrics.wilson_interval(2, 3)
    assert f"66.7 % [{pct(low)}, {pct(high)}] (n = 3)" in html  # the strict rule, beside it
    assert "shown vs control" in html and "-50 pp [" in html


def test_the_studys_table_marks_whether_its_number_lies_in_our_interval(tmp_path):
    rows = []
    for i in range(8):  # ref->text lost in 6 of 8 ([41 %, 93 %]: the study's 86 % inside); content in 8 of 8
        rows += [{"task": f"t{i}", "setting": "ref->text @ all", "judge": "lost", "pass": i < 6, "pass_absolute": i < 6,
                  "baseline_misses": False},
                 {"task": f"t{i}", "setting": "ref->text[content] @ all", "judge": "lost", "pass": True,
                  "pass_absolute": True, "baseline_misses": False}]
    with runs.open_run(tmp_path, "run", {"test": "study table"}, argv=["test"]) as run:
        run.write_derived("knockout-pass-rates.csv", metrics.rows_to_csv(tables.pass_rates(rows)))
    settings = {"study": "colour", "lens": {"blocks": [3], "form": "diagonal"}, "knockout": {},
                "patching": {"blocks": [3]}}
    table = {r["cell"]: r for r in study.rows(run.path, settings)}
    text = table["Knockout ref->text, every block"]
    low, high = metrics.wilson_interval(6, 8)
    assert text["study"] == "86 % lost (n = 320)" and text["study inside"] == "yes"
    low, high = round(low, 4), round(high, 4)  # as the pass-rates CSV stores them
    assert text["this run"] == f"75 % lost [{report.percent(low)}, {report.percent(high)}] (n = 8)"
    content = table["Knockout ref->text[content], every block"]
    assert content["study"] == "5 % lost (n = 320)" and content["study inside"] == "no"  # 8 / 8: [68 %, 100 %]
    assert table["T2I Lens, all positions (diagonal form, block 3)"]["study inside"] is None  # no run of it here
    assert study.study_rate("0.4 %") == pytest.approx(0.004) and study.study_rate("-") is None
