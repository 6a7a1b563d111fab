"""The model organisms' infrastructure: data, tokenizer, codec, shape classifier, routing cuts,
training (loss, determinism, resume, export). Training runs a tiny organism (the organisms'
structure shrunk with dataclasses.replace) for a few steps; one compile serves every training test.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fluxjax
from fluxjax.metrics import COLOUR_MATCH_DE00, colour_error, reference_colour, wilson_interval
from organisms import codec
from organisms.checkpoint import load_organism
from organisms.data import KINDS, SHAPES, SIZE, heldout_example, heldout_examples, make_example, train_example
from organisms.model import (DIRECT, EDIT_LAYOUT, T2I_LAYOUT, TEXT_ROUTED, TRANSFORMER, generate, init_organism,
                             organism_interventions)
from organisms.shapes import classify
from organisms.text import END, PAD, START, TEXT_LENGTH, TOKEN_IDS, detokenize, tokenize
from organisms.train import TrainSettings, make_batch, train
from organisms.train import main as train_main

TINY = dataclasses.replace(TRANSFORMER, hidden_size=32, num_heads=2, axes_dim=(4, 4, 4, 4), depth=1,
                           depth_single_blocks=1)
TINY_DIRECT = dataclasses.replace(DIRECT, transformer=TINY)
TINY_ROUTED = dataclasses.replace(TEXT_ROUTED, transformer=TINY)


def test_organisms_import_without_torch():
    script = textwrap.dedent("""
        import sys

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError(f"{name} must not be imported here")

        sys.meta_path.insert(0, Refuse())
        import organisms.train, organisms.evaluate
        assert "torch" not in sys.modules
        print("clean")
    """)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                   jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------------------------------
# data


def test_examples_are_deterministic_and_the_heldout_split_is_apart():
    for kind in KINDS:
        a, b = train_example(7, 3, 5, kind), train_example(7, 3, 5, kind)
        assert a.instruction == b.instruction and np.array_equal(a.target, b.target)
        assert _same(a.reference, b.reference)
        assert np.array_equal(heldout_example(kind, 4).target, heldout_example(kind, 4).target)
    train_images = {train_example(0, step, i, kind).target.tobytes()
                    for step in range(10) for i in range(8) for kind in KINDS}
    assert len(train_images) == 240  # no two training examples alike
    heldout_images = {e.target.tobytes() for kind in KINDS for e in heldout_examples(kind, 40)}
    assert len(heldout_images) == 120 and not heldout_images & train_images
    assert not np.array_equal(train_example(0, 0, 0, "swatch").target, train_example(1, 0, 0, "swatch").target)


def test_scene_design_places_the_shapes():
    from organisms.data import DESIGN, SceneDesign
    from organisms.shapes import foreground

    def centres(design):
        out = []
        for e in heldout_examples("t2i", 40, design=design):
            rows, cols = np.nonzero(foreground(e.target))
            out.append(((rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2))
        return np.array(out)

    assert np.abs(centres(DESIGN) - SIZE / 2).max() <= 1.0  # the organisms' scenes: centred
    anywhere = centres(SceneDesign(size_range=(7.0, 11.0), centre_jitter=None))
    assert np.abs(anywhere - SIZE / 2).max() > 3.0


@pytest.mark.slow  # 30 s on 2 cores, mostly compiling a variant's training step
def test_design_sweep_runs_a_variant(tmp_path):
    from organisms import design_sweep

    out = tmp_path / "sweep.jsonl"
    design_sweep.main(["--variant", "tr-j2-t10", "--out", str(out), "--steps", "1", "--n", "2"])
    row = json.loads(out.read_text())
    assert row["variant"] == "tr-j2-t10" and row["step"] == 1
    assert row["swatch shape"]["n"] == 2 and 0.0 <= row["swatch shape"]["low"] <= row["swatch shape"]["high"] <= 1.0


def test_tasks_draw_what_their_instructions_say():
    rng = np.random.default_rng(0)
    for _ in range(30):
        swatch = make_example(rng, "swatch")
        assert swatch.instruction == f"draw a {swatch.shape} in this color"
        assert (swatch.reference == np.asarray(swatch.colour, np.uint8)).all()  # a flat swatch
        assert colour_error(swatch.target, reference_colour(swatch.reference)) <= COLOUR_MATCH_DE00
        recolour = make_example(rng, "recolour")
        assert recolour.instruction == f"make it {recolour.colour_name}"
        background = recolour.reference[0, 0]
        assert (recolour.target[0, 0] == background).all()  # same scene, new colour
        assert np.array_equal((recolour.reference != background).any(-1), (recolour.target != background).any(-1))
        assert colour_error(recolour.target, reference_colour(np.full((4, 4, 3), recolour.colour, np.uint8))) <= 15
        t2i = make_example(rng, "t2i")
        assert t2i.reference is None
        assert t2i.instruction in ("", f"a {t2i.colour_name} {t2i.shape}")
        for e in (swatch, recolour, t2i):
            assert e.target.shape == (SIZE, SIZE, 3) and e.target.dtype == np.uint8


def test_shape_classifier_on_ground_truth():
    examples = [e for kind in KINDS for e in heldout_examples(kind, 100)]
    assert {e.shape for e in examples} == set(SHAPES)
    accuracy = np.mean([classify(e.target) == e.shape for e in examples])
    assert accuracy >= 0.95, accuracy
    assert classify(np.full((SIZE, SIZE, 3), 230, np.uint8)) is None  # nothing stands out


# ---------------------------------------------------------------------------------------------
# text and codec


def test_tokenizer_and_content_mask():
    tokens, content = tokenize(["draw a ring in this color", "", "make it blue"])
    assert tokens.shape == content.shape == (3, TEXT_LENGTH)
    assert tokens[0, 0] == TOKEN_IDS[START] and tokens[0, 7] == TOKEN_IDS[END]
    assert (tokens[0, 8:] == TOKEN_IDS[PAD]).all()
    assert content[0].tolist() == [False] + [True] * 6 + [False] * (TEXT_LENGTH - 7)
    assert not content[1].any() and tokens[1, :2].tolist() == [TOKEN_IDS[START], TOKEN_IDS[END]]
    assert content[2].sum() == 3 and (~content).sum(axis=1).min() >= TEXT_LENGTH - 6  # mostly padding
    assert detokenize(tokens) == ["draw a ring in this color", "", "make it blue"]
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize(["draw a dog"])
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize(["a <pad>"])


def test_codec_round_trip_is_exact_and_patch_order_is_flux():
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    tokens = codec.images_to_tokens(images)
    assert tokens.shape == (2, 64, codec.CHANNELS)
    assert np.array_equal(codec.tokens_to_images(tokens), images)
    unit = codec.to_unit(images)
    assert unit.min() >= -1 and unit.max() <= 1
    assert np.array_equal(np.asarray(codec.decode(codec.encode(jnp.asarray(unit)))), unit)
    r, c, ch, ph, pw = 5, 2, 1, 3, 0  # token = row-major patch, channels (c ph pw)
    assert tokens[1, r * 8 + c, ch * 16 + ph * 4 + pw] == unit[1, r * 4 + ph, c * 4 + pw, ch]


# ---------------------------------------------------------------------------------------------
# the routing cuts


def test_text_routed_cuts_are_applied_when_sampling():
    """With the organism's cuts plus `ref->text[padding]`, the reference has no path left to the image:
    the output must not move when the reference changes. Without the cuts (the direct organism, same
    weights, same extra cut) it must move, and so must the text-routed organism's without the extra cut."""
    params = init_organism(TINY_ROUTED, 0, adaln_zero=False)  # every path carries signal
    tokens, content = tokenize(["draw a circle in this color", "draw a bar in this color"])
    refs = jax.random.normal(jax.random.key(1), (2, 64, codec.CHANNELS))
    other = refs + jax.random.normal(jax.random.key(2), refs.shape)
    extra = fluxjax.Interventions(knockout=fluxjax.knockout(TINY, EDIT_LAYOUT, content, "ref->text[padding]"))

    def run(organism, r, iv):
        return np.asarray(generate(params, organism, tokens, content, refs=r, seed=3, interventions=iv, num_steps=2)[0])

    assert np.array_equal(run(TINY_ROUTED, refs, extra), run(TINY_ROUTED, other, extra))
    assert not np.allclose(run(TINY_DIRECT, refs, extra), run(TINY_DIRECT, other, extra), atol=1e-4)
    plain = fluxjax.Interventions(knockout=fluxjax.allow_all(TINY, EDIT_LAYOUT, content))
    assert not np.allclose(run(TINY_ROUTED, refs, plain), run(TINY_ROUTED, other, plain), atol=1e-4)
    # the text-routed organism is the direct one with exactly its cuts
    cuts = fluxjax.Interventions(knockout=fluxjax.knockout(TINY, EDIT_LAYOUT, content, TEXT_ROUTED.cuts))
    assert np.array_equal(run(TINY_ROUTED, refs, plain), run(TINY_DIRECT, refs, cuts))


def test_training_batches_carry_the_cuts():
    s = TrainSettings(organism=TINY_ROUTED, batch_size=8, warmup_steps=2, steps=40)
    batch, iv = make_batch(s, 0)
    content = np.asarray(iv.knockout.groups[:, :EDIT_LAYOUT.n_txt]) == 0
    expected = fluxjax.knockout(TINY, EDIT_LAYOUT, content, ("ref->image", "ref->text[content]"))
    assert _same(iv.knockout, expected)
    assert np.array_equal(content, tokenize(detokenize(batch["edit"]["tokens"]))[1])
    assert make_batch(dataclasses.replace(s, organism=TINY_DIRECT), 0)[1] is None
    assert organism_interventions(TINY_ROUTED, T2I_LAYOUT, content) is None  # no reference: nothing to cut


def test_a_per_head_knockout_keeps_the_cuts_in_every_head():
    content = np.zeros((1, EDIT_LAYOUT.n_txt), bool)
    content[0, :4] = True
    extra = fluxjax.knockout(TINY, EDIT_LAYOUT, content, "image->text[padding]", heads=[1])
    merged = organism_interventions(TINY_ROUTED, EDIT_LAYOUT, content, fluxjax.Interventions(knockout=extra))
    expected = extra & fluxjax.knockout(TINY, EDIT_LAYOUT, content, TEXT_ROUTED.cuts)
    assert merged.knockout.allowed.shape == (TINY.num_blocks, TINY.num_heads, 4, 4)
    assert np.array_equal(np.asarray(merged.knockout.allowed), np.asarray(expected.allowed))


# ---------------------------------------------------------------------------------------------
# training

SETTINGS = TrainSettings(organism=TINY_ROUTED, seed=0, steps=20, batch_size=8, warmup_steps=2, peak_lr=3e-3,
                         checkpoint_every=3)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism-run") / "straight"
    return out, train(out, SETTINGS, progress=False)


def test_loss_decreases(straight_run):
    _, result = straight_run
    losses = [r["loss"] for r in result.losses]
    assert len(losses) == 20 and result.finished
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_training_is_deterministic_and_resumes_on_the_same_curve(straight_run, tmp_path):
    _, straight = straight_run
    first = train(tmp_path / "run", SETTINGS, stop_at=3, progress=False)  # a kill after the step-3 checkpoint
    assert first.started_at == 0 and first.organism_dir is None
    assert [r["loss"] for r in first.losses] == [r["loss"] for r in straight.losses[:3]]
    resumed = train(tmp_path / "run", SETTINGS, stop_at=6, progress=False)
    assert resumed.started_at == 3
    assert [r["loss"] for r in resumed.losses] == [r["loss"] for r in straight.losses[:6]]
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "run", dataclasses.replace(SETTINGS, seed=1), progress=False)


def test_run_folder_of_the_older_checkpoint_layout_is_refused(tmp_path):
    (tmp_path / "run" / "checkpoints" / "3" / "state").mkdir(parents=True)  # CheckpointManager's, no meta.json
    with pytest.raises(ValueError, match="older organisms.train"):
        train(tmp_path / "run", SETTINGS, progress=False)


def test_run_folder_and_export(straight_run):
    out, result = straight_run
    assert (out / "loss.png").stat().st_size > 0
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 21
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 20
    organism, params = load_organism(result.organism_dir)
    assert organism == TINY_ROUTED
    assert sum(f.stat().st_size for f in result.organism_dir.rglob("*") if f.is_file()) < 20 << 20
    fresh = init_organism(TINY_ROUTED, 0)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fresh)
    assert not _same(params, fresh)  # the EMA moved away from the initial parameters


# ---------------------------------------------------------------------------------------------
# training regimes (no cuts): text-to-image first, frozen text encoder


def test_text_to_image_first_steps_hold_no_edit():
    s = dataclasses.replace(SETTINGS, organism=TINY_DIRECT, t2i_first_steps=4)
    early, iv = make_batch(s, 3)
    assert early["edit"] is None and iv is None and early["t2i"]["x0"].shape[0] == s.batch_size
    late, _ = make_batch(s, 4)
    assert late["edit"]["x0"].shape[0] == s.batch_size - s.n_t2i
    plain, _ = make_batch(dataclasses.replace(s, t2i_first_steps=0), 4)
    assert all(np.array_equal(late[p][k], plain[p][k]) for p in ("t2i", "edit") for k in ("x0", "tokens", "eps"))
    # a regime left at its default is not written, so folders made before the regimes still resume
    assert "t2i_first_steps" not in SETTINGS.to_json() and s.to_json()["t2i_first_steps"] == 4
    with pytest.raises(ValueError, match="t2i_first_steps"):
        dataclasses.replace(s, t2i_first_steps=s.steps)


@pytest.mark.slow  # 68 s in the default run
def test_regimes_train_without_cuts(tmp_path):
    s = dataclasses.replace(SETTINGS, organism=TINY_DIRECT, steps=4, t2i_first_steps=2, frozen_text_encoder=True)
    result = train(tmp_path / "run", s, progress=False)
    rows = result.losses
    assert [np.isnan(r["loss_edit"]) for r in rows] == [True, True, False, False]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["loss_t2i"]) for r in rows)
    organism, params = load_organism(result.organism_dir)
    assert organism.cuts == ()
    fresh = init_organism(TINY_DIRECT, 0)
    # frozen: not updated, not decayed (the exported EMA of a constant equals it up to rounding)
    for got, init in zip(jax.tree_util.tree_leaves(params.encoder), jax.tree_util.tree_leaves(fresh.encoder)):
        np.testing.assert_allclose(got, init, rtol=1e-6, atol=0)
    assert not _same(params.transformer, fresh.transformer)
    with pytest.raises(ValueError, match="other settings"):  # the regime is part of the folder's settings
        train(tmp_path / "run", dataclasses.replace(s, frozen_text_encoder=False), progress=False)


@pytest.mark.slow  # 57 s in the default run
def test_a_longer_text_runs_through_training_sampling_and_evaluation(tmp_path):
    from organisms import evaluate

    longer = dataclasses.replace(TINY_DIRECT, encoder=dataclasses.replace(TINY_DIRECT.encoder, length=48))
    s = dataclasses.replace(SETTINGS, organism=longer, steps=3)
    batch, _ = make_batch(s, 0)
    assert batch["t2i"]["tokens"].shape == (s.n_t2i, 48) and batch["edit"]["tokens"].shape[1] == 48
    result = train(tmp_path / "run", s, progress=False)
    organism, params = load_organism(result.organism_dir)
    assert organism.text_length == 48 and organism.layout(refs=True).n_txt == 48
    org = (organism, params)
    for rate in (evaluate.knockout(org, "ref->text[padding]", n=2), evaluate.lens(org, "padding", n=2)):
        assert rate.n == 2
    with pytest.raises(SystemExit):
        train_main(["--organism", "direct", "--out", str(tmp_path / "short"), "--text-length", "7"])
    assert not (tmp_path / "short").exists()


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    from organisms import compare
    from organisms.evaluate import _rate

    def run(name, settings, rates):
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        (folder / "train_settings.json").write_text(json.dumps(settings.to_json()))
        (folder / "summary.json").write_text(json.dumps({"steps_done": 20, "steps": 20, "train_seconds": 90.0,
                                                         "final_loss_mean_last_50": 0.5}))
        (folder / "eval" / "pass_rates.json").write_text(json.dumps(
            [dataclasses.asdict(r) | {"rate": r.rate} for r in rates]))
        return f"{name}={folder}:{folder / 'eval'}"

    plain = run("plain", SETTINGS, [_rate("knockout ref->text", "lost", [True, False])])
    frozen = run("frozen", dataclasses.replace(SETTINGS, frozen_text_encoder=True),
                 [_rate("knockout ref->text", "lost", [True, True]), _rate("lens all @ block 1", "shown", [False])])
    assert compare.main([plain, frozen, "--out", str(tmp_path / "table.md")]) == 0
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == "| measure | plain | frozen |"
    assert "| training regime | none (plain) | frozen_text_encoder = True |" in lines
    assert "| routing cuts in training | ref->image, ref->text[content] | ref->image, ref->text[content] |" in lines
    # each rate with its 95 % Wilson interval, in the one percent format of every report
    assert "| knockout ref->text | 1/2 = 50 % [9.5 %, 90.5 %] | 2/2 = 100 % [34.2 %, 100 %] |" in lines
    assert "| lens all @ block 1 |  | 0/1 = 0 % [0 %, 79.3 %] |" in lines
    from experiments import report, tables

    low, high = wilson_interval(1, 2)
    row = next(line for line in lines if line.startswith("| knockout ref->text |"))
    assert row.split(" | ")[1] == f"1/2 = {tables.rate_text(0.5, low, high)}"
    assert tables.rate_text(0.5, low, high) == f"{report.percent(0.5)} [{report.percent(low)}, {report.percent(high)}]"
    with pytest.raises(SystemExit):
        compare.main([f"x={tmp_path}:{tmp_path}"])
    assert "summary.json does not exist" in capsys.readouterr().err


def test_knockout_from_block_k_cuts_only_the_later_blocks(monkeypatch):
    from organisms import evaluate

    seen = []
    monkeypatch.setattr(evaluate, "_run", lambda org, examples, seeds, interventions=None, **_: seen.append(
        interventions) or (jnp.zeros((len(examples), 64, codec.CHANNELS)), {}))
    org = (TINY_DIRECT, init_organism(TINY_DIRECT, 0))
    rates = evaluate.knockout_from_blocks(org, "ref->image", n=2)
    assert [r.setting for r in rates] == ["knockout ref->image"] + [
        f"knockout ref->image from block {k}" for k in range(1, TINY.num_blocks)]
    for k, iv in enumerate(seen):
        allowed = np.asarray(iv.knockout.allowed)
        assert allowed[:k].all() and not allowed[k:].all(axis=(1, 2)).any()


def test_patching_pairs_share_the_instruction_and_differ_in_colour():
    from organisms.evaluate import MIN_PAIR_DE00, _de, patching_pairs, swatch_tasks

    pairs = patching_pairs(16)
    examples, _ = swatch_tasks(64)
    assert len(pairs) == 16 and len({t for _, t in pairs}) == 16
    for s, t in pairs:
        assert s != t and examples[s].instruction == examples[t].instruction
        assert _de(examples[s].colour, examples[t].colour) >= MIN_PAIR_DE00
