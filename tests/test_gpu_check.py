"""`python -m benchmarks.gpu_check --tiny`: the prepared GPU script runs end to end on CPU."""

from __future__ import annotations

import pytest

from benchmarks import gpu_check

# float32 and shared weights: fluxjax and diffusers differ by float32 rounding orders only (6.6e-7
# to 7.5e-7 measured on the tiny model; the timestep sinusoid's floor, 5e-5, bounds it).
TINY_PARITY = 5e-5


def test_tiny_sections_before_the_rehearsal(tmp_path):
    record = gpu_check.main(["--tiny", "--reps", "1", "--sections", "timing,interventions,parity",
                             "--out", str(tmp_path / "tiny.json")])
    assert (tmp_path / "tiny.json").exists()
    assert set(record["parity"]) == {"forward", "knockout ref->text", f"{gpu_check.STEPS}-step edit (latents)"}
    assert all(v <= TINY_PARITY for v in record["parity"].values()), record["parity"]
    rows = record["interventions"]["rows"]
    assert set(rows) == {"plain", "knockout ref->text"} and all(r["steady_s"] > 0 for r in rows.values())
    assert rows["plain"]["xla_memory"]["peak_bytes"] > 0
    assert {"fluxjax", "diffusers"} <= set(record["timing"])


@pytest.mark.slow
def test_tiny_rehearsal_end_to_end(tmp_path):
    record = gpu_check.main(["--tiny", "--reps", "1", "--sections", "rehearsal", "--work", str(tmp_path)])
    r = record["rehearsal"]
    assert set(r["experiments"]) == {"lens", "study-lens", "knockout", "drop", "patching"}  # run_all's experiments
    assert all(x["cells"] > 0 and x["wall_s"] > 0 for x in r["experiments"].values())
    assert r["diffusers"]["per_cell_s"] > 0 and r["ratio_to_study_way"] > 0
    assert (tmp_path / "run" / "report.html").exists()
