"""The judge over run folders: API judges against local servers that check the documented
requests, retries and exclusions, the verdict cache and resume, and the colour metric as a judge.

The run folders here are built by hand under the judge contract (experiments.judge docstring):
colour tasks with a flat reference and small drawn objects whose colours make every verdict kind
come out both ways, one knockout task whose baseline edit misses the colour (excluded by the
relative rule), control rows, and style rows the colour judge cannot score.
"""

from __future__ import annotations

import base64
import csv
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import cli, judge, judges, runs, tables
from experiments.tasks import flat_image
from fluxjax import metrics

KEY = "sk-test-0123456789-SECRET-do-not-write"
SIZE = 32

# (task, reference colour, t2i colour, edit colour, lens output, ref->text output, ref->image output)
TASKS = [
    ("solid_red_ball_s0", "red", "blue", "red", "red", "orange", "red"),
    ("solid_blue_ball_s0", "blue", "blue", "blue", "blue", "blue", "green"),  # t2i already blue: lens fails
    ("solid_green_ball_s0", "green", "yellow", "brown", "green", "brown", "brown"),  # edit misses green: excluded
    ("solid_pink_ball_s0", "pink", "green", "pink", "yellow", "pink", "pink"),
]
PAIRS = [("solid_red_ball_s0", "solid_blue_ball_s0", "red"), ("solid_blue_ball_s0", "solid_pink_ball_s0", "pink"),
         ("solid_pink_ball_s0", "solid_red_ball_s0", "pink")]  # (source, target, patched output colour)
STYLE_TASKS = ["style_fox_s0", "style_frog_s0"]


def drawn(colour: str) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 235, np.uint8)
    image[8:24, 8:24] = metrics.STUDY_COLOURS[colour]
    return image


def shows(image: np.ndarray, ref_lab) -> bool:
    return metrics.colour_error(image, ref_lab) <= metrics.COLOUR_MATCH_DE00


def build_run(root: Path, name: str = "run") -> Path:
    """A run folder under the judge contract (see the module docstring), its rows made by the
    experiments' own row builders (`experiments.tables.judged_row`, `control_row`)."""
    with runs.open_run(root, name, {"test": "judge contract"}, argv=["test"]) as run:
        base = {}
        for task, ref, t2i, edit, *_ in TASKS:
            cell = run.cell(f"baselines/{task}")
            images = {"reference": flat_image(metrics.STUDY_COLOURS[ref], SIZE), "t2i": drawn(t2i), "edit": drawn(edit)}
            for n, im in images.items():
                cell.write_image(f"{n}.png", im)
            ref_lab = metrics.reference_colour(images["reference"])
            cell.finish({"reference_lab": list(ref_lab)})
            base[task] = (images, ref_lab)
        path = {n: {t: f"outputs/baselines/{t}/{n}.png" for t, *_ in TASKS} for n in ("reference", "t2i", "edit")}

        for task, _, _, _, lens_out, *_ in TASKS:
            (images, ref_lab), out = base[task], drawn(lens_out)
            cell = run.cell(f"lens/{task}")
            cell.write_image("lens-b3.png", out)
            bundle = [("reference", path["reference"][task]), ("t2i_clean", path["t2i"][task]),
                      ("output", f"outputs/lens/{task}/lens-b3.png")]
            cell.finish({"rows": [
                tables.control_row("lens", "colour", images["t2i"], ref_lab, images["edit"], task=task,
                                   setting="t2i (no reference)"),
                tables.judged_row("lens", "colour", "present", bundle, out, ref_lab,
                                  metrics.colour_error(images["t2i"], ref_lab), images["edit"], task=task,
                                  setting="lens b3")]})

        for task, _, _, _, _, text_out, image_out in TASKS:
            images, ref_lab = base[task]
            cell = run.cell(f"knockout/{task}")
            rows = []
            for setting, kind, colour, file in (("ref->text @ all", "lost", text_out, "ref-to-text--all.png"),
                                                ("ref->image @ all", "kept", image_out, "ref-to-image--all.png")):
                out = drawn(colour)
                cell.write_image(file, out)
                bundle = [("reference", path["reference"][task]), ("baseline edit", path["edit"][task]),
                          ("output", f"outputs/knockout/{task}/{file}")]
                rows.append(tables.judged_row("knockout", "colour", kind, bundle, out, ref_lab,
                                              metrics.colour_error(images["edit"], ref_lab), images["edit"], task=task,
                                              setting=setting))
            cell.finish({"rows": rows})

        for source, target, colour in PAIRS:
            out = drawn(colour)
            pair = f"{source}__{target}"
            cell = run.cell(f"patching/{pair}")
            cell.write_image("all-b3.png", out)
            bundle = [("source reference", path["reference"][source]), ("target reference", path["reference"][target]),
                      ("target edit", path["edit"][target]), ("output", f"outputs/patching/{pair}/all-b3.png")]
            cell.finish({"rows": [tables.judged_row(
                "patching", "colour", "transferred", bundle, out, base[source][1],
                metrics.colour_error(out, base[target][1]), base[target][0]["edit"], pair=[source, target],
                setting="all b3")]})

        # Style tasks: the lens, and a knockout whose baseline edit has a colour far from the reference's,
        # which the colour rule would call a miss: a style row has no automatic verdict and is asked all the same.
        for task, colour in zip(STYLE_TASKS, ("purple", "orange")):
            images = {n: drawn(c) for n, c in (("reference", colour), ("t2i", "brown"), ("lens-b3", colour),
                                              ("edit", "green"), ("ko", "yellow"))}
            ref_lab = metrics.reference_colour(images["reference"])
            for experiment, kind, shown, setting in (
                    ("lens", "present", ("reference", "t2i", "lens-b3"), "lens b3"),
                    ("knockout", "lost", ("reference", "edit", "ko"), "ref->text @ all")):
                cell = run.cell(f"{experiment}/{task}")
                for n in shown:
                    cell.write_image(f"{n}.png", images[n])
                cell.finish({"rows": [tables.judged_row(
                    experiment, "style", kind, [(n, f"outputs/{experiment}/{task}/{n}.png") for n in shown],
                    images[shown[-1]], ref_lab, metrics.colour_error(images[shown[1]], ref_lab), images["edit"],
                    task=task, setting=setting)]})
    return run.path


def judged_rows(run_path: Path, colour_only: bool = False, strict: bool = False) -> int:
    return sum(1 for it in judge.items(run_path) if not judge.excluded(it, strict)
               and (it.property == "colour" or not colour_only))


def verdict_files(folder: Path) -> dict[str, list[dict]]:
    out = {}
    for path in sorted(folder.rglob("*.csv")):
        if path.name != "pass-rates.csv":
            with open(path, newline="") as f:
                out[path.relative_to(folder).as_posix()] = list(csv.DictReader(f))
    return out


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# ---------------------------------------------------------------------------------------------
# the project's questions and the answer parser


def test_every_experiment_property_and_kind_has_a_question_about_its_images():
    for experiment, kinds in judge.KINDS_OF.items():
        for prop in judge.PROPERTIES:
            for kind in kinds:
                q = judge.QUESTIONS.get(experiment, prop, kind)
                n = judges.IMAGES_PER_KIND[kind]
                assert [label.split(":")[0] for label in q.labels] == [f"Image {i + 1}" for i in range(n)]
                assert f"Image {n}" in q.question  # it asks about the last (intervened) image
    assert "JSON" in judge.QUESTIONS.system and '"answer"' in judge.QUESTIONS.system


def test_answers_are_parsed_from_one_small_json_object():
    assert judge.parse_answer('{"answer": "yes", "reason": "red ball"}') == (True, "red ball")
    assert judge.parse_answer('```json\n{"answer": "No", "reason": "blue"}\n```') == (False, "blue")
    assert judge.parse_answer('{"pass": 1, "reason": "r"}') == (True, "r")  # the study's own format
    for bad in ("yes", "", '{"answer": "maybe"}', '{"answer": yes}', '["yes"]', '{"reason": "no answer"}'):
        assert judge.parse_answer(bad) is None, bad


def test_questions_file_replaces_the_wording(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"system": "Be strict.", "questions": {
        "knockout/style/lost": {"labels": ["Image 1 - ref", "Image 2 - base", "Image 3 - ko"], "question": "Lost?"}}}))
    q = judge.load_questions(path)
    assert q.system == "Be strict." and q.get("knockout", "style", "lost").question == "Lost?"
    assert q.get("lens", "colour", "present") == judge.QUESTIONS.get("lens", "colour", "present")
    path.write_text(json.dumps({"questions": {"knockout/style/lost": {"labels": ["a"], "question": "?"}}}))
    with pytest.raises(ValueError, match="3 texts"):
        judge.load_questions(path)
    # keyed down to the setting: the exact setting first, then a glob, then the kind
    labels = ["Image 1 - a", "Image 2 - b", "Image 3 - c"]
    path.write_text(json.dumps({"questions": {
        "lens/identity/present/*all b*": {"labels": labels, "question": "Someone else?", "negated": True},
        "knockout/colour/lost/ref->text[padding] @ all": {"labels": labels, "question": "Padding cut: gone?"},
        "knockout/colour/lost/ref->text* @ all": {"labels": labels, "question": "Any text cut: gone?"}}}))
    q = judge.load_questions(path)
    assert q.get("knockout", "colour", "lost", "ref->text[padding] @ all").question == "Padding cut: gone?"
    assert q.get("knockout", "colour", "lost", "ref->text @ all").question == "Any text cut: gone?"
    assert q.get("knockout", "colour", "lost", "ref->text from 3").source == "project"
    identity = q.get("lens", "identity", "present", "study-lens all b17")
    assert identity.negated and identity.question == "Someone else?"
    assert not q.get("lens", "identity", "present", "padding b7").negated
    path.write_text(json.dumps({"questions": {"nothing/colour/lost/x": {"labels": labels, "question": "?"}}}))
    with pytest.raises(ValueError, match="experiment/property/kind"):
        judge.load_questions(path)


def test_kappa_and_agreement():
    assert judge.kappa_and_agreement([(True, True), (False, False)]) == {"n": 2, "agreement": 1.0, "kappa": 1.0}
    r = judge.kappa_and_agreement([(True, True), (True, False), (False, False), (False, True)])
    assert r["agreement"] == 0.5 and r["kappa"] == 0.0
    # po = 0.75, pa = 0.5, pb = 0.25: pe = 0.125 + 0.375 = 0.5, kappa = 0.5
    r = judge.kappa_and_agreement([(True, True), (True, False), (False, False), (False, False)])
    assert r["agreement"] == 0.75 and r["kappa"] == pytest.approx(0.5)
    assert judge.kappa_and_agreement([(True, True)] * 3)["kappa"] is None  # both constant: undefined
    assert judge.kappa_and_agreement([])["agreement"] is None


# ---------------------------------------------------------------------------------------------
# the colour metric as a judge reproduces the metric through the full judge path


def test_colour_judge_reproduces_the_metric_exactly(tmp_path):
    run_path = build_run(tmp_path)
    out = judge.score(run_path, judges.ColourJudge(), argv=["test"])
    rates = {(r["experiment"], r["property"], r["kind"], r["setting"]): r for r in out.rates}
    # the fixture makes every verdict kind come out both ways; one knockout task's baseline edit misses
    # its colour: judged all the same (the study's rule), and left out of the strict rate only
    lost = rates[("knockout", "colour", "lost", "ref->text @ all")]
    assert lost["baseline_misses"] == 1 and lost["excluded"] == 0 and lost["judged"] == lost["rows"] == 4
    for r in out.rates:
        if r["property"] != "colour":
            assert r["judged"] == 0 and r["not_applicable"] == r["rows"] and r["file"] == ""
            continue
        assert r["errors"] == r["unparseable"] == 0
        assert r["judged"] == r["metric_n"] == r["rows"] > 0
        assert r["passed"] == r["metric_passed"] and r["judge_rate"] == r["metric_rate"]
        assert (r["judge_rate_low"], r["judge_rate_high"]) == (r["metric_rate_low"], r["metric_rate_high"])
        assert r["judge_rate_strict"] == r["metric_rate_strict"]
        assert r["agreement"] == 1.0
    assert lost["metric_rate_strict"] is not None and lost["metric_rate_strict"] != lost["metric_rate"]
    assert any(0 < r["metric_passed"] < r["metric_n"] for r in out.rates)
    result = judge.agreement(run_path, "colour", judge.METRIC)
    assert result["overall"]["n"] == judged_rows(run_path, colour_only=True)
    assert result["overall"]["agreement"] == 1.0 and result["overall"]["kappa"] == 1.0
    assert result["disagreements"] == []
    files = verdict_files(out.folder)
    slug = cli.slug
    assert set(files) == {f"lens/colour-present/{slug('lens b3')}.csv",
                          f"knockout/colour-lost/{slug('ref->text @ all')}.csv",
                          f"knockout/colour-kept/{slug('ref->image @ all')}.csv",
                          f"patching/colour-transferred/{slug('all b3')}.csv"}
    rows = files[f"patching/colour-transferred/{cli.slug('all b3')}.csv"]
    assert list(rows[0]) == list(judge.VERDICT_COLUMNS)
    assert sorted(r["entity_id"] for r in rows) == sorted(f"{s}__{t}" for s, t, _ in PAIRS)
    assert all(r["model"] == "colour" and r["pass"] in ("0", "1") for rs in files.values() for r in rs)
    html = (run_path / "judge-colour.html").read_text()
    assert "knockout: judge and metric per setting" in html and "ref-&gt;image @ all" in html
    assert "agreement 100.0%, kappa 1.000" in html
    assert judge.main(["agree", str(run_path), "colour", "metric"]) == 0


class Recording:
    """A judge of any property that answers yes and records the output image of every bundle asked."""

    name, properties = "recording", None

    def __init__(self):
        self.asked = []

    def ask(self, prompt):
        path = prompt.images[-1].path
        self.asked.append(path.relative_to(path.parents[3]).as_posix())  # outputs/<experiment>/<task>/<file>
        return judges.Reply(json.dumps({"answer": "yes", "reason": "recorded"}))


def test_every_judged_row_is_sent_to_the_judge_as_the_study_did(tmp_path):
    """The rows sent are every judged row, colour and style, whatever the baseline edit shows: the
    colour task whose baseline edit misses its colour, and the style knockouts whose baseline edit
    is far from the reference's colour (a colour rule must not touch a style row)."""
    run_path = build_run(tmp_path)
    every = [it for it in judge.items(run_path)]
    expected = 4 + 2 * 4 + len(PAIRS) + 2 * len(STYLE_TASKS)  # lens, two knockouts, patching; style lens, knockout
    assert len(every) == expected
    j = Recording()
    out = judge.score(run_path, j)
    assert out.calls == len(j.asked) == expected
    assert sorted(j.asked) == sorted(it.bundle[-1][1] for it in every)
    style_knockouts = [it for it in every if it.property == "style" and it.experiment == "knockout"]
    assert len(style_knockouts) == len(STYLE_TASKS)
    for it in style_knockouts:  # a green baseline edit, far from a purple or orange reference: asked, no verdict
        assert it.metric is None and it.baseline_misses is None
        assert it.bundle[-1][1] in j.asked
    by = {(r["experiment"], r["property"], r["kind"]): r for r in out.rates}
    assert by[("knockout", "style", "lost")]["judged"] == len(STYLE_TASKS)
    assert by[("knockout", "style", "lost")]["judge_rate"] == 1.0
    assert by[("knockout", "colour", "lost")]["judged"] == 4 and by[("knockout", "colour", "lost")]["excluded"] == 0
    # the stricter rule, this project's option: the colour task whose baseline edit misses its colour leaves
    strict = Recording()
    judge.score(run_path, strict, cache=tmp_path / "strict-cache", strict=True)
    assert len(strict.asked) == expected - 2
    assert set(j.asked) - set(strict.asked) == {"outputs/knockout/solid_green_ball_s0/ref-to-text--all.png",
                                                 "outputs/knockout/solid_green_ball_s0/ref-to-image--all.png"}


def test_a_folder_without_the_contract_fails_clearly(tmp_path):
    with runs.open_run(tmp_path, "old", {"x": 1}, argv=["test"]) as run:
        run.cell("knockout/t").finish({"rows": [{"task": "t", "setting": "ref->text @ all", "colour_match": True}]})
    with pytest.raises(judge.ContractError, match="predate the judge contract"):
        judge.score(run.path, judges.ColourJudge())
    assert judge.main([str(run.path), "--judge", "colour", "--no-progress"]) == 2


def test_the_command_line_scores_and_agrees(tmp_path, capsys):
    run_path = build_run(tmp_path)
    assert judge.main([str(run_path), "--judge", "colour", "--no-progress"]) == 0
    assert f"colour: {judged_rows(run_path, colour_only=True)} calls, 0 verdicts from the cache" in capsys.readouterr().out
    assert judge.main(["agree", str(run_path), "colour", "metric", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["kappa"] == 1.0 and all(f["agreement"] == 1.0 for f in result["files"])
    assert judge.main(["agree", str(run_path), "anthropic:not-run", "metric"]) == 2
    assert "run python -m experiments.judge" in capsys.readouterr().err


def test_select_limit_and_dry_run_choose_what_is_asked(tmp_path):
    run_path = build_run(tmp_path)
    n = judged_rows(run_path, colour_only=True)
    j = Counting(judges.ColourJudge())
    assert judge.score(run_path, j, dry_run=True).calls == n and j.calls == 0
    assert not (run_path / "judge" / "colour").exists()
    knockout = judge.score(run_path, j, patterns=["knockout/*"], limit=2)
    assert j.calls == knockout.calls == 4  # two settings, two rows each
    asked = {r["setting"]: (r["judged"], r["not_asked"]) for r in knockout.rates if r["property"] == "colour"}
    assert asked == {"lens b3": (0, 4), "ref->text @ all": (2, 2), "ref->image @ all": (2, 2), "all b3": (0, 3)}
    rest = judge.score(run_path, j)
    assert rest.calls == n - 4 and rest.cached == 4 and sum(r["not_asked"] for r in rest.rates) == 0
    with pytest.raises(judge.ContractError, match="matches"):
        judge.score(run_path, j, patterns=["nothing/*"])


class Counting:
    """A judge that counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.properties = inner.name, inner.properties

    def ask(self, prompt):
        self.calls += 1
        return self.inner.ask(prompt)


def test_identical_bundles_are_asked_once(tmp_path):
    run_path = build_run(tmp_path)
    cell = runs.Cell(path=run_path / "outputs" / "knockout" / "solid_red_ball_s0", key="knockout/solid_red_ball_s0")
    record = json.loads((cell.path / runs.DONE_FILE).read_text())
    twin = dict(record["record"]["rows"][0], setting="ref->text @ :4")  # the same images in another setting
    record["record"]["rows"].append(twin)
    (cell.path / runs.DONE_FILE).write_text(json.dumps(record))
    # the project's labels name the setting; a wording that does not makes the twin one question
    plain = judge.Questions(judge.QUESTIONS.system, {**judge.QUESTIONS.table, "knockout/colour/lost": judge.Question(
        ("Image 1: reference", "Image 2: edit", "Image 3: knocked out"), "Lost?")})
    j = Counting(judges.ColourJudge())
    out = judge.score(run_path, j, questions=plain)
    assert j.calls == out.calls == judged_rows(run_path, colour_only=True) - 1
    assert sum(r["judged"] for r in out.rates if r["property"] == "colour") == judged_rows(run_path, True)


# ---------------------------------------------------------------------------------------------
# API judges against local servers


class FakeServer:
    """A local HTTP server speaking one API. Each request is checked against the documented
    request shape (problems are collected in .problems and answered 400), then answered from
    the script: ("ok", text), ("status", code), ("malformed",), ("block",) (hold the request
    until released), or the default once the script is spent: ("ok", alternating yes / no)."""

    def __init__(self, api: str, key: str | None = KEY, lifetime: float = 120.0):
        self.api, self.key, self.script, self.requests, self.problems = api, key, [], [], []
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append((self.path, dict(self.headers), body))
                    action = server.script.pop(0) if server.script else ("ok", None)
                problems = server.check(self.path, self.headers, body)
                if problems:
                    server.problems += problems
                    return self.reply(400, {"error": {"message": "; ".join(problems)}})
                if action[0] == "block":
                    server.release.wait(30)
                    action = ("ok", None)
                if action[0] == "status":
                    return self.reply(action[1], {"error": {"type": "x", "message": f"echo {server.key}"}},
                                      {"retry-after": "0"})
                if action[0] == "malformed":
                    return self.reply(200, None, raw=b"{this is not json")
                text = action[1] if action[1] is not None else json.dumps(
                    {"answer": "yes" if n % 2 == 0 else "no", "reason": f"request {n}"})
                self.reply(200, server.answer(text))

            def reply(self, code, obj, headers=None, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.stop)  # stops by itself whatever happens to the test
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.release.set()
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.api == "openai" else "")

    def check(self, path, headers, body) -> list[str]:
        """The request as the service documents it."""
        p = []
        images = []
        if self.api == "anthropic":  # Messages API: POST /v1/messages, the key, anthropic-version
            if path != "/v1/messages":
                p.append(f"path {path}")
            # the key travels as x-api-key, or as a bearer token (what the anthropic SDK 2.x sends)
            if headers.get("x-api-key") != self.key and headers.get("authorization") != f"Bearer {self.key}":
                p.append("API key header")
            if not headers.get("anthropic-version"):
                p.append("anthropic-version header")
            if not isinstance(body.get("system"), str) or "JSON" not in body["system"]:
                p.append("system")
            if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] <= 0:
                p.append("max_tokens")
            (message,) = body["messages"]
            if message["role"] != "user":
                p.append("role")
            for block in message["content"]:
                if block["type"] == "image":
                    src = block["source"]
                    if src["type"] != "base64" or src["media_type"] != "image/png":
                        p.append("image source")
                    images.append(base64.b64decode(src["data"]))
                elif block["type"] != "text":
                    p.append(f"block {block['type']}")
            texts = [b["text"] for b in message["content"] if b["type"] == "text"]
        else:  # chat completions: POST {base}/chat/completions, Bearer key, system message first
            if path != "/v1/chat/completions":
                p.append(f"path {path}")
            if headers.get("authorization") != f"Bearer {self.key}":
                p.append("authorization header")
            if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] <= 0:
                p.append("max_tokens")
            system, user = body["messages"]
            if system["role"] != "system" or "JSON" not in system["content"]:
                p.append("system message")
            for part in user["content"]:
                if part["type"] == "image_url":
                    head, _, data = part["image_url"]["url"].partition(",")
                    if head != "data:image/png;base64":
                        p.append("data URL")
                    images.append(base64.b64decode(data))
                elif part["type"] != "text":
                    p.append(f"part {part['type']}")
            texts = [t["text"] for t in user["content"] if t["type"] == "text"]
        if body.get("model") != "judge-model":
            p.append("model")
        if len(images) not in (3, 4) or any(im[:8] != b"\x89PNG\r\n\x1a\n" for im in images):
            p.append("images")
        if len(texts) != len(images) + 1 or not all(t.startswith((f"Image {i + 1}:", f"Image {i + 1} -"))
                                                    for i, t in enumerate(texts[:-1])):
            p.append("labels before each image, question last")
        return p

    def answer(self, text: str) -> dict:
        if self.api == "anthropic":
            return {"id": "msg_1", "type": "message", "role": "assistant", "model": "judge-model",
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 1234, "output_tokens": 21}}
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": "judge-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1234, "completion_tokens": 21, "total_tokens": 1255}}


@pytest.fixture
def server(request):
    s = FakeServer(request.param)
    yield s
    s.stop()


def api_judge(server: FakeServer, monkeypatch, attempts: int = 3) -> judges.Judge:
    retry = judges.Retry(attempts=attempts, base_delay=0.01, max_delay=0.05)
    if server.api == "anthropic":
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        return judges.make_judge("anthropic:judge-model", retry=retry)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return judges.make_judge(f"openai:judge-model@{server.url}", retry=retry)


@pytest.mark.parametrize("server", ["anthropic", "openai"], indirect=True)
def test_api_judge_retries_excludes_and_counts(server, tmp_path, monkeypatch):
    run_path = build_run(tmp_path)
    n = judged_rows(run_path)
    server.script = [("status", 429), ("ok", None),  # a rate limit, then the answer: one verdict
                     ("status", 500), ("status", 503), ("ok", None),  # two server errors, then the answer
                     ("status", 500), ("status", 529), ("status", 500),  # three: given up, an error
                     ("malformed",),  # a body that is not JSON: an error, not retried
                     ("ok", "I think yes"),  # no JSON object: unparseable
                     ("status", 400)]  # a rejected request: an error, not retried (its body echoes the key)
    out = judge.score(run_path, api_judge(server, monkeypatch), argv=["test"])
    assert server.problems == []
    assert len(server.requests) == n + 1 + 2 + 2  # the retries of the first three bundles
    assert out.calls == n and out.cached == 0
    total = {k: sum(r[k] for r in out.rates) for k in ("errors", "unparseable", "judged", "passed", "excluded",
                                                         "baseline_misses")}
    assert total["errors"] == 3 and total["unparseable"] == 1 and total["judged"] == n - 4
    # the task whose baseline edit misses its colour, in both knockout settings: sent, as the study did
    assert total["excluded"] == 0 and total["baseline_misses"] == 2
    files = verdict_files(out.folder)
    rows = [r for rs in files.values() for r in rs]
    assert len(rows) == n
    empty = sorted(r["reason"].split(":")[0] for r in rows if r["pass"] == "")
    assert empty == ["ERROR", "ERROR", "ERROR", "PARSE_ERROR"]
    assert sum(r["pass"] == "1" for r in rows) == total["passed"]
    assert any("gave up after 3 attempts" in r["reason"] and "HTTP 500" in r["reason"] for r in rows)
    assert all(r["model"] == out.judge and r["input_tokens"] in ("0", "1234") for r in rows)
    for r in out.rates:  # the rate is over the verdicts only
        if r["judged"]:
            assert r["judge_rate"] == r["passed"] / r["judged"]
    assert KEY.encode() not in all_bytes(run_path)


@pytest.mark.parametrize("server", ["anthropic", "openai"], indirect=True)
def test_a_rejected_key_stops_the_run_without_showing_it(server, tmp_path, monkeypatch):
    run_path = build_run(tmp_path)
    server.script = [("status", 401)]
    with pytest.raises(judges.JudgeAuthError) as e:
        judge.score(run_path, api_judge(server, monkeypatch))
    assert "HTTP 401" in str(e.value) and KEY not in str(e.value) and len(server.requests) == 1
    assert KEY.encode() not in all_bytes(run_path)


def test_the_anthropic_judge_needs_its_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(judges.JudgeAuthError, match="ANTHROPIC_API_KEY"):
        judges.make_judge("anthropic:m")
    with pytest.raises(ValueError, match="openai:MODEL@URL"):
        judges.make_judge("openai:m")


@pytest.mark.parametrize("server", ["anthropic"], indirect=True)
def test_a_questions_file_reaches_the_judge(server, tmp_path, monkeypatch):
    run_path = build_run(tmp_path)
    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"system": "Other rules; reply in JSON.", "questions": {"lens/style/present": {
        "labels": ["Image 1: ref", "Image 2: plain", "Image 3: lens"], "question": "Is Image 3 stylised?"}}}))
    judge.score(run_path, api_judge(server, monkeypatch), questions=judge.load_questions(path))
    assert server.problems == []
    bodies = [body for _, _, body in server.requests]
    assert all(b["system"] == "Other rules; reply in JSON." for b in bodies)
    asked = [[c["text"] for c in b["messages"][0]["content"] if c["type"] == "text"] for b in bodies]
    assert sum(t == ["Image 1: ref", "Image 2: plain", "Image 3: lens", "Is Image 3 stylised?"] for t in asked) \
        == len(STYLE_TASKS)


STUDY_CHECKOUT = Path(__file__).resolve().parents[1] / "study_checkout"  # laid out as the study's, our own words


def _asked(server: FakeServer) -> list[tuple[str, list[str]]]:
    """(system, [label, ..., question]) of every request an anthropic server received."""
    return [(body["system"], [c["text"] for c in body["messages"][0]["content"] if c["type"] == "text"])
            for _, _, body in server.requests]


@pytest.mark.parametrize("server", ["anthropic"], indirect=True)
def test_the_studys_prompts_from_a_checkout_reach_the_judge_verbatim(server, tmp_path, monkeypatch):
    """--questions-from reads the system text and the per-cell prompts of a checkout laid out as the
    study's; each row gets the prompt of its cell, keyed by its setting, and the rows of cells the
    study did not judge keep the project's wording."""
    run_path = build_run(tmp_path)
    system = ("STAND-IN SYSTEM: you check pictures from an image-editing study. Several captioned pictures come "
              'first, then one question. Reply with JSON only, on one line: {"pass": 0 or 1, "reason": "a few words"}.')
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    assert judge.main([str(run_path), "--judge", "anthropic:judge-model", "--questions-from", str(STUDY_CHECKOUT),
                       "--concurrency", "1", "--no-progress"]) == 0
    assert server.problems == []
    asked = _asked(server)
    assert len(asked) == judged_rows(run_path) and all(s == system for s, _ in asked)
    texts = [t for _, t in asked]
    ko_text = ["Image 1 - STAND-IN colour reference:", "Image 2 - STAND-IN unchanged edit:",
               "Image 3 - STAND-IN edit with ref->text cut:",
               "STAND-IN colour knockout ref->text: Is the colour of Image 1 gone from Image 3?"]
    ko_image = ["Image 1 - STAND-IN colour reference:", "Image 2 - STAND-IN unchanged edit:",
                "Image 3 - STAND-IN edit with ref->image cut:",
                "STAND-IN colour knockout ref->image: Does Image 3 keep the colour of Image 1?"]
    patch = ["Image 1 - STAND-IN colour source reference:", "Image 2 - STAND-IN colour target reference:",
             "Image 3 - STAND-IN target edit:", "Image 4 - STAND-IN target edit, every text position from the source:",
             "STAND-IN colour patching (full): Is Image 4 nearer Image 1's colour than Image 2's?"]
    style_ko = ["Image 1 - STAND-IN style reference:", "Image 2 - STAND-IN unchanged edit:",
                "Image 3 - STAND-IN edit with ref->text cut:",
                "STAND-IN style knockout ref->text: Is Image 3 more photographic than Image 2?"]
    assert texts.count(ko_text) == texts.count(ko_image) == 4
    assert texts.count(patch) == len(PAIRS) and texts.count(style_ko) == len(STYLE_TASKS)
    # "lens b3" is no cell of the study's (its lens cells are the all / padding / content positions):
    # the project's question, filled in for the setting
    lens = judge.QUESTIONS.get("lens", "colour", "present", "lens b3")
    assert texts.count([*lens.labels, lens.question]) == 4 and "setting lens b3" in lens.labels[2]
    folder = run_path / "judge" / judge.judge_slug("anthropic:judge-model")
    rates = list(csv.DictReader(open(folder / "pass-rates.csv")))
    source = {(r["experiment"], r["property"], r["setting"]): r["question"] for r in rates}
    assert source[("knockout", "colour", "ref->text @ all")] == "study:ko_color_ref_to_text"
    assert source[("knockout", "style", "ref->text @ all")] == "study:ko_style_ref_to_text"
    assert source[("lens", "colour", "lens b3")] == "project"


@pytest.mark.parametrize("server", ["anthropic"], indirect=True)
def test_a_question_asked_the_other_way_round_counts_its_noes(server, tmp_path, monkeypatch):
    """The study's identity lens asks "a different person?": a yes is a row whose property is absent."""
    with runs.open_run(tmp_path, "run", {"test": "identity"}, argv=["test"]) as run:
        for task, colour in (("person_a_s0", "pink"), ("person_b_s0", "purple")):  # two bundles, two questions
            cell = run.cell(f"lens/{task}")
            image = drawn(colour)
            for n in ("reference", "t2i", "out"):
                cell.write_image(f"{n}.png", image)
            cell.finish({"rows": [tables.judged_row(
                "lens", "identity", "present",
                [(n, f"outputs/lens/{task}/{n}.png") for n in ("reference", "t2i", "out")], image,
                metrics.reference_colour(image), 50.0, image, task=task, setting="all b1")]})
    server.script = [("ok", '{"pass": 1, "reason": "someone else"}'), ("ok", '{"pass": 0, "reason": "the same"}')]
    out = judge.score(run.path, api_judge(server, monkeypatch), questions=judge.load_study_questions(STUDY_CHECKOUT),
                      concurrency=1)
    assert [t[-1] for t in (x for _, x in _asked(server))] == \
        ["STAND-IN identity lens (full): Is the person of Image 3 someone else than the person of Image 1?"] * 2
    (rate,) = out.rates
    assert rate["question"] == "study:i2i_unc_dreambench_human_identity (asked the other way round)"
    assert rate["judged"] == 2 and rate["passed"] == 1 and rate["judge_rate"] == 0.5
    rows = verdict_files(out.folder)[f"lens/identity-present/{cli.slug('all b1')}.csv"]
    assert sorted((r["pass"], r["answer"]) for r in rows) == [("0", "1"), ("1", "0")]  # pass: the same person


def test_a_checkout_without_the_studys_files_is_refused_in_one_line(tmp_path, capsys):
    run_path = build_run(tmp_path)
    assert judge.main([str(run_path), "--judge", "colour", "--questions-from", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SYSTEM_PROMPT" in err and "ChrisG777/i2i-interp" in err


def test_an_unreachable_server_is_retried_then_recorded_as_errors(tmp_path, monkeypatch):
    gone = FakeServer("openai")
    gone.stop()  # nothing listens on its port any more
    run_path = build_run(tmp_path)
    out = judge.score(run_path, api_judge(gone, monkeypatch, attempts=2), patterns=["lens/*"])
    lens = [r for r in out.rates if r["experiment"] == "lens"]
    assert sum(r["errors"] for r in lens) == out.calls == 4 + len(STYLE_TASKS)
    assert all(r["judged"] == 0 and r["judge_rate"] is None for r in lens)
    rows = [r for rs in verdict_files(out.folder).values() for r in rs]
    assert all(r["pass"] == "" and "APIConnectionError" in r["reason"] and "gave up after 2" in r["reason"]
               for r in rows)
    assert not list((run_path / "judge" / "cache").rglob("*.json"))  # errors are asked again next time


# ---------------------------------------------------------------------------------------------
# cache and resume


@pytest.mark.parametrize("server", ["openai"], indirect=True)
def test_judging_twice_makes_no_calls_the_second_time(server, tmp_path, monkeypatch):
    run_path = build_run(tmp_path)
    j = api_judge(server, monkeypatch)
    first = judge.score(run_path, j, concurrency=4)
    assert first.calls == len(server.requests) == judged_rows(run_path) and server.problems == []
    assert sum(r["judged"] for r in first.rates) == first.calls
    before = verdict_files(first.folder)
    second = judge.score(run_path, j)
    assert second.calls == 0 and second.cached == first.calls and len(server.requests) == first.calls
    assert verdict_files(second.folder) == before
    # another question is another cache key: asked again
    q = judge.Questions(judge.QUESTIONS.system + " Be brief.", judge.QUESTIONS.table)
    assert judge.score(run_path, j, questions=q).calls == first.calls


@pytest.mark.parametrize("server", ["openai"], indirect=True)
def test_a_killed_judging_run_resumes(server, tmp_path):
    run_path = build_run(tmp_path)
    n = judged_rows(run_path)
    done_before_kill = 3
    server.script = [("ok", None)] * done_before_kill + [("block",)]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.judge", str(run_path), "--judge",
                             f"openai:judge-model@{server.url}", "--concurrency", "1", "--no-progress"],
                            cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(server.requests) <= done_before_kill and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(server.requests) == done_before_kill + 1, proc.stderr.read() if proc.poll() is not None else ""
    finally:
        proc.kill()
        proc.wait(30)
    assert KEY.encode() not in proc.stderr.read()
    server.release.set()
    cached = sorted((run_path / "judge" / "cache").rglob("*.json"))
    assert len(cached) == done_before_kill
    with pytest.MonkeyPatch.context() as mp:
        resumed = judge.score(run_path, api_judge(server, mp))
    assert resumed.cached == done_before_kill and resumed.calls == n - done_before_kill
    assert len(server.requests) == n + 1  # the killed call is asked again, nothing else twice
    assert sum(r["judged"] for r in resumed.rates) == n


# ---------------------------------------------------------------------------------------------
# the main job's run folders


@pytest.mark.slow
def test_colour_judge_reproduces_the_main_jobs_metric(tmp_path):
    """On the committed organisms' main-job run folders, the colour metric wrapped as a judge gives
    the metric's own verdict on every judged row, so its pass rates are the metric's exactly and
    the agreement tool reports kappa 1.0."""
    from experiments import run_all

    out = tmp_path / "main"
    assert run_all.main(["--model", "direct,text-routed", "--colours", "red,blue", "--objects", "circle",
                         "--blocks", "3", "--no-progress", "--out", str(out)]) == 0
    for name in ("direct", "text-routed"):
        run_path = out / name
        result = judge.score(run_path, judges.ColourJudge())
        colour = [r for r in result.rates if r["property"] == "colour"]
        assert {r["experiment"] for r in colour} == {"lens", "knockout", "drop", "patching"}
        for r in colour:
            assert r["errors"] == r["unparseable"] == 0, r
            assert (r["judged"], r["passed"]) == (r["metric_n"], r["metric_passed"]), r
            assert r["judge_rate"] == r["metric_rate"], r
        result = judge.agreement(run_path, "colour", judge.METRIC)
        assert result["overall"]["n"] == sum(r["metric_n"] for r in colour) > 0
        assert result["overall"]["agreement"] == 1.0 and result["overall"]["kappa"] == 1.0
        assert result["disagreements"] == []
