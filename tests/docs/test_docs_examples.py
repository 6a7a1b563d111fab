"""Every example of the README and docs/ runs, so that none can break unnoticed.

Each fenced block of README.md and docs/*.md is listed in EXAMPLES by its file and first line, with
how it runs:

    python   run as written, the blocks of one file in order in one namespace, in a scratch
             directory (not the checkout) holding the images they name
    shell    every command run as written, in the scratch directory
    check    commands written for a real FLUX.2 [klein] 9B on a GPU: run with the model folder
             replaced by a tiny random one with klein-9B's 32 blocks (so `--block 17` means what it
             says) and `--check` (every input checked as a run does before its first step; the
             computation itself is the experiments' tests' business, at tiny size)
    slow     run as written but for the named shrinking substitutions, in the slow set (each names
             its cost)
    text     not a command (a listing, a log excerpt, a task file line: checked where it can be)
    omitted  with the reason

A block that appears in the docs without being listed, or a listed block that is gone, fails
`test_every_block_is_listed`. A substitution whose text is no longer in the block fails too.
Besides the blocks: the parity demo (`python -m flux2ref.demo`, twice in the README) and the
notebook command of docs/experiments.md (`jupytext --to notebook docs/tour.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testenv import host_devices

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KLEIN = "/models/FLUX.2-klein-9B"  # where the docs put a real model folder
GLOBAL_MESH = "mesh = sharding.global_mesh(data=1, fsdp=jax.device_count())  # (process, local device) order, fsdp filled first"


@dataclasses.dataclass(frozen=True)
class Block:
    file: str  # relative to the checkout
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return self.file, self.text.strip().splitlines()[0]


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            out.append(Block(path.relative_to(REPO).as_posix(), text[:m.start()].count("\n") + 1, m.group(1),
                             m.group(2)))
    return out


def block(file: str, first: str) -> Block:
    [found] = [b for b in blocks() if b.key == (file, first)]
    return found


# (file, first line) -> (how, why or which test runs it)
EXAMPLES = {
    ("README.md", "bash scripts/main.sh     # the main job: the study's five experiments, with a report"):
        ("slow", "main.sh: test_the_main_job_as_written (5-7 min); test.sh is omitted: it is this test suite "
                 "(CI runs it as .ci/run)"),
    ("README.md", "bash scripts/test.sh --fast   # the library's own tests (tests/fluxjax) in-process: about 2.7 min "
                  "on 2 cores"): ("shell", "test_fast_tier_selection: its selection, collected without running it "
                                           "(running it is the fast tier itself)"),
    ("README.md", ".venv/bin/python -m experiments.run_all --model /models/FLUX.2-klein-9B --out runs/klein9b   "
                  "# every block swept"): ("check", "a real klein 9B on a GPU"),
    ("README.md", "import jax, jax.numpy as jnp"): ("python", "klein-9B sizes shrunk: test_readme_python"),
    ("README.md", "python -m fluxjax.conversion FLUX.2-klein-9B/transformer klein9b-native          "
                  "# a diffusers folder"): ("shell", "test_readme_conversion, on tiny checkpoints"),
    ("README.md", 'config, params = fluxjax.load_transformer("klein9b-native", dtype=jnp.bfloat16)'):
        ("python", "test_readme_conversion, after the conversion"),
    ("README.md", 'ko  = fluxjax.knockout(config, layout, content_mask, "ref->text[padding]", blocks="all")'):
        ("python", "test_readme_python, its inputs made first"),
    ("README.md", "from fluxjax import pipeline"): ("python", "test_readme_python, on the tiny folder"),
    ("README.md", "from experiments import load_model"): ("python", "test_readme_python"),
    ("docs/experiments.md", "bash scripts/main.sh                 # = .venv/bin/python -m experiments.run_all"):
        ("slow", "test_the_main_job_as_written"),
    ("docs/experiments.md", "python -m experiments.run_all --model /models/FLUX.2-klein-9B --out runs/klein9b"):
        ("check", "a real klein 9B on a GPU"),
    ("docs/experiments.md", "python -m experiments.lens --sweep --colours red,blue --objects circle --seeds 0        "
                            "# the text-routed organism"): ("check", "every line; the organism lines also run "
                                                                     "in test_experiment_commands_on_organisms"),
    ("docs/experiments.md", "python -m experiments.knockout --settings 'ref->text' 'ref->image' "
                            "'ref->text+ref->image' \\"): ("check", "240 tasks; also run in "
                                                                   "test_experiment_commands_on_organisms"),
    ("docs/experiments.md", "python -m experiments.patching --model /models/FLUX.2-klein-9B --tasks "
                            "data/colour/tasks.jsonl \\"): ("check", "a real klein 9B; the study's task files"),
    ("docs/experiments.md", '{"task_id": "my_mug", "instruction": "draw a mug in this color", "source_image_path": '
                            '"swatch.png", "width": 1024, "height": 1024}'): ("text", "a task line: read back"),
    ("docs/experiments.md", "/work/fluxjax/runs/main/direct: new run folder: model organism 'direct' (routing cuts in "
                            "every block: none), 8 tasks, lens, study_lens, knockout, drop, patching"):
        ("text", "a log excerpt of the main job: test_progress_lines.py checks such lines"),
    ("docs/experiments.md", "report.html                      the report: setup, tables, plots, grids, configuration"):
        ("text", "a listing of a run folder"),
    ("docs/experiments.md", "python -m experiments.run_all --study --model /models/FLUX.2-klein-9B --plan"):
        ("shell", "test_the_study_plan_counts: the first line on the klein-shaped folder; the style line needs a "
                  "checkout of the study's repository (its task and pair files; counted on a mock of its layout in "
                  "test_study_files.py)"),
    ("docs/experiments.md", "from experiments import sweep"): ("python", "test_experiments_sweep_example"),
    ("docs/flow.md", "import fluxjax"): ("python", "test_flow_examples"),
    ("docs/flow.md", "import jax, jax.numpy as jnp, numpy as np"): ("python", "test_flow_examples"),
    ("docs/flow.md", "python -m experiments.flow --model text-routed --colours red,blue --objects circle"):
        ("slow", "test_flow_command (about a minute on 2 cores)"),
    ("docs/interventions.md", "import fluxjax"): ("python", "test_interventions_examples"),
    ("docs/interventions.md", "out, caps = fluxjax.forward(params, config, img, txt, t, img_ids, txt_ids,"):
        ("omitted", "the signature, with `...` for the arguments; every argument is used in the blocks after it"),
    ("docs/interventions.md", "import dataclasses"): ("python", "test_interventions_examples"),
    ("docs/interventions.md", 'out, caps = run(capture=fluxjax.Capture(sites=("embed.text.output", "b1.image.attn_out",'):
        ("python", "test_interventions_examples"),
    ("docs/interventions.md", '_, edit = run(capture=fluxjax.Capture(sites=("b1.text.output",)))'):
        ("python", "test_interventions_examples"),
    ("docs/interventions.md", '_, sites = run(capture=fluxjax.Capture(sites=("b2.image.output", "b3.text.attn_out", '
                              '"b3.text.mlp_out")))'): ("python", "test_interventions_examples"),
    ("docs/interventions.md", 'ko = fluxjax.knockout(config, layout, content, "ref->text[padding]", blocks="all")'):
        ("python", "test_interventions_examples"),
    ("docs/interventions.md", 'per_head = fluxjax.knockout(config, layout, content, "ref->text[padding]", heads=[0]) \\'):
        ("python", "test_interventions_examples"),
    ("docs/attribution.md", "python -m experiments.attribute --model text-routed --exact all --attn-impl xla --out "
                            "runs/attribution/text-routed"):
        ("slow", "test_docs_attribution_commands (tests/experiments/test_attribute.py): every command at one sampler "
                 "step, the top 3 and 3 control cells instead of --exact all, no --wait-quiet, --out in a scratch "
                 "folder"),
    ("docs/interventions.md", "k = 3"): ("python", "test_interventions_examples"),
    ("docs/interventions.md", "gates = fluxjax.edge_gates(config, layout, content)       # every gate 1: the plain "
                              "forward"): ("python", "test_interventions_examples"),
    ("docs/interventions.md", 'names = [f"b{b}.image.attn_out" for b in range(config.num_blocks)]'):
        ("python", "test_interventions_examples"),
    ("docs/interventions.md", "other_txt = jax.random.normal(jax.random.key(3), txt.shape)"):
        ("python", "test_interventions_examples"),
    ("docs/gpu.md", "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\"):
        ("omitted", "downloads wheels for the GPU machine's Python 3.12 into .whl/: that machine's set-up, not this "
                    "one's"),
    ("docs/gpu.md", 'run(carry=[".whl"], timeout_s=300, command='):
        ("omitted", "calls of the device tool, not shell commands; both GPU commands run with --tiny on CPU in "
                    "tests/benchmarks/test_gpu_check.py"),
    ("docs/judging.md", "pip install -e '.[judge]'      # anthropic and openai; hf: needs the reference extra "
                        "(transformers, torch)"):
        ("slow", "test_judging_commands: the colour judge and agreement with the metric run; pip install is "
                 "omitted (scripts/setup.sh installs the judge extra); the API and local-model judges run with "
                 "--dry-run (no key, server or weights here: their calls are tested against local stand-ins in "
                 "test_judge.py and test_judge_hf.py); agreement with an API judge needs its verdicts"),
    ("docs/judging.md", '{"system": "...",'): ("text", "the questions file's shape (test_judge.py loads such files)"),
    ("docs/organisms.md", "import fluxjax"): ("python", "test_organisms_edit_example"),
    ("docs/probes.md", "import json, tensorstore as ts"):
        ("python", "test_probes_store_example, on a store of the same layout written without a model"),
    ("docs/probes.md", "python -m experiments.collect --model text-routed --out runs/collect/text-routed"):
        ("omitted", "four collections of the organisms' 240 tasks and two probe runs (tens of minutes here); "
                    "tests/experiments/test_probe.py::test_text_routed_padding_carries_the_colour (slow) runs the "
                    "text-routed pair and probes it, test_collect.py and test_probe.py run both commands at tiny size"),
    ("docs/sharding.md", "import functools"): ("python", "test_sharding_example: 8 host devices, a tiny checkpoint"),
    ("docs/sharding.md", GLOBAL_MESH): ("python", "test_sharding_example: after the usage block, one "
                                                       "process of 8 host devices (several: tests/experiments/test_hosts.py)"),
    ("docs/organisms.md", "python -m organisms.train --organism direct      --out runs/organisms/direct      "
                          "--minutes 60 --seed 0"): ("slow", "test_organism_training_commands, --minutes capped"),
    ("docs/organisms.md", "python -m organisms.evaluate runs/organisms/direct/organism      --out "
                          "runs/organisms/direct/eval      --n 64"): ("slow", "test_organism_training_commands, "
                                                                              "--n 2"),
    ("docs/organisms.md", "import numpy as np"): ("python", "tests/organisms/test_organisms_committed.py::"
                                                            "test_docs_example_runs_and_draws_what_it_says"),
    ("docs/organisms.md", "python -m organisms.train --organism direct --out runs/organisms/t2i-first   --minutes 60 "
                          "--seed 0 --t2i-first 500"):
        ("omitted", "four trainings of an hour each and their evaluations; every option they use is run at tiny "
                    "size by the regime tests of test_organisms.py, and train/evaluate/compare by "
                    "test_organism_training_commands"),
}


def test_every_block_is_listed():
    found = {b.key for b in blocks()}
    assert not found - set(EXAMPLES), f"blocks of the docs not listed in EXAMPLES: {sorted(found - set(EXAMPLES))}"
    assert not set(EXAMPLES) - found, f"listed blocks no longer in the docs: {sorted(set(EXAMPLES) - found)}"
    for key, (how, why) in EXAMPLES.items():
        assert how in ("python", "shell", "check", "slow", "text", "omitted") and why, key


def _collected(*args: str) -> set[str]:
    """The test ids `bash scripts/test.sh ARGS --collect-only` selects (in one process)."""
    done = subprocess.run(["bash", "scripts/test.sh", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env={**os.environ, "FLUXJAX_TEST_WORKERS": "0"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_fast_tier_selection():
    """`bash scripts/test.sh --fast` selects the library's tests that run in-process against JAX alone:
    exactly those of tests/fluxjax in the default run that are neither `parity` nor `processes`."""
    fast = _collected("--fast")
    library = _collected("tests/fluxjax")  # the default selection: not slow
    left_out = _collected("tests/fluxjax", "-m", "not slow and (parity or processes)")
    assert fast and left_out and all(t.startswith("tests/fluxjax/") for t in fast)
    assert fast | left_out == library and not fast & left_out
    assert len(fast) > 300, len(fast)  # the bulk of the library's tests


def substitute(text: str, *pairs: tuple[str, str]) -> str:
    """`text` with each (old, new) replaced; each old must be there (the docs changed otherwise)."""
    for old, new in pairs:
        assert old in text, f"{old!r} is no longer in the example:\n{text}"
        text = text.replace(old, new)
    return text


def commands(text: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def shell(command: str, cwd: Path, timeout: int = 600) -> str:
    """Run one documented command (`python` is this interpreter), from `cwd`, without the checkout on
    PYTHONPATH: what it imports must come from the set-up. Returns its stdout; fails with its output."""
    words = shlex.split(command)
    if words[0] in ("python", ".venv/bin/python"):
        words[0] = sys.executable
    elif words[0] == "jupytext":
        words[0] = str(Path(sys.executable).parent / "jupytext")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("FLUXJAX_CACHE", str(cwd / ".cache"))
    done = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    """A random tiny model folder with klein-9B's 8 + 24 blocks, in the diffusers layout; the examples
    that load it in this process share one conversion cache ($FLUXJAX_CACHE), not the user's."""
    from flux2ref.folder import TINY_KLEIN_9B_BLOCKS, build_model_folder

    before = os.environ.get("FLUXJAX_CACHE")
    os.environ["FLUXJAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(build_model_folder(tmp_path_factory.mktemp("models") / "FLUX.2-klein-9B",
                                  config=TINY_KLEIN_9B_BLOCKS))
    if before is None:
        del os.environ["FLUXJAX_CACHE"]
    else:
        os.environ["FLUXJAX_CACHE"] = before


@pytest.fixture
def scratch(tmp_path) -> Path:
    """The directory the examples run in, with the reference images they name."""
    for name, rgb in (("red.png", (220, 40, 40)), ("blue.png", (40, 90, 220)), ("swatch.png", (40, 90, 220))):
        Image.new("RGB", (64, 64), rgb).save(tmp_path / name)
    return tmp_path


def run_python(code: str, namespace: dict, cwd: Path) -> dict:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "<docs example>", "exec"), namespace)
    finally:
        os.chdir(here)
    return namespace


# --- the set-up ------------------------------------------------------------------------------------

def test_the_checkout_imports_from_any_directory(tmp_path):
    """What the examples import (the library and the checkout's folders) imports with the set-up's
    interpreter from another directory, without PYTHONPATH (scripts/setup.sh's path file)."""
    code = "import fluxjax, experiments, organisms, flux2ref; print(experiments.load_model.__module__)"
    assert shell(f"python -c {shlex.quote(code)}", tmp_path).strip() == "experiments.models"


# --- python blocks ----------------------------------------------------------------------------------

@pytest.mark.slow  # 107 s in the default run
def test_interventions_examples(scratch):
    namespace: dict = {}
    for key in [k for k, (how, _) in EXAMPLES.items() if k[0] == "docs/interventions.md" and how == "python"]:
        run_python(block(*key).text, namespace, scratch)
    # What the one-call example says it shows.
    assert namespace["result"].images.shape == (1, 32, 32, 3)
    assert namespace["result"].captures["b1.text.output"].shape == (8, 1, 32, 128)
    assert namespace["plain"].images.dtype == np.uint8


def test_flow_examples(scratch):
    """docs/flow.md's two blocks: on the text-routed organism, the shapes and numbers the text shows."""
    namespace: dict = {}
    for key in [k for k, (how, _) in EXAMPLES.items() if k[0] == "docs/flow.md" and how == "python"]:
        run_python(block(*key).text, namespace, scratch)
    flow = namespace["result"].captures.flow
    assert flow.mass.shape == (8, 6, 1, 4, 4, 4) and flow.tokens_at(1).shape == (8, 1, 160, 4, 4)
    assert float(np.abs(np.asarray(namespace["mass"][:, 2, 3])).max()) == 0.0  # the image reads no reference
    caps = namespace["caps"]
    assert caps.flow.at(2).shape == (1, 2, 4, 4) and caps.flow.tokens_at(2).shape == (1, 48, 2, 4)


@pytest.mark.slow
def test_flow_command(scratch):
    [command] = commands(block("docs/flow.md", "python -m experiments.flow --model text-routed --colours red,blue "
                                               "--objects circle").text)
    shell(command, scratch, timeout=1200)
    assert (scratch / "runs" / "flow" / "flow-edges.csv").is_file()
    assert (scratch / "runs" / "flow" / "plots" / "flow-mass.png").is_file()


def test_organisms_edit_example(scratch, capsys):
    namespace = run_python(block("docs/organisms.md", "import fluxjax").text, {}, scratch)
    from fluxjax import metrics

    blue = metrics.reference_colour(namespace["swatch"])
    kept, lost = (metrics.colour_error(namespace[k].images[0], blue) for k in ("plain", "knocked"))
    assert kept <= metrics.COLOUR_MATCH_DE00 < lost  # what the text says: kept, then lost


def test_readme_python(scratch, klein_folder):
    """The README's transformer, interventions and sampling blocks, klein-9B's width shrunk (its 32
    blocks kept, so the site "b17.image.attn_out" is valid) and its model folder a tiny random one."""
    import dataclasses as dc

    import fluxjax

    tiny = dc.replace(fluxjax.FLUX2_KLEIN_9B, context_in_dim=32, hidden_size=64, num_heads=2, axes_dim=(8, 8, 8, 8))

    def inputs(config, layout, seed=0):
        import jax

        keys = jax.random.split(jax.random.key(seed), 2)
        img = jax.random.normal(keys[0], (1, layout.n_image_stream, config.in_channels))
        txt = jax.random.normal(keys[1], (1, layout.n_txt, config.context_in_dim))
        return img, txt, np.array([0.5], np.float32)

    namespace: dict = {"TINY": tiny, "inputs": inputs}
    code = substitute(block("README.md", "import jax, jax.numpy as jnp").text,
                      ("fluxjax.FLUX2_KLEIN_9B", "TINY"),
                      ("n_txt=512, img_grid=(64, 64), ref_grids=((64, 64),)", "n_txt=8, img_grid=(4, 4), "
                                                                               "ref_grids=((4, 4),)"),
                      ("out, _ = forward(", "img, txt, timestep = inputs(config, layout)\nout, _ = forward("))
    run_python(code, namespace, scratch)
    assert namespace["out"].shape == (1, 32, 128)

    # The interventions block uses an edit's content mask and a captured text stream: made here.
    content = np.zeros((1, 8), bool)
    content[0, 1:4] = True
    namespace.update(content_mask=content, t=namespace["timestep"],
                     captured_text=np.zeros((1, 8, tiny.hidden_size), namespace["params"].img_in.dtype))
    run_python(block("README.md", 'ko  = fluxjax.knockout(config, layout, content_mask, "ref->text[padding]", '
                                  'blocks="all")').text, namespace, scratch)
    assert namespace["caps"]["b7.text.output"].shape == (1, 8, 64)
    assert namespace["caps"]["b17.image.attn_out"].shape == (1, 16, 64)

    code = substitute(block("README.md", "from fluxjax import pipeline").text,
                      ('"FLUX.2-klein-9B/"', repr(str(klein_folder))))
    run_python(code, namespace, scratch)
    assert (scratch / "edit.png").is_file() and namespace["result"].captures["b17.text.output"].shape[1] == 1

    run_python(block("README.md", "from experiments import load_model").text, namespace, scratch)
    assert namespace["result"].images.shape == (1, 32, 32, 3)


SHARDING_PRELUDE = """
import dataclasses, os
import jax, jax.numpy as jnp
import fluxjax

config = dataclasses.replace(fluxjax.FLUX2_KLEIN_9B, context_in_dim=32, hidden_size=64, num_heads=2, depth=1,
                             depth_single_blocks=2, axes_dim=(8, 8, 8, 8))
fluxjax.save_transformer("klein9b-native", config, fluxjax.init_params(config, jax.random.key(0)))
layout = fluxjax.TokenLayout(n_txt=8, img_grid=(2, 2))  # text-to-image: the sampler call has no reference
img = jax.random.normal(jax.random.key(1), (2, layout.n_image_stream, config.in_channels))
txt = jax.random.normal(jax.random.key(2), (2, layout.n_txt, config.context_in_dim))
t = jnp.array([0.5, 0.7])
img_ids, txt_ids = layout.img_ids(), layout.txt_ids()
noise = img[:, :layout.n_img]
"""


@pytest.mark.slow  # 35 s in the default run; the sharding itself: tests/fluxjax/test_sharding.py
def test_sharding_example(scratch):
    """docs/sharding.md's usage block on 8 host devices (a subprocess: the device count is fixed at
    start), with a tiny transformer saved where it loads from, and a batch of 2."""
    code = (SHARDING_PRELUDE + block("docs/sharding.md", "import functools").text + "\nprint(latents.shape)\n"
            + block("docs/sharding.md", GLOBAL_MESH).text + "\nprint(out.shape, dict(mesh.shape))\n")
    script = scratch / "sharding_example.py"
    script.write_text(code)
    env = {**os.environ, **host_devices(8)}
    done = subprocess.run([sys.executable, str(script)], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-2:] == ["(2, 4, 128)", "(2, 4, 128) {'data': 1, 'fsdp': 8}"], done.stdout


def test_probes_store_example(scratch):
    from experiments import store as storelib

    store = storelib.create(scratch / "runs" / "collect" / "text-routed" / "collect.zarr", tasks=["t0", "t1"],
                            sites={"b3.text.output": (4, 8)}, steps=[0, 7], dtype=np.float32, text_tokens=4,
                            chunk_tasks=1, attrs={"labels": {"t0": {"colour": "red"}, "t1": {"colour": "blue"}}})
    for i in range(2):
        store.write_chunk(i, {"b3.text.output": np.full((1, 2, 4, 8), i, np.float32)}, np.array([[1, 0, 0, 0]], bool))
    found = run_python(block("docs/probes.md", "import json, tensorstore as ts").text, {}, scratch)
    assert found["x"].shape == (2, 4, 8) and found["padding"].sum() == 6 and found["colours"] == ["red", "blue"]


def test_experiments_sweep_example(scratch, tmp_path_factory):
    """docs/experiments.md's knockout sweep (from every k, n + 1 cells) on a tiny random folder of 5
    blocks (the example names no block), 64 x 64 instead of 1024."""
    from flux2ref.folder import build_model_folder

    folder = build_model_folder(tmp_path_factory.mktemp("models") / "tiny")
    code = substitute(block("docs/experiments.md", "from experiments import sweep").text,
                      (f'"{KLEIN}"', f"{folder!r}, cache={str(scratch / 'cache')!r}"),
                      ("height=1024, width=1024", "height=64, width=64"))
    namespace = run_python(code, {}, scratch)
    assert namespace["images"].shape == (6, 64, 64, 3)


# --- shell blocks -----------------------------------------------------------------------------------

def test_readme_conversion(scratch, klein_folder):
    """The three conversions (a diffusers transformer folder, a BFL single file, a VAE folder) on tiny
    checkpoints, then the README's loading line."""
    from safetensors.numpy import save_file

    from flux2ref.folder import TINY_KLEIN_9B_BLOCKS
    from flux2ref.models import random_state
    from fluxjax.conversion.transformer_keys import expected_source_shapes

    (scratch / "FLUX.2-klein-9B").symlink_to(klein_folder)
    save_file(random_state(expected_source_shapes(TINY_KLEIN_9B_BLOCKS, "bfl"), seed=1),
              str(scratch / "flux-2-klein-9b.safetensors"))
    lines = commands(block("README.md", "python -m fluxjax.conversion FLUX.2-klein-9B/transformer klein9b-native"
                                        "          # a diffusers folder").text)
    assert len(lines) == 3
    outs = [line.split()[-1] for line in lines]
    for line in lines:
        if "safetensors" in line:  # a second native folder, beside the first one
            line = substitute(line, ("klein9b-native", "klein9b-native-from-bfl"))
        shell(line, scratch)
    assert outs == ["klein9b-native", "klein9b-native", "vae-native"]
    import jax.numpy as jnp

    import fluxjax

    namespace = run_python(block("README.md", 'config, params = fluxjax.load_transformer("klein9b-native", '
                                              'dtype=jnp.bfloat16)').text, {"fluxjax": fluxjax, "jnp": jnp}, scratch)
    assert namespace["config"].num_blocks == 32


CHECKED = [  # (file, first line): the commands written for a real klein 9B, run with --check
    key for key, (how, _) in EXAMPLES.items() if how == "check"]
LENS, KNOCKOUT = CHECKED[2], CHECKED[3]


@pytest.mark.parametrize("key", CHECKED, ids=[f"{f}:{first[:40]}" for f, first in CHECKED])
def test_commands_for_a_real_model_check(key, scratch, klein_folder):
    (scratch / "models").mkdir()
    (scratch / "models" / "FLUX.2-klein-9B").symlink_to(klein_folder)
    data = scratch / "data" / "colour"
    text = block(*key).text
    if "data/colour" in text:  # the study's colour task and pair files, made here at 64 px (the checks read them)
        from experiments import tasks

        path = tasks.write_colour_bucket(data, ["red", "blue"], ["ball"], [0, 1], size=64)
        found = tasks.read_tasks(path)
        (data / "pairs.tsv").write_text("".join(f"{a.task_id}\t{b.task_id}\n" for a, b in tasks.colour_pairs(found)))
    for line in commands(text):
        line = line.replace(KLEIN, str(scratch / "models" / "FLUX.2-klein-9B"))
        out = shell(f"{line} --check", scratch)
        assert "inputs checked" in out and "nothing run" in out, out
    assert not (scratch / "runs").exists()  # --check writes nothing


def test_the_study_plan_counts(scratch, klein_folder):
    """docs/experiments.md's --plan line for a real klein 9B, on the klein-shaped tiny folder: the
    study's n of the colour bucket, counted without running anything."""
    text = block("docs/experiments.md", "python -m experiments.run_all --study --model /models/FLUX.2-klein-9B "
                                        "--plan").text
    line = commands(text)[0]
    out = shell(line.replace(KLEIN, str(klein_folder)), scratch)
    said = [c.strip() for c in text.splitlines()[1].lstrip("#").split("/")]  # '#   lens: 320 tasks / ...'
    assert all(s in out for s in said), (said, out)
    assert not (scratch / "runs").exists()


def test_the_task_line_reads_back(scratch):
    from experiments import tasks

    line = block("docs/experiments.md", '{"task_id": "my_mug", "instruction": "draw a mug in this color", '
                                        '"source_image_path": "swatch.png", "width": 1024, "height": 1024}').text
    (scratch / "tasks.jsonl").write_text(line)
    [task] = tasks.read_tasks(scratch / "tasks.jsonl")
    assert task.task_id == "my_mug" and Path(task.reference).name == "swatch.png" and task.width == 1024


def test_the_parity_demo_runs(capsys):
    """`python -m flux2ref.demo`, which the README shows twice: its main, in this process (torch and
    diffusers are loaded once for the suite; that it imports from any directory is checked above)."""
    from flux2ref import demo

    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "parity holds" in out and "FAIL" not in out


def test_the_tour_converts_to_a_notebook(tmp_path):
    """docs/experiments.md: `jupytext --to notebook docs/tour.py` (on a copy: it writes beside the file)."""
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "tour.py", tmp_path / "docs" / "tour.py")
    assert "jupytext --to notebook docs/tour.py" in (REPO / "docs" / "experiments.md").read_text()
    shell("jupytext --to notebook docs/tour.py", tmp_path)
    import json

    notebook = json.loads((tmp_path / "docs" / "tour.ipynb").read_text())
    assert sum(c["cell_type"] == "code" for c in notebook["cells"]) >= 5


# --- long ones --------------------------------------------------------------------------------------

@pytest.mark.slow  # the experiments on the organisms as documented: a few minutes on 2 cores
def test_experiment_commands_on_organisms(scratch):
    lens = [line for line in commands(block(*LENS).text) if KLEIN not in line]
    knockout = commands(block(*KNOCKOUT).text)
    for line in lens:
        shell(f"{line} --out runs/lens-{abs(hash(line))} --no-progress", scratch)
    for line in knockout:  # the whole bucket is 240 tasks: two of them here
        shell(f"{line} --colours red,blue --objects circle --seeds 0 --no-progress", scratch)
    assert (scratch / "runs" / "knockout" / "report.html").is_file()


@pytest.mark.slow  # two organism trainings to their first checkpoint, and two evaluations of 2 samples
def test_organism_training_commands(scratch):
    train = commands(block("docs/organisms.md", "python -m organisms.train --organism direct      --out "
                                                "runs/organisms/direct      --minutes 60 --seed 0").text)
    for line in train:
        shell(substitute(line, ("--minutes 60", "--minutes 0.01")), scratch)
    evaluate = commands(block("docs/organisms.md", "python -m organisms.evaluate runs/organisms/direct/organism      "
                                                   "--out runs/organisms/direct/eval      --n 64").text)
    for line in evaluate:
        shell(substitute(line, ("--n 64", "--n 2")), scratch)
    assert (scratch / "runs" / "organisms" / "text-routed" / "eval" / "pass_rates.json").is_file()


@pytest.mark.slow  # a knockout run on an organism to judge (about a minute), then the judge commands
def test_judging_commands(scratch):
    """docs/judging.md's commands on an organism's run folder at the path they name: the colour judge
    and its agreement with the metric run; the API judges count their calls (--dry-run: no server
    here, and a stand-in key for the anthropic client, which wants one to be built). Left out: pip
    install (the set-up installs the judge extra), the local-model judge (a model's weights; test_judge_hf.py
    runs it on a tiny random one) and agreement between two API judges (their verdicts)."""
    shell("python -m experiments.knockout --model direct --colours red --objects circle --seeds 0 "
          "--settings ref->text ref->image --out runs/klein9b --no-progress", scratch)
    lines = commands(block("docs/judging.md", "pip install -e '.[judge]'      # anthropic and openai; hf: needs "
                                              "the reference extra (transformers, torch)").text)
    ran = []
    os.environ.setdefault("ANTHROPIC_API_KEY", "stand-in-for-dry-runs")
    try:
        for line in lines:
            if line.startswith("pip install") or "--judge hf:" in line or line.count("anthropic:") + \
                    line.count("openai:") == 2:
                continue
            if "--judge colour" in line:
                shell(line, scratch)
            elif "--judge" in line:
                shell(f"{line} --dry-run", scratch)
            else:  # agreement of a judge with the metric: the colour judge's verdicts stand for the API judge's
                shell(substitute(line, ("anthropic:claude-opus-4-7", "colour")), scratch)
            ran.append(line)
    finally:
        if os.environ.get("ANTHROPIC_API_KEY") == "stand-in-for-dry-runs":
            del os.environ["ANTHROPIC_API_KEY"]
    assert len(ran) == 4, ran


@pytest.mark.slow  # the main job as the README gives it: 5-7 min on 2 cores
def test_the_main_job_as_written(tmp_path):
    """`bash scripts/main.sh` in a copy of the checkout (it writes runs/ beside itself), with this
    interpreter's environment (FLUXJAX_VENV), output to a file: both reports and progress lines."""
    copy = tmp_path / "checkout"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FLUXJAX_VENV"] = str(Path(sys.executable).parent.parent)
    with open(tmp_path / "main.log", "w") as log:
        done = subprocess.run(["bash", "scripts/main.sh"], cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=1800)
    text = (tmp_path / "main.log").read_text()
    assert done.returncode == 0, text[-3000:]
    assert (copy / "runs" / "main" / "report.html").is_file() and (copy / "runs" / "main-study" / "report.html").is_file()
    assert "elapsed" in text and "cells skipped" in text
