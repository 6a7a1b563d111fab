"""docs/demo.py, the notebook of three interventions on a model folder (the study's demo), runs
top to bottom as a notebook (jupytext + nbclient) on a tiny random model folder and shows a grid
per section."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "docs" / "demo.py"


@pytest.mark.slow  # 52 s in the default run
def test_the_demo_notebook_runs_on_a_model_folder(tiny_model_folder, tmp_path, monkeypatch):
    import jupytext
    import nbclient

    text = DEMO.read_text()
    assert text.startswith("# ---\n# jupyter:") and "MODEL = os.environ.get(" in text
    notebook = jupytext.reads(text, fmt="py:percent")
    monkeypatch.setenv("FLUXJAX_DEMO_MODEL", str(tiny_model_folder))
    monkeypatch.setenv("FLUXJAX_DEMO_SIZE", "64")
    monkeypatch.setenv("FLUXJAX_CACHE", str(tmp_path / "cache"))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(DEMO.parent.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", ())
              if "image/png" in o.get("data", {})]
    assert len(images) == 4  # the baseline edit, the lens, the knockouts, the patching
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", ()) if o.get("output_type") == "stream")
    assert "2 double + 3 single blocks" in printed
