"""experiments.probe on a store whose answer is known: the class is written into one padding
position at one block and step, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import probe
from experiments import store as storelib

N, CLASSES, T, D = 48, 4, 6, 16
CONTENT = 2  # positions 0, 1 are the instruction's; 2..5 padding
CARRIER = 4  # the padding position that carries the class, at block 1 and step 1


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = [i % CLASSES for i in range(N)]
    colours = ["red", "green", "blue", "yellow"]
    means = 3.0 * rng.standard_normal((CLASSES, D))
    tasks = [f"t{i:02d}" for i in range(N)]
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    sites = {"b0.text.output": (T, D), "b1.text.output": (T, D), "b1.image.output": (3, D)}
    store = storelib.create(path, tasks=tasks, sites=sites, steps=[0, 1], dtype=np.float32, text_tokens=T,
                            chunk_tasks=16, attrs={"labels": {t: {"colour": colours[c], "lab": [10.0 * c, float(c), -float(c)]}
                                                              for t, c in zip(tasks, y)},
                                                   "tokens": {"text": T, "image": 3, "reference": 0},
                                                   "model": {"double_blocks": 1}})
    content = np.zeros((N, T), bool)
    content[:, :CONTENT] = True
    for index, rows in enumerate(store.chunks()):
        values = {name: rng.standard_normal((len(rows), 2, tokens, D)).astype(np.float32)
                  for name, (tokens, _) in sites.items()}
        values["b1.text.output"][:, 1, CARRIER] += means[y[rows.start:rows.stop]]
        store.write_chunk(index, values, content[rows.start:rows.stop])
    return store


def test_probe_finds_the_carrier_and_nothing_else(known):
    rows = probe.probe_store(known, name="edit", position_steps="all")
    by = {(r["site"], r["step"], r["group"]): r for r in rows}
    chance = 1 / CLASSES
    assert {r["n"] for r in rows} == {N} and {r["chance"] for r in rows} == {chance}
    for key in [("b1.text.output", 1, f"p{CARRIER}"), ("b1.text.output", 1, "padding")]:
        assert by[key]["accuracy"] >= 0.9 and by[key]["low"] > 2 * chance, key
        assert by[key]["lab_r2"] > 0.5, key
        assert by[key]["shuffled_accuracy"] <= 0.5, key  # the control: labels shuffled among the tasks
    carriers = {("b1.text.output", 1, f"p{CARRIER}"), ("b1.text.output", 1, "padding")}
    others = [r["accuracy"] for key, r in by.items() if key not in carriers]
    assert max(others) <= 0.5 and abs(np.mean(others) - chance) < 0.05  # noise alone: at chance, n = 48 each
    assert by[("b1.image.output", 1, "all")]["stream"] == "image"
    assert {k[2] for k in by if k[0] == "b0.text.output"} == {"content", "padding", *(f"p{p}" for p in range(T))}


def test_probe_command_writes_its_report(known, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out relative to the working directory
    assert probe.main([str(known.path), "--baseline", str(known.path), "--out", "p", "--positions", "3:5"]) == 0
    printed = capsys.readouterr().out
    assert "| edit | b1.text.output | padding | 48 |" in printed
    for name in ("probe.csv", "probe.md", "report.html", "plots/probe-edit-groups-step1.png", "plots/probe-edit-groups-step0.png", "plots/probe-t2i-steps.png"):
        assert (tmp_path / "p" / name).is_file(), name
    header, *lines = (tmp_path / "p" / "probe.csv").read_text().splitlines()
    groups_per_text_site = 2 * 2 + 2 * 2  # content and padding at both steps, p3 and p4 at the first and last
    assert len(lines) == 2 * (2 * groups_per_text_site + 2)  # two stores; two text sites and one image site


def test_probe_refuses_what_it_cannot_probe(known, tmp_path):
    with pytest.raises(ValueError, match="no 'shape' label"):
        probe.probe_store(known, name="edit", label="shape")
    with pytest.raises(ValueError, match="out of 0..5"):
        probe.parse_positions("4,9", T)


@pytest.mark.slow
def test_text_routed_padding_carries_the_colour(tmp_path):
    """The text-routed organism (240 tasks, 8 colours): the padding mean gives the colour at every
    block (the lens finds it there); shuffled labels and the run without a reference stay near chance."""
    from experiments import collect

    for name, extra in (("edit", []), ("t2i", ["--no-reference"])):
        assert collect.main(["--model", "text-routed", "--keep-steps", "last", "--no-progress",
                             "--out", str(tmp_path / name), *extra]) == 0
    rows = [row for name in ("edit", "t2i") for row in probe.probe_store(
        storelib.Store(tmp_path / name / "collect.zarr"), name=name, positions="none")]
    assert len({r["site"] for r in rows}) == 6 and {r["n"] for r in rows} == {240}
    for r in rows:
        if r["store"] == "edit" and r["group"] == "padding":
            assert r["accuracy"] >= 0.95, r
        assert r["shuffled_accuracy"] <= 0.25, r  # chance 12.5 %
        if r["store"] == "t2i":
            assert r["accuracy"] <= 0.25, r
