"""The attention-flow experiment (`experiments.flow`): edges from the [G, G] tables, and the command
end to end on a tiny model folder, beside the knockout's cells of the same run folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import fluxjax
from experiments import flow, knockout

LAYOUT = fluxjax.TokenLayout(n_txt=6, img_grid=(2, 2), ref_grids=((1, 2),))
CONTENT = np.array([[False, True, True, True, False, False]])  # 3 content, 3 padding tokens


def test_edge_flow_reads_the_tables_the_knockouts_way():
    """'A->B': B's queries reading A's keys, summed over A's groups, averaged over B's tokens."""
    G = LAYOUT.num_groups
    table = np.zeros((G, G))
    table[1, 3] = 0.6  # text[padding] queries on ref[0]
    table[0, 3] = 0.2  # text[content] queries on ref[0]
    table[2, 0], table[2, 1] = 0.1, 0.3  # image queries on content, padding
    assert flow.edge_flow(table, LAYOUT, CONTENT, "ref->text[padding]") == pytest.approx(0.6)
    assert flow.edge_flow(table, LAYOUT, CONTENT, "ref->text") == pytest.approx((3 * 0.2 + 3 * 0.6) / 6)
    assert flow.edge_flow(table, LAYOUT, CONTENT, "text->image") == pytest.approx(0.4)
    assert flow.edge_flow(table, LAYOUT, CONTENT, "image->ref") == pytest.approx(0.0)
    none = np.zeros((1, LAYOUT.n_txt), bool)  # no content tokens: that edge has no queries
    assert np.isnan(flow.edge_flow(table[None], LAYOUT, none, "ref->text[content]")).all()
    assert set(flow.EDGES) >= set(knockout.MAIN_SETTINGS) | set(knockout.OTHER_SETTINGS)


@pytest.mark.slow
def test_flow_command(tiny_model_folder, tmp_path):
    """The command on a tiny model folder: the CSV, the arrays, the heatmaps and the per-token maps.
    (Beside the knockouts, in run_all's report: tests/test_experiments.py.)"""
    out = tmp_path / "run"
    assert flow.main(["--model", tiny_model_folder, "--cache", str(tmp_path / "cache"), "--size", "64", "--colours",
                      "red,blue", "--objects", "ball", "--seeds", "0", "--no-progress", "--out", str(out),
                      "--token-blocks", "1"]) == 0
    with open(out / "flow-edges.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n = 5  # the tiny folder's blocks
    assert len(rows) == 2 * n * len(flow.EDGES)
    assert all(0.0 <= float(r["mass"]) <= 1.0 + 1e-6 for r in rows if r["mass"])
    cell = out / "outputs" / "flow" / "solid_red_ball_s0"
    mass = np.load(cell / "mass.npy")  # [steps, blocks, heads, G, G]
    assert mass.shape[1:] == (n, 2, 4, 4)
    rows_read = ~np.isnan(mass).any(-1)  # a query group without tokens is NaN
    np.testing.assert_allclose(mass.sum(-1)[rows_read], 1.0, atol=1e-5)
    assert (cell / "map-b1-ref.png").is_file() and (cell / "map-b1-text.padding.png").is_file()
    html = (out / "report.html").read_text()
    assert "Flow per edge beside its knockout" in html and "plots/flow-mass.png" in html
    assert "No knockout cells" in html
    assert json.loads((out / "config.json").read_text())["settings"]["token_blocks"] == [1]
